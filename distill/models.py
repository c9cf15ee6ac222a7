"""Loading the frozen teacher and building the student, and checking that they can be paired."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from distill.config import ConfigError, StudentConfig, TeacherConfig, tiny_hint
from distill.errors import first_line
from distill.layers import keep_layers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(path))


def resolve(path: str, key: str) -> str:
    """A local path expanded and checked, or a hub id passed through."""
    if _looks_local(path):
        local = Path(os.path.expanduser(path))
        if not local.is_dir():
            raise ConfigError(f"{key}: model directory not found: {path}{tiny_hint(path)}")
        return str(local)
    return path


def _pretrained(loader, path: str, key: str, **kwargs):
    try:
        return loader.from_pretrained(resolve(path, key), **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        hint = "; a weight file is truncated or corrupt" if isinstance(err, SafetensorError) else ""
        raise ConfigError(f"{key}: cannot load {path!r}: {first_line(err)}{hint}") from None


def load_tokenizer(path: str, key: str, revision: str | None = None):
    from transformers import AutoTokenizer  # start-up time: transformers loads only when this runs

    tokenizer = _pretrained(AutoTokenizer, path, key, revision=revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_masked_lm(path: str, key: str, device):
    """A masked LM (``AutoModelForMaskedLM``) in eval mode on ``device``, frozen: data.augment's word predictions."""
    from transformers import AutoModelForMaskedLM  # start-up time: transformers loads only when this runs

    model = _pretrained(AutoModelForMaskedLM, path, key)
    return model.to(device).eval().requires_grad_(False)


def quantization_config(cfg: TeacherConfig, key: str = "teacher.quantization"):
    """transformers' BitsAndBytesConfig for ``cfg``, or None for full precision."""
    if cfg.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"{key}={cfg.quantization} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig  # start-up time: transformers loads only when this runs

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=DTYPES[cfg.dtype],
    )


def use_eager_attention(student, teacher, *, quiet: bool = False) -> None:
    """Switches both models to eager attention, the implementation that returns attention maps.

    sdpa and flash attention compute attention without materializing its probabilities, so
    ``output_attentions`` gives nothing through them; an attention term needs the maps.
    """
    for who, model in (("student", student), ("teacher", teacher)):
        if model is None:
            continue
        before = getattr(model.config, "_attn_implementation", None)
        if before != "eager":
            model.set_attn_implementation("eager")
            if not quiet:
                print(f"{who}: attention implementation {before} -> eager (an attention term needs its attention maps, which only eager returns)",
                      file=sys.stderr)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients; the teacher is never trained nor put in an optimizer."""
    model.requires_grad_(False)
    model.eval()
    return model


@contextlib.contextmanager
def whole_models():
    """Loads inside are whole, never ZeRO-3-partitioned, even while a ZeRO-3 student exists.

    transformers partitions every from_pretrained while a DeepSpeed ZeRO-3 config is registered;
    the teacher (and a student reloaded for evaluation) must stay whole on every process.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed  # may be missing: the except names what to install
    except ImportError:  # transformers without its DeepSpeed integration
        yield
        return
    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    registered = ref() if ref is not None else None
    if registered is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(registered)


def auto_class(name: str = "AutoModelForCausalLM"):
    """The transformers auto class a task's models load with (``task.auto_class``)."""
    import transformers  # start-up time: transformers loads only when this runs

    return getattr(transformers, name)


def check_task_fits(config, model_class: str, task_kind: str, key: str = "teacher.path") -> None:
    """Fails, naming ``task.kind``, when ``model_class`` cannot build a model of ``config``'s type."""
    mapping = auto_class(model_class)._model_mapping
    try:
        mapping[type(config)]
    except KeyError:
        raise ConfigError(f"task.kind={task_kind} needs a model that {model_class} can load; {key} is a {config.model_type} model "
                          f"({type(config).__name__}); choose the task.kind that matches it") from None


