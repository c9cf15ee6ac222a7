"""The training loop: one function, :func:`fit`, for CPU, one GPU, DDP and DeepSpeed alike.

Topology lives in the accelerate/DeepSpeed launch config, not here. A step is task x teacher
source x objective (DESIGN.md): the task says what the targets are, the teacher source gives the
signal the objective asks for, and the objective's named terms are summed over the targets. The
loss of one optimizer step is ``sum over its targets of sum_i weight_i * scale_i * term_i, / N``
where ``N`` is the number of unmasked targets in the whole step: every micro-batch of every process.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from distill import checkpoint, rundir
from distill.config import DistillConfig, TrainConfig
from distill.data import TrainStream
from distill.errors import NonFiniteLoss, TeacherUnavailable, Terminated
from distill.evaluation import synchronize
from distill.progress import StepProgress

# The readers of metrics.jsonl live with the run directory; re-exported for the tools that named them here.
from distill.rundir import read_metrics, train_seconds, truncate_metrics  # noqa: F401
from distill.signals import SIGNALS


class Preempted(Exception):
    """SIGUSR1 asked the job to stop: a checkpoint of ``step`` was saved and the job may be requeued."""

    def __init__(self, step: int, checkpoint_dir):
        super().__init__(f"preempted: checkpoint of step {step} saved in {checkpoint_dir}; continue with --resume")
        self.step = step
        self.marker = f"checkpoint of step {step} saved"


def agreed_stop(accelerator) -> tuple[bool, bool]:
    """(preempt, terminate): whether any process has received SIGUSR1 / SIGTERM.

    A collective, called once per step by every process, so all take the same branch.
    """
    flags = torch.tensor([float(SIGNALS.preempt), float(SIGNALS.terminate)], device=accelerator.device)
    preempt, terminate = (accelerator.reduce(flags, reduction="sum") > 0).tolist()
    return preempt, terminate


@dataclass
class StepResult:
    loss: float
    terms: dict  # term name -> its sum over the step's targets / N
    tokens: int
    unlabelled: int  # targets without a hard label (a classifier's unlabelled rows), among ``tokens``
    grad_norm: float | None
    teacher_seconds: float
    skipped: bool


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb  # start-up time: bitsandbytes loads only when this runs

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    from transformers import get_scheduler  # start-up time: transformers loads only when this runs

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)


def global_target_count(batches: list[dict], accelerator, task) -> tuple[int, int]:
    """Unmasked targets in this optimizer step, summed over micro-batches and processes, and how many of them have no hard label.

    Known before the first backward, so every micro-batch can be divided by the same count.
    """
    local = [sum(task.target_count(b) for b in batches), sum(task.unlabelled_count(b) for b in batches)]
    tokens, unlabelled = accelerator.reduce(torch.tensor(local, device=accelerator.device), reduction="sum").tolist()
    return int(tokens), int(unlabelled)


def _all_finite(value: torch.Tensor, accelerator) -> bool:
    """Whether the loss is finite on every process (so all processes take the same branch)."""
    flag = torch.tensor(float(torch.isfinite(value).all()), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


def train_step(model, source, batches: list[dict], *, accelerator, optimizer, scheduler, cfg: DistillConfig, task, objective,
               report: bool = True) -> StepResult:
    """One optimizer step over ``len(batches)`` accumulated micro-batches.

    Args:
        model: the prepared :class:`distill.objective.Distillee` (student and objective).
        source: the teacher source (``signal(batch, wants) -> TeacherOutputs``).
        task: the task (targets and their counts).
        objective: the named, weighted terms (:mod:`distill.objective`), the same as ``model``'s.
        report: whether the step is logged; zero-weight terms (reported, not trained on) are computed only then.
    """
    tokens, unlabelled = global_target_count(batches, accelerator, task)
    sums = torch.zeros(len(objective.terms), dtype=torch.float64, device=accelerator.device)
    teacher_seconds, finite, grad_norm = 0.0, True, None
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.accumulate(model):
            teacher = None
            if objective.wants:
                synchronize(accelerator.device)  # CUDA runs asynchronously: time the teacher's work, not its launches
                start = time.perf_counter()
                teacher = source.signal(batch, objective.wants)
                synchronize(accelerator.device)
                teacher_seconds += time.perf_counter() - start
            term_sums = model(batch, teacher, report)
            loss_sum = objective.total(term_sums)
            finite = finite and _all_finite(loss_sum, accelerator)
            if finite:
                # accelerate divides each micro-batch loss by grad_accum and DDP/ZeRO average
                # gradients over processes; undo both so the update is d(step sum)/N exactly.
                scale = cfg.train.grad_accum * accelerator.num_processes / max(tokens, 1)
                accelerator.backward(loss_sum * scale)
                sums += term_sums.detach().double()
            if accelerator.sync_gradients:
                if finite:
                    max_norm = cfg.train.max_grad_norm or float("inf")
                    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
                    optimizer.step()
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
    means = accelerator.reduce(sums, reduction="sum") / max(tokens, 1)
    loss = float(objective.total(means)) if finite else float("nan")
    return StepResult(loss=loss, terms=dict(zip(objective.names, means.tolist())), tokens=tokens, unlabelled=unlabelled, grad_norm=grad_norm,
                      teacher_seconds=teacher_seconds, skipped=not finite)


def _injected_fault(fault: str | None, step: int, rank: int) -> None:
    """Raises on one rank at one step when DISTILL_FAULT="RANK:STEP" is set.

    For testing that a failing process takes the whole job down promptly, through the real
    launchers; unset in normal use.
    """
    if fault and fault == f"{rank}:{step}":
        raise RuntimeError(f"injected fault on rank {rank} at step {step} (DISTILL_FAULT={fault})")


def peak_memory_bytes(device) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def fit(model, source, stream: TrainStream, *, accelerator, optimizer, scheduler, cfg: DistillConfig, task, objective,
        state: checkpoint.TrainState, run_dir: Path, tracker=None, evaluate=None, rollouts=None) -> checkpoint.TrainState:
    """Trains ``model`` (the prepared student and objective) from ``state.step`` to ``train.max_steps``.

    Args:
        source, task, objective: the step's parts (see :func:`train_step`).
        stream: the rank's deterministic micro-batch stream, positioned at ``state``.
        evaluate: ``fn(step) -> dict`` of validation metrics, called on every process.
        tracker: receives logged metrics; None on processes other than the main one.
        rollouts: the student's completions (:mod:`distill.rollout`): each step's batches are rewritten before the teacher is asked.
    """
    tr = cfg.train
    progress = StepProgress(tr.max_steps, state.step, enabled=accelerator.is_main_process)
    model.train()
    window, session = _Window(), _Window()  # since the last log; this session (for a late source's waiting)
    fault = os.environ.get("DISTILL_FAULT")
    saver = _Saver(accelerator, rundir.RunDir(run_dir).checkpoints, scheduler=scheduler, keep=tr.keep_checkpoints)
    late = source.prefetches and bool(objective.wants)
    # A late source is asked ahead for the stream's coming steps; the student's completions are known only at the step itself.
    ahead = _Lookahead(stream, source, tr, depth=cfg.teacher.prefetch if late and rollouts is None else 0)
    writer = accelerator.unwrap_model(model).student if rollouts is not None else None
    SIGNALS.enter("training")
    try:
        while state.step < tr.max_steps:
            start = time.perf_counter()
            _injected_fault(fault, state.step + 1, accelerator.process_index)
            batches, consumed = ahead.next(state.step)
            if rollouts is not None:
                batches = rollouts.apply(writer, batches, step=state.step, rank=accelerator.process_index)
                if late:
                    source.prefetch(batches)
            waited = _teacher_ready(source, batches, accelerator, saver, state) if late else 0.0
            logged = (state.step + 1) % tr.log_every == 0 or state.step + 1 == tr.max_steps
            result = train_step(model, source, batches, accelerator=accelerator, optimizer=optimizer, scheduler=scheduler, cfg=cfg,
                                task=task, objective=objective, report=logged)
            state.step, state.samples_consumed = state.step + 1, consumed
            for totals in (window, session):
                totals.add(result, seconds=time.perf_counter() - start, waited=waited)
            _check_finite(result, state.step, tr, progress)
            progress.step()
            if logged:
                metrics = {**window.metrics(result, scheduler, accelerator.device, row_labels=task.row_labels),
                           **(rollouts.metrics(window.seconds, accelerator) if rollouts is not None else {})}
                window = _Window()
                progress.logged(state.step, metrics)
                if tracker is not None:
                    tracker.log(metrics, step=state.step)
            if rollouts is not None and ((tr.eval_every and state.step % tr.eval_every == 0) or state.step == tr.max_steps):
                shown = rollouts.samples(writer, state.step)  # every process: under ZeRO-3 they generate together
                if tracker is not None and shown:
                    tracker.table("samples/completions", shown, state.step)
            if evaluate is not None and tr.eval_every and state.step % tr.eval_every == 0 and state.step < tr.max_steps:
                measured = evaluate(state.step)
                progress.evaluated(state.step, measured)
                metrics = {f"eval/{k}": v for k, v in measured.items()}
                if tracker is not None:
                    tracker.log(metrics, step=state.step)
            saved = tr.save_every and (state.step % tr.save_every == 0 or state.step == tr.max_steps)
            if saved:
                path = saver.save(state)
                if tracker is not None:
                    tracker.log_model(path, kind="checkpoint", step=state.step)
            if state.step < tr.max_steps:
                _stop_if_signalled(accelerator, saver, state, saved=bool(saved), grace=tr.stop_grace_seconds, run_dir=run_dir)
    finally:
        progress.close()  # ends the bar's line, so an error prints on its own
    if late and accelerator.is_main_process and session.seconds:
        print(f"teacher: this process waited {session.teacher_seconds:.1f} s for the teacher's targets in {session.seconds:.1f} s of training "
              f"({session.teacher_seconds / session.seconds:.1%}){source.transfer_summary()}", file=sys.stderr)
    SIGNALS.enter("finishing")
    return state


class _Lookahead:
    """The stream's coming steps, drawn ahead for a source that answers late (``depth`` steps, each prefetched):
    (micro-batches, samples consumed after them). Only the steps trained count in the checkpoint, so a
    resumed stream draws the rest again."""

    def __init__(self, stream: TrainStream, source, tr: TrainConfig, depth: int):
        self.stream, self.source, self.tr, self.depth = stream, source, tr, depth
        self.steps: deque = deque()

    def next(self, step: int) -> tuple[list[dict], int]:
        while len(self.steps) < 1 + min(self.depth, self.tr.max_steps - step - 1):
            self.steps.append(([self.stream.next_batch() for _ in range(self.tr.grad_accum)], self.stream.samples_consumed))
            if self.depth:
                self.source.prefetch(self.steps[-1][0])
        return self.steps.popleft()


@dataclass
class _Window:
    """Totals over steps: the log window's rates, or the session's time waiting for the teacher."""

    tokens: int = 0
    unlabelled: int = 0
    seconds: float = 0.0
    teacher_seconds: float = 0.0  # computing or waiting for the teacher's signal
    steps: int = 0

    def add(self, result: "StepResult", *, seconds: float, waited: float) -> None:
        self.tokens += result.tokens
        self.unlabelled += result.unlabelled
        self.seconds += seconds
        self.teacher_seconds += result.teacher_seconds + waited
        self.steps += 1

    def metrics(self, result: "StepResult", scheduler, device, *, row_labels: bool = False) -> dict:
        """The logged record of the window ending with ``result``; with ``row_labels``, the window's labelled and unlabelled rows."""
        rows = {"train/labelled_rows": self.tokens - self.unlabelled, "train/unlabelled_rows": self.unlabelled} if row_labels else {}
        return {**rows,
            "train/loss": result.loss, **{f"train/{name}_loss": value for name, value in result.terms.items()},
            "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": result.grad_norm,
            "train/tokens_per_s": self.tokens / max(self.seconds, 1e-9),
            "train/teacher_time_share": self.teacher_seconds / max(self.seconds, 1e-9),
            # The mean step time of the window: summed over the records, the run's training time.
            "train/step_seconds": self.seconds / max(self.steps, 1),
            "train/peak_memory_bytes": peak_memory_bytes(device),
            "train/skipped": result.skipped,
        }


