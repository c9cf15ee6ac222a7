"""The job's configuration: one typed dataclass tree, loaded from YAML with dotted overrides.

Every field's ``help`` metadata is its one-line documentation and its ``--help`` text. Loading
checks keys, types and values before any model is touched, and every error names the key to
change. This module imports nothing heavy so that the launcher can use it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from distill.errors import ConfigError  # noqa: F401  (re-exported: the config's error type)
from distill.redaction import SECRET_MARKERS, redact, secret_values  # noqa: F401  (re-exported)
from distill.rundir import write_atomic


def option(default: Any, help: str) -> Any:
    """A config field with a default and its one-line help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


Dtype = Literal["float32", "bfloat16", "float16"]
LossKind = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


@dataclass
class TeacherConfig:
    path: str = option("", "Local directory or hub id of the teacher causal LM (and its tokenizer).")
    dtype: Dtype = option("bfloat16", "Dtype the teacher's weights are loaded in (the compute dtype when quantized).")
    quantization: Literal["none", "8bit", "4bit"] = option("none", "Load the teacher quantized through bitsandbytes: none, 8bit or 4bit.")
    quant_type: Literal["nf4", "fp4"] = option("nf4", "4-bit data type (teacher.quantization=4bit).")
    double_quant: bool = option(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    truncate_vocab: bool = option(True, "Allow a teacher whose embedding matrix is padded beyond the student's vocabulary to be cut to the shared length (only when the token maps agree).")
    revision: Optional[str] = option(None, "Hub revision (branch, tag or commit) of the teacher; ignored for local paths.")
    source: Literal["model", "cache", "remote"] = option("model", "Where the teacher's signal comes from: model (the teacher runs in every training process), cache (its top-k targets from a store built by distill cache-teacher) or remote (a teacher pool started with distill serve-teacher, at teacher.url); with cache and remote the teacher is not loaded for training.")
    cache_tail: Literal["bucket", "uniform"] = option("bucket", "teacher.source=cache: how the loss treats the teacher's mass outside the stored top k: bucket (one bucket against the student's remaining mass; exact on the k + 1 buckets) or uniform (spread evenly over the other ids, a dense target).")
    url: str = option("", "teacher.source=remote: the teacher pool's URL (distill serve-teacher prints it), e.g. http://node1:8765; several, comma-separated, are used in turn.")
    token_file: str = option("", "teacher.source=remote: a file holding the pool's token (else $DISTILL_TEACHER_TOKEN); the token itself never goes in a config.")
    remote_timeout: float = option(300.0, "teacher.source=remote: seconds the students keep retrying a pool that does not answer (restarting, overloaded) before they save a checkpoint and stop.")
    prefetch: int = option(1, "teacher.source=remote: optimizer steps whose targets are requested ahead, while the current one computes (0: none).")
    cache: str = option("", "The teacher store of teacher.source=cache (a directory written by distill cache-teacher); empty: the store built for this job's teacher and data under $DISTILL_CACHE_DIR/teacher (default ~/.cache/distill/teacher).")


@dataclass
class LoraConfig:
    r: int = option(16, "LoRA rank.")
    alpha: float = option(32.0, "LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = option(0.05, "Dropout on the LoRA input.")
    target_modules: list = option(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "Names of the Linear modules that get adapters.")
    modules_to_save: list = option([], "Modules trained in full and saved with the adapter (e.g. lm_head).")
    merge: bool = option(False, "Save the merged full model as student/ (the adapter then goes to adapter/); otherwise student/ is the adapter.")


@dataclass
class StudentConfig:
    path: Optional[str] = option(None, "Local directory or hub id of a pretrained student; leave empty to build a new one from student.architecture.")
    architecture: dict = option({}, "Config fields (e.g. num_hidden_layers, hidden_size) overriding the teacher's config for a new, randomly initialized student that uses the teacher's tokenizer.")
    revision: Optional[str] = option(None, "Hub revision of the pretrained student; ignored for local paths.")
    init: Literal["random", "teacher_layers"] = option("random", "How a new student (student.architecture) starts: random, or teacher_layers (a copy of the teacher keeping only student.init_layers, with its embeddings and head; DistilBERT).")
    init_layers: list = option([], "Teacher layers (1-based) a teacher_layers student keeps, in order; default: student.architecture.num_hidden_layers evenly spaced from the first (every other layer for half the depth).")
    init_from: Optional[str] = option(None, "The model whose layers a teacher_layers student keeps, when not the teacher itself: e.g. the teacher's pretrained checkpoint before fine-tuning (DistilBERT starts from the pretrained BERT). It must share the teacher's tokenizer and labels.")
    prune: dict = option({}, "Or: build the student by structurally pruning the (full-precision) teacher to these sizes, ranked on training batches: num_hidden_layers, num_attention_heads, intermediate_size, hidden_size.")
    prune_calibration_batches: int = option(8, "Training micro-batches used to rank what student.prune removes.")
    lora: Optional[LoraConfig] = option(None, "Train LoRA adapters (peft) on a pretrained student (student.path) instead of all its weights; the base stays frozen.")
    quantization: Literal["none", "8bit", "4bit"] = option("none", "Load the pretrained student's frozen base quantized (QLoRA with student.lora).")


@dataclass
class DataConfig:
    train_files: list = option([], "Local training files (.txt, .json, .jsonl, .parquet, .csv); or use data.dataset.")
    validation_files: list = option([], "Local validation files; when empty, data.validation_split of the training data is held out.")
    dataset: Optional[str] = option(None, "A `save_to_disk` directory or a hub dataset name, used instead of data.train_files.")
    dataset_config: Optional[str] = option(None, "Hub dataset configuration name (data.dataset).")
    train_split: str = option("train", "Split of data.dataset used for training.")
    validation_split_name: Optional[str] = option(None, "Split of data.dataset used for validation; when empty, data.validation_split is held out.")
    validation_split: float = option(0.05, "Fraction of the training data held out for validation when no validation data is given.")
    text_unit: Literal["line", "paragraph", "document"] = option("paragraph", "How .txt files are split into documents: per line, per blank-line-separated paragraph, or one per file.")
    text_field: str = option("text", "Column holding the text (the completion, when data.prompt_field is set).")
    messages_field: Optional[str] = option(None, "Column holding conversations (lists of {role, content}, as TRL's messages) instead of text: rendered with the chat template, targets on the assistant turns only.")
    chat_template: Optional[str] = option(None, "Jinja chat template (or a file holding one) for data.messages_field, for tokenizers without their own.")
    text_pair_field: Optional[str] = option(None, "Column holding the second text of a pair (task.kind=sequence_classification).")
    label_field: str = option("label", "Column holding the class (task.kind=sequence_classification): an id, or a name in the teacher's label2id.")
    prompt_field: Optional[str] = option(None, "Column holding a prompt that is fed to the models but masked out of the loss.")
    seq_len: int = option(512, "Tokens per training sequence.")
    packing: bool = option(True, "Concatenate documents (separated by EOS) into full seq_len blocks instead of padding each one.")
    seed: int = option(0, "Seed of the deterministic shuffle of training data.")
    max_validation_sequences: int = option(256, "Evaluate on at most this many validation sequences (per source of a mixture).")
    mixture: list = option([], "Several named sources sampled by weight, instead of data.train_files/data.dataset: [{name: code, weight: 0.7, train_files: [...], validation_files: [...]}, ...]; each source may also set its own dataset, splits, text_unit and fields. Validation is reported per source.")


LOGITS = "logits"  # the teacher output a logit term asks for, and that term's kind
TERM_KEYS = {
    LOGITS: {"kind", "name", "weight", "divergence", "temperature", "jsd_beta", "skew_alpha"},
    "ce": {"kind", "name", "weight"},
    "hidden": {"kind", "name", "weight", "layers", "embeddings", "distance", "projection"},
    "attention": {"kind", "name", "weight", "layers", "mode", "relation_heads"},
}


@dataclass
class LossConfig:
    kind: LossKind = option("forward_kl", "Distillation divergence: forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl or tvd.")
    temperature: float = option(1.0, "Softmax temperature applied to both teacher and student logits in the KD term.")
    alpha: float = option(0.0, "Weight of the hard-label cross-entropy: loss = alpha*CE + (1-alpha)*T^2*KD. alpha=1 trains without a teacher (the baseline).")
    terms: list = option([], "The objective as named, weighted terms, e.g. [{kind: logits, divergence: jsd, weight: 0.7, temperature: 2}, {kind: ce, weight: 0.3}]; loss.kind/loss.alpha are its shorthand. Kinds: logits (a divergence, with temperature), ce (hard labels), hidden (hidden states of mapped layers: layers uniform or [[s, t], ...], distance mse or cosine, a learned projection when widths differ), attention (attention maps, or MiniLMv2 relations when head counts differ).")
    jsd_beta: float = option(0.5, "Teacher weight beta of the mixture in the generalized JSD (loss.kind=jsd); 0 = forward KL, 1 = reverse KL.")
    skew_alpha: float = option(0.1, "Skew alpha of the skewed KLs (loss.kind=skew_*), as in DistiLLM.")
    chunk_size: int = option(0, "Tokens per chunk when computing logit terms, bounding the float32 memory of their logits; 0: about 4M logits per chunk (2^22 // vocabulary tokens).")
    fused: Literal["auto", "always", "never"] = option("auto", "Compute logit terms chunk by chunk from the output layers' inputs and weights, never holding [tokens, vocab] logits: auto (for language-model tasks whose student output layer is a plain Linear), always (an error otherwise) or never (full logits).")


@dataclass
class TrainConfig:
    optimizer: Literal["adamw", "adamw_8bit"] = option("adamw", "Optimizer: adamw (torch) or adamw_8bit (bitsandbytes).")
    lr: float = option(3e-4, "Peak learning rate.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    betas: list = option([0.9, 0.95], "AdamW betas.")
    scheduler: Literal["constant", "linear", "cosine"] = option("cosine", "Learning-rate schedule after warm-up: constant, linear or cosine decay to zero.")
    warmup_steps: int = option(0, "Linear warm-up steps.")
    micro_batch_size: int = option(8, "Sequences per forward pass per process.")
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step.")
    max_steps: int = option(1000, "Optimizer steps to train.")
    seed: int = option(0, "Seed of model initialization and every random number generator.")
    precision: Literal["fp32", "bf16", "fp16"] = option("fp32", "Mixed precision of the student's forward/backward: fp32, bf16 or fp16 (fp16 needs a GPU).")
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this value; 0 disables clipping.")
    log_every: int = option(10, "Log metrics every N optimizer steps.")
    eval_every: int = option(0, "Evaluate on the validation set every N steps (0: only at the end).")
    save_every: int = option(0, "Save a checkpoint every N steps (0: never).")
    keep_checkpoints: int = option(2, "Keep only the newest N complete checkpoints.")
    stop_grace_seconds: float = option(30.0, "Seconds between SIGTERM and SIGKILL (SLURM's KillWait): on SIGTERM a checkpoint is saved only if the last save took less than this.")
    on_nonfinite: Literal["stop", "skip"] = option("stop", "What to do with a NaN/inf loss: stop with an error, or skip that step.")
    cpu_allocator: Literal["cached", "system"] = option("cached", "On CPU under glibc (Linux): cached keeps freed tensor memory in the process (blocks up to 32 MiB come from the heap, and up to 1 GiB of freed heap is kept), sparing the page faults of allocating each step's tensors afresh (a sixth of a KD step on the tiny default); system leaves glibc's defaults. No effect on GPU runs or elsewhere.")


@dataclass
class LmEvalConfig:
    tasks: list = option([], "lm-evaluation-harness task names, run on every model of the report (teacher, student, quantized students).")
    include_path: list = option([], "Folders of lm-eval task YAML files (tasks with local data files: what works offline); searched before the registry.")
    num_fewshot: Optional[int] = option(None, "Few-shot examples per prompt (default: each task's own).")
    limit: Optional[float] = option(None, "At most this many examples per task (a fraction of each task when below 1).")
    batch_size: int = option(8, "Batch size of the harness's forward passes.")
    bootstrap_iters: int = option(1000, "Bootstrap resamples for the standard errors of metrics that need them.")


@dataclass
class EvalConfig:
    at_end: bool = option(True, "Evaluate and write eval.json/report.md after training.")
    baseline: str = option("", "A finished run directory whose student is shown as the report's baseline row: typically the same student trained on the same data for the same steps without the teacher (loss.alpha=1). Shown only when its student, data and steps match this job's.")
    initial: bool = option(True, "Also evaluate the student before training (the 'untrained' row of the report).")
    teacher_fidelity: bool = option(True, "For a quantized teacher, also load it in full precision and report KL(full || quantized).")
    speed: bool = option(True, "Measure latency and throughput of teacher and student.")
    latency_new_tokens: int = option(32, "Tokens generated (greedy, batch 1) when measuring latency.")
    throughput_batch_size: int = option(8, "Batch size of the forward passes that measure throughput.")
    speed_repeats: int = option(3, "Timed repetitions of each speed measurement (after one warm-up).")
    metrics: list = option([], "Further metrics for the report, computed on the same predictions and references as accuracy: paths of evaluate metric modules (offline) or hub names (online), e.g. [./my_f1.py].")
    quantize: list = option([], "Post-training quantization of the final student, one report row each: bnb_8bit, bnb_4bit, int8_weight_only, int8_dynamic.")
    lm_eval: Optional[LmEvalConfig] = option(None, "Downstream benchmarks through lm-evaluation-harness (needs pip install lm-eval), e.g. {tasks: [hellaswag], limit: 200}.")
    speculative: bool = option(False, "Measure each student as the teacher's draft model (assisted generation, greedy, batch 1): accepted tokens per step, acceptance rate, speedup.")
    speculative_prompts: int = option(8, "Validation prompts for the speculative-decoding measurement.")
    speculative_new_tokens: int = option(48, "Tokens generated per prompt in the speculative-decoding measurement.")


@dataclass
class TrackingConfig:
    backend: Literal["wandb", "tensorboard", "mlflow", "none"] = option("wandb", "Experiment tracker: wandb (offline when no API key is configured), tensorboard, mlflow or none. metrics.jsonl is always written.")
    project: str = option("distill", "Tracker project (W&B project, MLflow experiment).")
    run_name: Optional[str] = option(None, "Run name; defaults to the run directory's name.")
    mlflow_tracking_uri: Optional[str] = option(None, "MLflow tracking URI; defaults to a local store in the run directory.")
    group: Optional[str] = option(None, "Run group (W&B group, MLflow tag distill.group); distill sweep sets it to the sweep's name. WANDB_RUN_GROUP wins.")
    tags: list = option([], "Tags of the run (W&B tags, MLflow tags). WANDB_TAGS (comma-separated) wins.")
    job_type: Optional[str] = option(None, "W&B job type (e.g. distill, baseline). WANDB_JOB_TYPE wins.")
    notes: Optional[str] = option(None, "A sentence about the run (W&B notes, MLflow description). WANDB_NOTES wins.")
    system_metrics: bool = option(True, "Record system metrics (CPU, GPU, memory) in W&B.")
    log_model: Literal["false", "end", "checkpoints"] = option("false", "Upload the model to the tracker (W&B artifact, MLflow artifacts): false, end (the final student or adapter) or checkpoints (each checkpoint as it is saved).")


@dataclass
class TaskConfig:
    kind: Literal["causal_lm", "masked_lm", "sequence_classification"] = option("causal_lm", "What is distilled: causal_lm (next-token prediction), masked_lm (the distribution at masked tokens, DistilBERT) or sequence_classification (a classifier's class distribution). masked_lm and sequence_classification never pack: one text per sequence.")
    mask_rate: float = option(0.15, "task.kind=masked_lm: fraction of tokens masked (80% [MASK], 10% a random token, 10% kept), fixed per sequence.")
    mask_seed: int = option(0, "task.kind=masked_lm: seed of the masking; each sequence's mask depends only on it, the split and the row.")


@dataclass
class DistillConfig:
    task: TaskConfig = field(default_factory=TaskConfig, metadata={"help": "The task: model class, targets and metrics."})
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={"help": "The frozen teacher."})
    student: StudentConfig = field(default_factory=StudentConfig, metadata={"help": "The student that is trained."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Training and validation data."})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "The distillation objective."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Optimization and checkpointing."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation and the report."})
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"help": "Experiment tracking."})
    output_dir: str = option("runs/distill", "Run directory: config, metrics, checkpoints, the student and the report.")


# ----------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> DistillConfig:
    """Loads a YAML config, applies ``key.sub=value`` overrides, checks and returns it."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise ConfigError(f"malformed YAML in {path}{where}: {getattr(err, 'problem', err)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (teacher:, student:, ...)")
    for item in overrides:
        apply_override(data, item)
    cfg = from_dict(DistillConfig, data, prefix="")
    validate(cfg)
    return cfg


def apply_override(data: dict, item: str) -> None:
    """Sets ``data[a][b] = value`` for ``item = "a.b=value"`` (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key.sub=value, got {item!r}")
    parts = key.strip().split(".")
    lookup_field(parts)  # fails on unknown keys, naming them
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = raw


def lookup_field(parts: list[str]) -> dataclasses.Field:
    """The field of the dotted key ``parts`` (["loss", "alpha"]); a ConfigError naming the key when there is none."""
    cls: Any = DistillConfig
    found = None
    for i, part in enumerate(parts):
        if cls is dict:  # free-form mapping (student.architecture): any sub-key
            return found
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            raise ConfigError(f"unknown config key: {'.'.join(parts[: i + 1])}")
        found = fields[part]
        cls = typing.get_type_hints(cls)[part]
        if typing.get_origin(cls) in (typing.Union, types.UnionType):  # Optional[Section]
            cls = next(a for a in typing.get_args(cls) if a is not type(None))
    return found


def from_dict(cls: type, data: Any, prefix: str) -> Any:
    """Builds dataclass ``cls`` from a mapping, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key: {prefix}{key}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if origin is Literal:
        if isinstance(value, bool) and str(value).lower() in args:  # YAML reads a bare false as a bool
            value = str(value).lower()
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))} (got {value!r})")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if hint is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")  # a bug in this file, not user input


# ----------------------------------------------------------------------------- validation


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: DistillConfig) -> None:
    """Checks values that types alone do not; messages name the option to change."""
    t, s, d, lo, tr, ev = cfg.teacher, cfg.student, cfg.data, cfg.loss, cfg.train, cfg.eval
    _check(bool(t.path), "teacher.path is required (a local model directory or a hub id)")
    if s.init == "teacher_layers":
        _check(bool(s.architecture) or bool(s.init_layers), "student.init=teacher_layers needs student.init_layers or student.architecture.num_hidden_layers")
        _check(set(s.architecture) <= {"num_hidden_layers"}, "student.init=teacher_layers keeps the teacher's widths; student.architecture may set "
               f"only num_hidden_layers (got {', '.join(sorted(s.architecture))})")
        _check(all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in s.init_layers),
               f"student.init_layers must list teacher layers as integers >= 1 (got {s.init_layers!r})")
        if s.init_layers and "num_hidden_layers" in s.architecture:
            _check(len(s.init_layers) == s.architecture["num_hidden_layers"], "student.init_layers and student.architecture.num_hidden_layers disagree; set one")
    else:
        _check(not s.init_layers, "student.init_layers needs student.init=teacher_layers")
        _check(not s.init_from, "student.init_from needs student.init=teacher_layers")
    _check(sum(map(bool, (s.path, s.architecture or s.init_layers, s.prune))) == 1, "set exactly one of student.path, student.architecture and student.prune")
    prunable = {"num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_size"}
    for key, value in s.prune.items():
        _check(key in prunable, f"student.prune.{key}: not prunable; use {', '.join(sorted(prunable))}")
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"student.prune.{key} must be an integer >= 1 (got {value!r})")
    _check(s.prune_calibration_batches > 0, "student.prune_calibration_batches must be > 0")
    if s.lora is not None:
        _check(bool(s.path), "student.lora needs a pretrained base: set student.path")
        _check(s.lora.r > 0 and s.lora.alpha > 0, "student.lora.r and student.lora.alpha must be > 0")
        _check(0.0 <= s.lora.dropout < 1.0, f"student.lora.dropout must be in [0, 1) (got {s.lora.dropout})")
        _check(bool(s.lora.target_modules), "student.lora.target_modules must name at least one module")
    _check(s.quantization == "none" or s.lora is not None, "student.quantization needs student.lora: a quantized base can only train adapters")
    for key, value in s.architecture.items():
        _check(isinstance(key, str), f"student.architecture: keys must be config field names, got {key!r}")
        if isinstance(value, int) and not isinstance(value, bool) and key.startswith("num_"):
            _check(value > 0, f"student.architecture.{key} must be > 0 (got {value})")
    if d.mixture:
        _check(not d.train_files and not d.dataset, "set data.mixture or data.train_files/data.dataset, not both (each source names its own files)")
        check_mixture(d)
    else:
        _check(bool(d.train_files) != bool(d.dataset), "set exactly one of data.train_files and data.dataset")
    _check(all(isinstance(f, str) for f in d.train_files + d.validation_files), "data.train_files and data.validation_files must list file paths")
    _check(d.seq_len >= 2, f"data.seq_len must be >= 2 (got {d.seq_len})")
    _check(0.0 <= d.validation_split < 1.0, f"data.validation_split must be in [0, 1) (got {d.validation_split})")
    _check(d.max_validation_sequences > 0, "data.max_validation_sequences must be > 0")
    _check(lo.temperature > 0 and math.isfinite(lo.temperature), f"loss.temperature must be > 0 (got {lo.temperature})")
    _check(0.0 <= lo.alpha <= 1.0, f"loss.alpha must be in [0, 1] (got {lo.alpha})")
    _check(0.0 <= lo.jsd_beta <= 1.0, f"loss.jsd_beta must be in [0, 1] (got {lo.jsd_beta})")
    _check(0.0 <= lo.skew_alpha < 1.0, f"loss.skew_alpha must be in [0, 1) (got {lo.skew_alpha})")
    _check(lo.chunk_size >= 0, f"loss.chunk_size must be >= 0 (got {lo.chunk_size}; 0 sizes chunks by the vocabulary)")
    check_terms(lo)
    if t.source in ("cache", "remote"):
        holder, verb = {"cache": ("the store", "holds"), "remote": ("the teacher pool", "serves")}[t.source]
        _check(cfg.task.kind in ("causal_lm", "masked_lm"), f"teacher.source={t.source} {verb} token targets of language models; task.kind={cfg.task.kind} needs teacher.source=model")
        for i, spec in enumerate(loss_terms(lo)):
            _check(spec.get("kind") in (LOGITS, "ce") or not float(spec.get("weight", 1.0)),
                   f"loss.terms[{i}]: a {spec.get('kind')} term needs the teacher's features, which {holder} does not {'hold' if t.source == 'cache' else 'give'}; use teacher.source=model")
    if t.source == "remote":
        _check(bool(t.url.strip()), "teacher.source=remote needs teacher.url (the URL distill serve-teacher prints)")
        for url in t.url.split(","):
            _check(url.strip().startswith(("http://", "https://")), f"teacher.url: {url.strip()!r} is not an http:// or https:// URL")
        _check(t.remote_timeout > 0, f"teacher.remote_timeout must be > 0 (got {t.remote_timeout})")
        _check(t.prefetch >= 0, f"teacher.prefetch must be >= 0 (got {t.prefetch})")
    _check(0.0 < cfg.task.mask_rate < 1.0, f"task.mask_rate must be in (0, 1) (got {cfg.task.mask_rate})")
    if cfg.task.kind != "causal_lm":
        _check(not s.prune, f"student.prune supports task.kind=causal_lm only; build the {cfg.task.kind} student with student.architecture or student.path")
        _check(ev.lm_eval is None and not ev.speculative, f"eval.lm_eval and eval.speculative measure generative language models; unset them for task.kind={cfg.task.kind}")
    _check(not (d.messages_field and d.prompt_field), "set data.messages_field or data.prompt_field, not both: a conversation's prompt is its non-assistant turns")
    _check(not d.messages_field or cfg.task.kind == "causal_lm", "data.messages_field is for task.kind=causal_lm")
    if cfg.task.kind == "sequence_classification":
        _check(d.prompt_field is None, "data.prompt_field is for causal_lm; a classifier's second text goes in data.text_pair_field")
    _check(tr.lr > 0 and math.isfinite(tr.lr), f"train.lr must be > 0 (got {tr.lr})")
    _check(tr.weight_decay >= 0, f"train.weight_decay must be >= 0 (got {tr.weight_decay})")
    _check(len(tr.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in tr.betas), f"train.betas must be two numbers in [0, 1) (got {tr.betas})")
    _check(tr.micro_batch_size > 0, f"train.micro_batch_size must be > 0 (got {tr.micro_batch_size})")
    _check(tr.grad_accum > 0, f"train.grad_accum must be > 0 (got {tr.grad_accum})")
    _check(tr.max_steps > 0, f"train.max_steps must be > 0 (got {tr.max_steps})")
    _check(0 <= tr.warmup_steps <= tr.max_steps, f"train.warmup_steps must be in [0, train.max_steps] (got {tr.warmup_steps})")
    _check(tr.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0 (got {tr.max_grad_norm})")
    for name in ("log_every", "eval_every", "save_every"):
        _check(getattr(tr, name) >= 0, f"train.{name} must be >= 0")
    _check(tr.log_every > 0, "train.log_every must be > 0")
    _check(tr.stop_grace_seconds >= 0, f"train.stop_grace_seconds must be >= 0 (got {tr.stop_grace_seconds})")
    _check(tr.keep_checkpoints > 0, f"train.keep_checkpoints must be > 0 (got {tr.keep_checkpoints})")
    _check(ev.latency_new_tokens > 0 and ev.throughput_batch_size > 0 and ev.speed_repeats > 0, "eval.latency_new_tokens, eval.throughput_batch_size and eval.speed_repeats must be > 0")
    _check(ev.speculative_prompts > 0 and ev.speculative_new_tokens > 0, "eval.speculative_prompts and eval.speculative_new_tokens must be > 0")
    if ev.lm_eval is not None:
        _check(bool(ev.lm_eval.tasks), "eval.lm_eval.tasks must name at least one task")
        _check(all(isinstance(t, str) for t in ev.lm_eval.tasks), "eval.lm_eval.tasks must be task names")
        _check(ev.lm_eval.batch_size > 0, "eval.lm_eval.batch_size must be > 0")
        _check(ev.lm_eval.limit is None or ev.lm_eval.limit > 0, "eval.lm_eval.limit must be > 0")
        _check(ev.lm_eval.num_fewshot is None or ev.lm_eval.num_fewshot >= 0, "eval.lm_eval.num_fewshot must be >= 0")
    _check(bool(cfg.output_dir), "output_dir must not be empty")
    methods = ("bnb_8bit", "bnb_4bit", "int8_weight_only", "int8_dynamic")
    for method in ev.quantize:
        _check(method in methods, f"eval.quantize: unknown method {method!r}; use {', '.join(methods)}")


TINY_DIR = "~/.cache/distill/tiny"


def tiny_hint(path: str) -> str:
    """A hint for a missing file of the bundled tiny default, which `distill prepare-tiny` builds."""
    tiny = Path(os.path.expanduser(TINY_DIR))
    local = Path(os.path.expanduser(path))
    return "; build the bundled tiny default first with: distill prepare-tiny" if local == tiny or tiny in local.parents else ""


# ----------------------------------------------------------------------------- the objective


def loss_terms(cfg: LossConfig) -> list[dict]:
    """``loss.terms`` with names filled in, or the terms the ``loss.kind`` / ``loss.alpha`` shorthand stands for."""
    if not cfg.terms:
        return [{"kind": LOGITS, "name": "kd", "divergence": cfg.kind, "weight": 1.0 - cfg.alpha}, {"kind": "ce", "name": "ce", "weight": cfg.alpha}]
    return [{**spec, "name": spec.get("name", "kd" if spec.get("kind") == LOGITS else spec.get("kind"))} if isinstance(spec, dict) else spec
            for spec in cfg.terms]


MIXTURE_SOURCE_KEYS = {"name", "weight", "train_files", "validation_files", "dataset", "dataset_config", "train_split", "validation_split_name",
                       "validation_split", "text_unit", "text_field", "prompt_field", "messages_field", "chat_template", "label_field",
                       "text_pair_field"}


def check_mixture(cfg: DataConfig) -> None:
    """Fails at load time, naming ``data.mixture[i].key``, on a source that cannot be read."""
    names = set()
    for i, source in enumerate(cfg.mixture):
        key = f"data.mixture[{i}]"
        _check(isinstance(source, dict), f"{key}: expected a mapping such as {{name: code, weight: 1, train_files: [a.txt]}}, got {source!r}")
        for name in source:
            _check(name in MIXTURE_SOURCE_KEYS, f"unknown config key: {key}.{name} (a source takes {', '.join(sorted(MIXTURE_SOURCE_KEYS))})")
        _check(isinstance(source.get("name"), str) and source["name"], f"{key}.name: each source needs a name")
        _check(source["name"] not in names, f"{key}.name: {source['name']!r} is used twice")
        names.add(source["name"])
        weight = source.get("weight", 1.0)
        _check(not isinstance(weight, bool) and isinstance(weight, (int, float)) and weight > 0, f"{key}.weight must be a number > 0 (got {weight!r})")
        _check(bool(source.get("train_files")) != bool(source.get("dataset")), f"{key}: set exactly one of train_files and dataset")


def teacher_needed(cfg: LossConfig) -> bool:
    """Whether a term with a weight asks the teacher for anything (every kind but ce does)."""
    return any(spec["kind"] != "ce" and float(spec.get("weight", 1.0)) > 0 for spec in loss_terms(cfg))


def check_terms(cfg: LossConfig) -> None:
    """Fails at load time, naming ``loss.terms[i].key``, on anything a term cannot be built from."""
    if cfg.terms and (cfg.kind != "forward_kl" or cfg.alpha != 0.0):
        raise ConfigError("set either loss.terms or the shorthand loss.kind / loss.alpha, not both "
                          "(the shorthand is [{kind: logits, divergence: KIND, weight: 1-alpha}, {kind: ce, weight: alpha}])")
    names = set()
    for i, spec in enumerate(loss_terms(cfg)):
        key = f"loss.terms[{i}]"
        if not isinstance(spec, dict):
            raise ConfigError(f"{key}: expected a mapping such as {{kind: logits, weight: 0.5}}, got {spec!r}")
        kind = spec.get("kind")
        if kind not in TERM_KEYS:
            raise ConfigError(f"{key}.kind: must be one of {', '.join(TERM_KEYS)} (got {kind!r})")
        for name in spec:
            if name not in TERM_KEYS[kind]:
                raise ConfigError(f"unknown config key: {key}.{name} (a {kind} term takes {', '.join(sorted(TERM_KEYS[kind]))})")
        weight = spec.get("weight", 1.0)
        _check(not isinstance(weight, bool) and isinstance(weight, (int, float)) and weight >= 0, f"{key}.weight must be a number >= 0 (got {weight!r})")
        if kind == LOGITS:
            kinds = typing.get_args(LossKind)
            _check(spec.get("divergence", cfg.kind) in kinds, f"{key}.divergence: must be one of {', '.join(kinds)} (got {spec.get('divergence')!r})")
            temperature = spec.get("temperature", cfg.temperature)
            _check(not isinstance(temperature, bool) and isinstance(temperature, (int, float)) and temperature > 0,
                   f"{key}.temperature must be > 0 (got {temperature!r})")
        if kind == "hidden":
            _check(spec.get("distance", "mse") in ("mse", "cosine"), f"{key}.distance: must be mse or cosine (got {spec.get('distance')!r})")
            for flag in ("embeddings", "projection"):
                _check(isinstance(spec.get(flag, False), bool), f"{key}.{flag} must be true or false (got {spec.get(flag)!r})")
        if kind == "attention":
            _check(spec.get("mode", "auto") in ("auto", "maps", "relations"), f"{key}.mode: must be auto, maps or relations (got {spec.get('mode')!r})")
            heads = spec.get("relation_heads", 1)
            _check(not isinstance(heads, bool) and isinstance(heads, int) and heads > 0, f"{key}.relation_heads must be an integer > 0 (got {heads!r})")
        if kind in ("hidden", "attention"):
            layers = spec.get("layers", "uniform")
            _check(layers == "uniform" or isinstance(layers, list), f"{key}.layers: expected 'uniform' or a list of [student_layer, teacher_layer] pairs (got {layers!r})")
        _check(spec["name"] not in names, f"{key}.name: {spec['name']!r} is used twice; give each term its own name")
        names.add(spec["name"])


# ----------------------------------------------------------------------------- DeepSpeed


# Sections of a DeepSpeed config that this job owns: it builds the optimizer and the schedule
# from train.*, so DeepSpeed's own would silently train with other settings.
JOB_OWNED_DS_SECTIONS = {"optimizer": "train.optimizer, train.lr, train.betas and train.weight_decay",
                         "scheduler": "train.scheduler and train.warmup_steps"}


def read_ds_config(path: str | os.PathLike) -> dict:
    """A user's DeepSpeed config: a JSON object without the sections the job owns."""
    import json

    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"--ds-config {path}: not valid JSON ({err})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--ds-config {path}: expected a JSON object of DeepSpeed settings")
    for section, owner in JOB_OWNED_DS_SECTIONS.items():
        if section in ds:
            raise ConfigError(f"--ds-config {path} has an \"{section}\" section; distill builds it from {owner}: "
                              "remove the section from the DeepSpeed config and set those options instead")
    return ds


# ----------------------------------------------------------------------------- output


def to_dict(cfg: DistillConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: DistillConfig, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML, with credentials redacted."""
    write_atomic(Path(path), yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False))


def iter_options(cls: type = DistillConfig, prefix: str = ""):
    """Yields (dotted key, default, help) for every leaf option, for --help."""
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if dataclasses.is_dataclass(hint):
            yield from iter_options(hint, prefix + f.name + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield prefix + f.name, default, f.metadata.get("help", "")