def load_teacher(cfg: TeacherConfig, device: torch.device, *, quantized: bool = True, model_class: str = "AutoModelForCausalLM"):
    """Loads the frozen teacher on ``device``; ``quantized=False`` ignores teacher.quantization."""

    quant = quantization_config(cfg) if quantized else None
    kwargs = {"dtype": DTYPES[cfg.dtype], "revision": cfg.revision}
    if quant is not None:
        # bitsandbytes weights are quantized as they are placed; they must never be .to()-ed after.
        kwargs.update(quantization_config=quant, device_map={"": device} if device.type != "cpu" else None)
    with whole_models():
        model = _pretrained(auto_class(model_class), cfg.path, "teacher.path", **kwargs)
    if quant is None:
        model.to(device)
    return freeze(model)


def load_for_evaluation(path: str | os.PathLike, device: torch.device, *, base_quantization: str = "none", model_class: str = "AutoModelForCausalLM"):
    """A saved model (or a LoRA adapter on its base), whole, frozen, on ``device``."""
    AutoModel = auto_class(model_class)

    path = Path(path)
    with whole_models():
        if (path / "adapter_config.json").is_file():
            from peft import PeftModel  # optional dependency (distill[peft])

            base_path = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
            quant = quantization_config(TeacherConfig(path=base_path, dtype="float32", quantization=base_quantization), key="student.quantization")
            base = AutoModel.from_pretrained(base_path, dtype=torch.float32, **({"quantization_config": quant} if quant else {}))
            model = PeftModel.from_pretrained(base, path)
        else:
            model = AutoModel.from_pretrained(path, dtype=torch.float32)
    if base_quantization == "none":
        model.to(device)
    return freeze(model)