def _check_finite(result: "StepResult", step: int, tr: TrainConfig, progress: StepProgress) -> None:
    """A skipped (non-finite) step stops the run, or is reported and passed over (``train.on_nonfinite``)."""
    if not result.skipped:
        return
    if tr.on_nonfinite == "stop":
        raise NonFiniteLoss(f"non-finite loss at step {step}; lower train.lr, check the data, or set train.on_nonfinite=skip")
    progress.write(f"step {step}: non-finite loss, step skipped (train.on_nonfinite=skip)")


def _teacher_ready(source, batches: list[dict], accelerator, saver: "_Saver", state: checkpoint.TrainState) -> float:
    """Waits for the targets of the step's ``batches`` and returns the seconds waited. When the
    source cannot give them (a pool down for longer than teacher.remote_timeout) on any process,
    every process saves the checkpoint of the last finished step, and the job stops."""
    start = time.perf_counter()
    failure = source.wait(batches)
    failed = failure is not None
    if accelerator.num_processes > 1:  # all processes take the same branch: the save below is collective
        flag = torch.tensor(float(failed), device=accelerator.device)
        failed = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
    if failed:
        path = saver.save(state)
        reason = str(failure) if failure is not None else "another process got no answer from the teacher pool"
        raise TeacherUnavailable(f"{reason}; checkpoint of step {state.step} saved in {path}: continue with --resume once the pool is up")
    return time.perf_counter() - start


