"""What the launcher that started this process asked for, read from the environment it set.

``accelerate launch``, ``deepspeed`` and ``torchrun`` say how many processes there are, whether
the student runs under DeepSpeed (and with which config) and in which precision, each in its own
environment variables; a TRL or Trainer script takes them from there, and so does the job. Where
the job's own config disagrees, one line says so and says which wins. Torch-free: :func:`request`
reads the environment, the config and the DeepSpeed config file the launch names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from distill.config import DistillConfig, read_ds_config
from distill.errors import LaunchError

# The job's train.precision as accelerate names it, and back.
PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
FROM_ACCELERATE = {accelerate: ours for ours, accelerate in PRECISION.items()}
# The world size as torchrun/deepspeed set it, then as an MPI launcher (accelerate's way of starting MULTI_CPU processes) does.
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass
class Request:
    """The launch as the job runs it: the world size the launcher started, the DeepSpeed config
    (a path, a mapping built from ``accelerate config``'s answers, or None), the launcher's name,
    and the one-line notes of where launcher and config disagreed."""

    world_size: int
    launcher: str
    ds_config: str | dict | None = None
    ds_source: str = ""
    notes: list[str] = field(default_factory=list)


def launcher_name(env) -> str:
    if "ACCELERATE_MIXED_PRECISION" in env:
        return "accelerate launch"
    if "CROSS_RANK" in env and "LOCAL_SIZE" in env:
        return "deepspeed"
    if "TORCHELASTIC_RUN_ID" in env or "LOCAL_WORLD_SIZE" in env:
        return "torchrun"
    return "no launcher" if "WORLD_SIZE" not in env else "a launcher"


def request(cfg: DistillConfig, ds_config: str | None, env=None) -> Request:
    """Reads the launcher's request from ``env`` (os.environ) and applies it to ``cfg`` (its
    precision); raises a LaunchError for a launch that cannot do what it was asked."""
    env = os.environ if env is None else env
    launcher = launcher_name(env)
    if launcher == "accelerate launch" and "MASTER_ADDR" in env and not any(k in env for k in WORLD_SIZE_VARS):
        # accelerate's simple launcher sets MASTER_ADDR only when asked for several processes, and
        # starts one: a MULTI_CPU config without mpirun would train alone, silently.
        raise LaunchError("accelerate launch started one process for a config of several: accelerate starts MULTI_CPU processes only "
                          "through mpirun (mpirun_hostfile in its config); run `distill launch --accelerate-config FILE`, which starts them, "
                          "or `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --config_file FILE ...`")
    size = next((env[k] for k in WORLD_SIZE_VARS if env.get(k)), "1")  # under mpirun, the MPI's own variable
    result = Request(world_size=int(size), launcher=launcher)
    result.ds_config, result.ds_source = _deepspeed(cfg, ds_config, env, result.notes)
    if launcher == "deepspeed" and result.ds_config is None:
        result.notes.append("the deepspeed launcher started this job without a DeepSpeed config: the student trains under plain DDP; "
                            "pass --ds-config FILE (or --deepspeed_config FILE) for ZeRO")
    _precision(cfg, env.get("ACCELERATE_MIXED_PRECISION"), result.notes)
    if result.ds_config is not None:
        ds = result.ds_config if isinstance(result.ds_config, dict) else read_ds_config(result.ds_config)
        _deepspeed_precision(cfg, ds, result.notes)
    return result


def _deepspeed(cfg: DistillConfig, ds_config: str | None, env, notes: list[str]) -> tuple[str | dict | None, str]:
    """The DeepSpeed config: the job's --ds-config, else accelerate's (its file, or its answers)."""
    from_accelerate = env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if ds_config:
        if from_accelerate and file != "none" and os.path.realpath(file) != os.path.realpath(ds_config):
            notes.append(f"DeepSpeed config: the job's --ds-config {ds_config} wins over accelerate's {file}")
        return ds_config, "--ds-config"
    if not from_accelerate:
        return None, ""
    tr = cfg.train
    for var, name, ours in (("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "grad_accum", tr.grad_accum),
                            ("ACCELERATE_GRADIENT_CLIPPING", "max_grad_norm", tr.max_grad_norm)):
        theirs = env.get(var, "auto")
        if theirs != "auto" and float(theirs) != float(ours):
            notes.append(f"DeepSpeed: accelerate's config has {var.removeprefix('ACCELERATE_').lower()}={theirs}, train.{name} is {ours:g}: "
                         f"train.{name} wins (the job owns the step)")
    if file != "none":
        if not os.path.isfile(file):
            raise LaunchError(f"accelerate's deepspeed_config_file {file} does not exist; fix it in the accelerate config (or give --ds-config)")
        return file, "accelerate's deepspeed_config_file"
    stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    zero: dict = {"stage": stage}
    for name, var in (("offload_optimizer", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"), ("offload_param", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")):
        device = env.get(var, "none")
        if device != "none":
            zero[name] = {"device": device}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {"zero_optimization": zero}, "accelerate's deepspeed_config"


def _deepspeed_precision(cfg: DistillConfig, ds: dict, notes: list[str]) -> None:
    """A DeepSpeed config that sets bf16 or fp16 ``enabled`` (not "auto") decides the precision, as the deepspeed launcher's
    scripts expect; where train.precision differs, one line says so."""
    for name in ("bf16", "fp16"):
        enabled = (ds.get(name) or {}).get("enabled", "auto")
        if enabled == "auto" or not isinstance(enabled, bool) or enabled == (cfg.train.precision == name):
            continue
        wins = name if enabled else "fp32"
        notes.append(f"precision: the DeepSpeed config has {name}.enabled={str(enabled).lower()}, train.precision is {cfg.train.precision}: "
                     f"the DeepSpeed config's {wins} wins")
        cfg.train.precision = wins


def _precision(cfg: DistillConfig, launcher: str | None, notes: list[str]) -> None:
    """The launcher's mixed precision wins when it asks for one; its default ("no") leaves the job's."""
    ours = PRECISION[cfg.train.precision]
    if launcher is None or launcher == ours:
        return
    if launcher not in FROM_ACCELERATE:
        raise LaunchError(f"the launcher asks for mixed precision {launcher}; the job trains in fp32, bf16 or fp16 "
                          "(set mixed_precision in the accelerate config to one of no, bf16, fp16)")
    if launcher == "no":
        notes.append(f"precision: accelerate launch's mixed_precision is 'no' (its default), train.precision is {cfg.train.precision}: "
                     f"train.precision={cfg.train.precision} wins")
        return
    notes.append(f"precision: accelerate launch asks for {launcher}, train.precision is {cfg.train.precision}: "
                 f"the launcher's {launcher} wins")
    cfg.train.precision = FROM_ACCELERATE[launcher]