def _student_config(cfg: StudentConfig, teacher_path: str, teacher_revision: str | None):
    config = teacher_config(TeacherConfig(path=teacher_path, revision=teacher_revision))
    known = config.to_dict()
    for key, value in cfg.architecture.items():
        if key not in known and not hasattr(config, key):
            raise ConfigError(f"student.architecture.{key}: not a field of {type(config).__name__}")
        if key == "num_hidden_layers" and getattr(config, "layer_types", None) and "layer_types" not in cfg.architecture:
            # One attention type per layer (Qwen2, Gemma): the student keeps the teacher's pattern.
            pattern = config.layer_types
            config.layer_types = [pattern[i % len(pattern)] for i in range(value)]
        setattr(config, key, value)
    arch = cfg.architecture
    heads = getattr(config, "num_attention_heads", None)
    if heads and "num_attention_heads" in arch and "num_key_value_heads" not in arch and hasattr(config, "num_key_value_heads"):
        kv = min(config.num_key_value_heads, heads)
        config.num_key_value_heads = kv if heads % kv == 0 else heads
    if heads and hasattr(config, "head_dim") and "head_dim" not in arch and ("hidden_size" in arch or "num_attention_heads" in arch):
        if config.hidden_size % heads:
            raise ConfigError(f"student.architecture: hidden_size={config.hidden_size} is not divisible by num_attention_heads={heads}")
        config.head_dim = config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None)
    if heads and kv and heads % kv:
        raise ConfigError(f"student.architecture: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    return config


def build_student(cfg: StudentConfig, teacher_cfg: TeacherConfig, *, seed: int, device: torch.device | None = None,
                  model_class: str = "AutoModelForCausalLM", peft_task_type: str = "CAUSAL_LM", tokenizer=None):
    """The student: a pretrained model from student.path, or a new one from student.architecture.

    A new student copies the teacher's config with the architecture overrides, so it shares the
    teacher's model type, vocabulary and tokenizer; its weights are initialized from ``seed``.
    Weights are float32: mixed precision is applied by the training loop, not stored.
    """
    AutoModel = auto_class(model_class)
    # Built whole even under ZeRO-3: DeepSpeed partitions it when the job prepares it.
    with whole_models():
        if cfg.path:
            quant = quantization_config(TeacherConfig(path=cfg.path, dtype="float32", quantization=cfg.quantization), key="student.quantization")
            placed = {}
            if quant is not None:  # bitsandbytes quantizes as it places: load straight onto the device
                placed["quantization_config"] = quant
                if device is not None and device.type != "cpu":
                    placed["device_map"] = {"": device}
            model = _pretrained(AutoModel, cfg.path, "student.path", dtype=torch.float32, revision=cfg.revision, **placed)
            return apply_lora(model, cfg.lora, task_type=peft_task_type) if cfg.lora is not None else model
        if cfg.init == "teacher_layers":
            return _from_teacher_layers(cfg, teacher_cfg, model_class)
        config = _student_config(cfg, teacher_cfg.path, teacher_cfg.revision)
        if cfg.tokenizer and tokenizer is not None:  # its own tokenizer (student.tokenizer): its vocabulary and special tokens
            config.vocab_size = cfg.architecture.get("vocab_size", len(tokenizer))
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                setattr(config, name, getattr(tokenizer, name))
        torch.manual_seed(seed)
        return AutoModel.from_config(config, dtype=torch.float32)


def _from_teacher_layers(cfg: StudentConfig, teacher_cfg: TeacherConfig, model_class: str):
    """The full-precision teacher (or ``student.init_from``) keeping only ``student.init_layers``,
    embeddings and head copied with it."""
    source = TeacherConfig(path=cfg.init_from, revision=None) if cfg.init_from else teacher_cfg
    key = "student.init_from" if cfg.init_from else "teacher.path"
    depth = _pretrained(auto_class("AutoConfig"), source.path, key, revision=source.revision).num_hidden_layers
    layers = list(cfg.init_layers) or [round(i * depth / cfg.architecture["num_hidden_layers"]) + 1
                                       for i in range(cfg.architecture["num_hidden_layers"])]
    if any(layer > depth for layer in layers) or len(layers) > depth:
        raise ConfigError(f"student.init_layers: the {'student.init_from model' if cfg.init_from else 'teacher'} has layers 1..{depth} (got {layers})")
    model = _pretrained(auto_class(model_class), source.path, key, dtype=torch.float32, revision=source.revision)
    keep_layers(model, [layer - 1 for layer in layers])
    return model.requires_grad_(True).train()


def apply_lora(model, lora, *, task_type: str = "CAUSAL_LM"):
    """Wraps ``model`` with peft LoRA adapters; only they (and lora.modules_to_save) train."""
    try:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # optional dependency (distill[peft])
    except ImportError:
        raise ConfigError("student.lora needs peft: pip install 'distill[peft]' (or pip install peft)") from None
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if "Linear" in type(module).__name__}
    missing = [m for m in lora.target_modules if m not in names]
    if missing:
        raise ConfigError(f"student.lora.target_modules: no Linear module named {', '.join(missing)} in the student (has: {', '.join(sorted(names))})")
    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [m for m in lora.modules_to_save if m not in module_names]
    if unknown:
        raise ConfigError(f"student.lora.modules_to_save: no module named {', '.join(unknown)} in the student")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                        modules_to_save=list(lora.modules_to_save) or None, task_type=task_type)
    return get_peft_model(model, config)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def output_vocab(model) -> int:
    """Rows of the model's output embedding (the logits' last dim)."""
    head = model.get_output_embeddings()
    return getattr(head, "out_features", None) or head.weight.shape[0]


