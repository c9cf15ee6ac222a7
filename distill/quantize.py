"""Post-training quantization of the distilled student, evaluated like everything else.

Methods:

- ``bnb_8bit``, ``bnb_4bit``: bitsandbytes LLM.int8 and NF4 (double quantization) weights,
  through transformers' ``BitsAndBytesConfig``; for GPU serving, and they shrink memory.
- ``int8_weight_only``, ``int8_dynamic``: torchao int8 weights (and, for dynamic, int8
  activations quantized on the fly), through transformers' ``TorchAoConfig``. torchao is the
  maintained path: PyTorch's own ``torch.ao.quantization`` eager API is deprecated in its favour.
  These speed up CPU inference.

Each method loads ``RUN_DIR/student``, saves the quantized model to ``RUN_DIR/quantized/METHOD``
(``save_pretrained``, loadable with ``from_pretrained``), and evaluates it with the same code as
the teacher and the student; a row per method joins ``eval.json`` and ``report.md``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from distill import evaluation, models
from distill.config import ConfigError
from distill.models import auto_class
from distill.progress import phase
from distill.rundir import RunDir, write_dir_atomic
from distill.tasks import CausalLM

METHODS = ("bnb_8bit", "bnb_4bit", "int8_weight_only", "int8_dynamic")


def quantization_config(method: str):
    """transformers' quantization config for ``method``; a clear error when its library is missing."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if method.startswith("bnb"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"--method {method} needs bitsandbytes: pip install bitsandbytes") from None
        from transformers import BitsAndBytesConfig  # start-up time: transformers loads only when this runs

        if method == "bnb_8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig  # optional dependency (distill[quantize])
    except ImportError:
        raise ConfigError(f"--method {method} needs torchao: pip install 'distill[quantize]' (or pip install torchao)") from None
    from transformers import TorchAoConfig  # start-up time: transformers loads only when this runs

    return TorchAoConfig(Int8WeightOnlyConfig() if method == "int8_weight_only" else Int8DynamicActivationInt8WeightConfig())


BNB_CPU_BLOCK = 64  # bitsandbytes' 4-bit CPU kernels pack absmax per 64 inputs of each row


def check_method_fits(model_config, method: str, *, key: str = "--method", model_class: str = "AutoModelForCausalLM") -> None:
    """Fails before any work when ``method`` cannot run this model here.

    bitsandbytes' 4-bit CPU path reshapes each weight's absmax to ``[out, in / 64]``, so every
    Linear it quantizes (all but the output layer) needs an input width that is a multiple of 64;
    otherwise inference fails deep inside bitsandbytes ("shape '[96, 1]' is invalid").
    """
    from accelerate import init_empty_weights  # start-up time: accelerate loads only when this runs

    if method != "bnb_4bit" or torch.cuda.is_available():
        return
    with init_empty_weights():
        model = auto_class(model_class).from_config(model_config)
    # The output layer stays unquantized: the LM head, or a classifier's last Linear.
    head = model.get_output_embeddings() or [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and module.in_features % BNB_CPU_BLOCK:
            raise ConfigError(f"{key} bnb_4bit: bitsandbytes' 4-bit CPU kernels need every quantized layer's input width to be a multiple of "
                              f"{BNB_CPU_BLOCK}, and {name} has {module.in_features}; on CPU use bnb_8bit, int8_weight_only or int8_dynamic "
                              "(or quantize on a GPU)")


def quantize_model(source: str | os.PathLike, output: str | os.PathLike, method: str, *, model_class: str = "AutoModelForCausalLM"):
    """Loads ``source`` quantized with ``method``, saves it to ``output`` (atomically), returns it."""
    from transformers import AutoConfig, AutoTokenizer  # start-up time: transformers loads only when this runs

    config = quantization_config(method)
    check_method_fits(AutoConfig.from_pretrained(source), method, model_class=model_class)
    model = auto_class(model_class).from_pretrained(source, dtype=torch.float32, quantization_config=config)
    def write(tmp):
        # torchao's tensor subclasses are not safetensors-serializable yet.
        model.save_pretrained(tmp, safe_serialization=method.startswith("bnb"))
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)

    write_dir_atomic(Path(output), write)
    return model.eval()


def quantized_linear_bytes(model) -> tuple[int, int]:
    """(bytes of the quantized Linear weights as stored, bytes of the same weights in float16)."""
    stored = fp16 = 0
    for module in model.modules():
        name = type(module).__name__
        if name in ("Linear4bit", "Linear8bitLt"):
            weight = module.weight
            stored += weight.numel() * weight.element_size()
            quant_state = getattr(weight, "quant_state", None)
            if quant_state is not None:  # 4-bit: absmax and nested constants travel with the weight
                stored += sum(t.numel() * t.element_size() for t in _quant_state_tensors(quant_state))
            fp16 += module.in_features * module.out_features * 2
    return stored, fp16


def _quant_state_tensors(state):
    for value in vars(state).values():
        if torch.is_tensor(value):
            yield value
        elif hasattr(value, "absmax"):
            yield from _quant_state_tensors(value)


def quantized_rows(run_dir: Path, methods: list[str], *, teacher, validation, vocab: int, device, eval_cfg, pad_id: int,
                   measure=None, task=None) -> list[dict]:
    """Quantizes RUN_DIR/student with each method and measures it like the other rows.

    Args:
        measure: ``fn(model, row name) -> fields`` of further figures (downstream benchmarks, draft model).
    """
    rows = []
    for method in methods:
        out = RunDir(run_dir).quantized / method
        try:
            with phase(f"quantizing the student ({method}) and evaluating it"):
                rows.append(_quantized_row(run_dir, out, method, teacher=teacher, validation=validation, vocab=vocab, device=device,
                                           eval_cfg=eval_cfg, pad_id=pad_id, measure=measure, task=task))
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)  # no quantized model that was never evaluated
            raise
    return rows


def _quantized_row(run_dir: Path, out: Path, method: str, *, teacher, validation, vocab: int, device, eval_cfg, pad_id: int,
                   measure=None, task=None) -> dict:

    task = task or CausalLM()
    quantized = quantize_model(RunDir(run_dir).student, out, method, model_class=task.auto_class)
    row = {"model": f"student+{method}", "params": evaluation.parameter_count(quantized), "disk_bytes": models.bytes_on_disk(out),
           "memory_bytes": quantized.get_memory_footprint(), "quantization": method,
           **evaluation.quality(quantized, teacher, validation, vocab=vocab, device=device, task=task, extra_metrics=eval_cfg.metrics)}
    if eval_cfg.speed:
        row.update(evaluation.measure_speed(quantized, validation, task=task, device=device, eval_cfg=eval_cfg, pad_id=pad_id))
    if measure is not None:
        row.update(measure(quantized, row["model"]))
    return row
