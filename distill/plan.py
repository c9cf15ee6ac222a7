"""The plan a run prints once its models and data are loaded, before the first step (a setup that
fails before then prints only its one-line error): the launch (world size, launcher, backend and
ZeRO stage, precision), the batch (micro-batch, accumulation, the effective batch in tokens, the
steps), and, with ``--dry-run``, what was loaded. Torch-free."""

from __future__ import annotations

from distill.config import DistillConfig
from distill.launched import Request


def backend(accelerator) -> str:
    """How the processes run: accelerate's distributed type, the device, the process group's backend and the ZeRO stage."""
    kind = accelerator.distributed_type.value
    text = f"{accelerator.device.type}"
    group = getattr(accelerator.state, "backend", None)
    if accelerator.num_processes > 1 and group:
        text += f", {group}"
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        return f"DeepSpeed ZeRO-{plugin.zero_stage} ({text})"
    return {"NO": text, "MULTI_CPU": f"DDP ({text})", "MULTI_GPU": f"DDP ({text})"}.get(kind, f"{kind} ({text})")


def launch_line(cfg: DistillConfig, accelerator, launch: Request) -> str:
    """The plan's first line: world size, launcher, backend and ZeRO stage, precision."""
    n = accelerator.num_processes
    source = f" from {launch.ds_source}" if launch.ds_source else ""
    return f"launch: {n} process{'es' if n > 1 else ''} ({launch.launcher}), {backend(accelerator)}{source}, precision {cfg.train.precision}"


def batch_line(cfg: DistillConfig, world_size: int) -> str:
    """The plan's second line (train.epochs counted): micro-batch, accumulation, the effective batch in sequences and tokens, and
    the steps."""
    tr = cfg.train
    sequences = tr.micro_batch_size * tr.grad_accum * world_size
    tokens = sequences * cfg.data.seq_len
    return (f"batch: micro-batch {tr.micro_batch_size} x grad_accum {tr.grad_accum} x {world_size} process{'es' if world_size > 1 else ''} "
            f"= {sequences} sequences of up to {cfg.data.seq_len} tokens ({tokens:,} tokens) a step; {tr.max_steps:,} steps "
            f"(warm-up {tr.warmup_steps}), up to {tokens * tr.max_steps:,} tokens")


def loaded_lines(cfg: DistillConfig, job, by_source: dict) -> list[str]:
    """What --dry-run adds to the plan: what was loaded (``job``: distill.job.Loaded), and how the objective pairs them."""
    teacher = job.teacher
    loaded = f"{teacher.num_parameters():,} parameters" if teacher is not None else "not loaded for training"
    quantization = f", {cfg.teacher.quantization}" if cfg.teacher.quantization != "none" else ""
    lines = [f"teacher: {cfg.teacher.path} (source {cfg.teacher.source}{quantization}; {loaded})",
             f"student: {job.parameters[0]:,} trainable of {job.parameters[1]:,} parameters"
             + (f", LoRA r={cfg.student.lora.r}" if cfg.student.lora is not None else "")]
    for name, weight, train, _ in job.setup.sources:
        lines.append(f"data: {len(train):,} training sequences" if not cfg.data.mixture else
                     f"data: source {name}: {len(train):,} training sequences (weight {weight:g})")
    rows = sum(len(batch["input_ids"]) for batches in by_source.values() for batch in batches)
    lines.append(f"validation: {rows:,} sequences in {sum(len(b) for b in by_source.values())} batches")
    lines.append("objective: " + ", ".join(f"{t.name} x{t.weight:g}" for t in job.objective.terms))
    lines.append(f"output: {cfg.output_dir}")
    return lines