class _Saver:
    """Saves checkpoints and remembers how long the last save took."""

    def __init__(self, accelerator, root: Path, *, scheduler, keep: int):
        self.accelerator, self.root, self.scheduler, self.keep = accelerator, root, scheduler, keep
        self.last_seconds: float | None = None

    def save(self, state: checkpoint.TrainState) -> Path:
        start = time.perf_counter()
        path = checkpoint.save(self.accelerator, self.root, state, keep=self.keep, scheduler=self.scheduler)
        self.last_seconds = time.perf_counter() - start
        return path


def _stop_if_signalled(accelerator, saver: _Saver, state: checkpoint.TrainState, *, saved: bool, grace: float, run_dir: Path) -> None:
    """Acts on SIGUSR1 (save, mark PREEMPTED, stop) or SIGTERM (save if it fits in ``grace``, exit non-zero)."""
    preempt, terminate = agreed_stop(accelerator)
    if terminate:
        # SLURM kills the job KillWait seconds after SIGTERM; a save that cannot finish by then is
        # not started (the previous one is measured; an unmeasured one is tried: it is atomic).
        if saved:
            path = saver.root / f"step_{state.step:08d}"
        elif saver.last_seconds is None or saver.last_seconds < grace:
            path = saver.save(state)
        else:
            kept = checkpoint.latest(saver.root)
            raise Terminated(f"SIGTERM at step {state.step}: no checkpoint saved (the last save took {saver.last_seconds:.0f} s, more than "
                             f"train.stop_grace_seconds={grace:g}); {'resume from ' + str(kept) if kept else 'no checkpoint exists'}")
        raise Terminated(f"SIGTERM at step {state.step}: checkpoint saved in {path}; continue with --resume")
    if preempt:
        path = saver.root / f"step_{state.step:08d}" if saved else saver.save(state)
        stop = Preempted(state.step, path)
        if accelerator.is_main_process:
            rundir.RunDir(run_dir).write(rundir.RunDir.PREEMPTED, stop.marker + "\n")
        raise stop