def job_tokenizers(cfg) -> tuple[object, object | None, str | None]:
    """(the student's tokenizer: ``student.tokenizer``, else ``student.path``'s, else the teacher's; the teacher's where the student
    names its own, else None; how the two differ (:func:`tokenizer_difference`), None where they do not)."""
    if cfg.student.tokenizer:
        student = load_tokenizer(cfg.student.tokenizer, "student.tokenizer")
    else:
        student = load_tokenizer(cfg.student.path or cfg.teacher.path, "student.path" if cfg.student.path else "teacher.path",
                                 cfg.student.revision if cfg.student.path else cfg.teacher.revision)
    if not (cfg.student.path or cfg.student.tokenizer):
        return student, None, None
    teacher = load_tokenizer(cfg.teacher.path, "teacher.path", cfg.teacher.revision)
    return student, teacher, tokenizer_difference(teacher, student)


def tokenizer_difference(teacher_tokenizer, student_tokenizer) -> str | None:
    """Where the two map a token to another id over their shared range ("at id I (a vs b)"), or how many ordinary tokens
    one holds beyond the other (a tokenizer with more merges splits text otherwise); None: the same tokenizer (tokens added
    after training, such as a padding token, may differ)."""
    teacher_ids = {i: t for t, i in teacher_tokenizer.get_vocab().items()}
    student_ids = {i: t for t, i in student_tokenizer.get_vocab().items()}
    shared = min(len(teacher_tokenizer), len(student_tokenizer))
    for i in range(shared):
        if teacher_ids.get(i) != student_ids.get(i):
            return f"at id {i} ({teacher_ids.get(i)!r} vs {student_ids.get(i)!r})"
    ordinary = lambda tokenizer: len(tokenizer.get_vocab()) - len(getattr(tokenizer, "get_added_vocab", dict)())
    teacher_size, student_size = ordinary(teacher_tokenizer), ordinary(student_tokenizer)
    if teacher_size != student_size:
        return f"in size ({teacher_size:,} ordinary tokens vs {student_size:,})"
    return None


def check_tokenizers(teacher_tokenizer, student_tokenizer) -> None:
    """Teacher and student must map tokens to the same ids over their shared range (where the job cannot pair them)."""
    difference = tokenizer_difference(teacher_tokenizer, student_tokenizer)
    if difference:
        raise ConfigError(f"teacher and student tokenizers differ {difference}; use a student with the teacher's tokenizer "
                          "(student.path or student.architecture)")


def shared_vocab_size(teacher, student, tokenizer, *, truncate_vocab: bool) -> int:
    """The logit width that teacher and student are compared on.

    A teacher whose embedding matrix is padded beyond the student's (32001 vs 32000, 152064 vs
    151936) is cut to the student's width when allowed; the padding rows are never targets.
    """
    teacher_vocab, student_vocab = output_vocab(teacher), output_vocab(student)
    if student_vocab < len(tokenizer):
        raise ConfigError(f"the student's vocabulary ({student_vocab}) is smaller than its tokenizer ({len(tokenizer)}); use a matching student")
    if teacher_vocab == student_vocab:
        return student_vocab
    shared = min(teacher_vocab, student_vocab)
    if not truncate_vocab:
        raise ConfigError(f"teacher vocabulary ({teacher_vocab}) and student vocabulary ({student_vocab}) differ; set teacher.truncate_vocab=true to compare them on the first {shared} ids")
    if shared < len(tokenizer):
        raise ConfigError(f"the teacher's vocabulary ({teacher_vocab}) is smaller than the tokenizer ({len(tokenizer)}); teacher and student cannot be paired")
    return shared


def teacher_config(cfg: TeacherConfig):
    from transformers import AutoConfig  # start-up time: transformers loads only when this runs

    return _pretrained(AutoConfig, cfg.path, "teacher.path", revision=cfg.revision)


def check_seq_len(config, seq_len: int, who: str) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the {who}'s maximum of {limit} positions; lower data.seq_len")


def bytes_on_disk(path: str | os.PathLike | None) -> int | None:
    """Bytes of the weight files in a local model directory (None for a hub id)."""
    if path is None:
        return None
    root = Path(os.path.expanduser(str(path)))
    if not root.is_dir():
        return None
    return sum(p.stat().st_size for p in root.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
