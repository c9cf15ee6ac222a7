"""The distillation job: set up, train, save the student, evaluate, report.

``run`` is what ``distill run`` calls in-process and what every distributed launcher starts on
each process (``python -m distill.job``).
"""

from __future__ import annotations

import sys

from distill.signals import SIGNALS, TERM, SetupInterrupted

if __name__ == "__main__":  # before the heavy imports below: a signal during them is handled too
    SIGNALS.install()
    from distill import noise

    noise.install()  # before torch: torchao and bitsandbytes log as they are imported

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402

# quantize, downstream and metrics load torchao, bitsandbytes, lm-eval and evaluate only when a method, task or metric is named.
from distill import checkpoint, downstream, evaluation, extras, launched, metrics, models, plan, report, rundir  # noqa: E402
from distill.config import DistillConfig, load_config, save_config, teacher_needed, to_dict  # noqa: E402
from distill.downstream import summary_metrics  # noqa: E402
from distill.errors import DiskFull, LaunchError, Terminated, main_guard  # noqa: E402
from distill.feature_terms import ATTENTIONS  # noqa: E402
from distill.objective import Distillee, build_objective, save_objective, split_state_dict  # noqa: E402
from distill.progress import phase  # noqa: E402
from distill.quantize import check_method_fits, quantization_config  # noqa: E402
from distill.rollout import build_rollouts, check_rollouts  # noqa: E402
# Setup's steps, re-exported for the tools and tests that named them here.
from distill.setup import (PRECISION, Setup, deepspeed_config, make_accelerator, resolve_steps, train_stream,  # noqa: E402,F401
                           tune_cpu_allocator, validation_sets)
from distill.teacher_source import SOURCES, build_source  # noqa: E402
from distill.tracking import Tracker, check_backends  # noqa: E402
from distill.train import Preempted, build_optimizer, build_scheduler, fit, train_seconds, truncate_metrics  # noqa: E402


def _global_rank() -> int:
    """This process's rank, from the launcher's environment (before any process group exists)."""
    return int(os.environ.get("RANK", "0") or 0)


def run(cfg: DistillConfig, *, resume: bool = False, ds_config: str | None = None, overwrite: bool = False, dry_run: bool = False) -> dict | None:
    """Runs the whole job; returns the evaluation (on the main process).

    The main process first checks the run directory, refuses to reuse one that holds a run
    unless ``resume`` or ``overwrite``, and holds its lock until the job ends.

    Args:
        ds_config: path of a DeepSpeed JSON config; the student is then prepared by DeepSpeed
            (ZeRO), while the teacher stays outside its engine, whole on every process.
        overwrite: delete what an earlier run wrote into the run directory first.
        dry_run: load and check everything, print the plan and stop before training; what the run
            directory did not hold before is removed again.
    """
    run_dir = Path(os.path.expanduser(cfg.output_dir))
    main = _global_rank() == 0
    installed_here = SIGNALS.install()  # entry points install them earlier, at process start
    lock = rundir.RunLock(run_dir) if main else None  # created first: a signal inside acquire() still releases it
    before, created, undo = set(), False, False  # a fresh run that fails in setup leaves nothing it created
    try:
        SIGNALS.enter("setup")
        if main:
            created = rundir.check_writable(run_dir)
            before = set(os.listdir(run_dir))
            rundir.check_reuse(run_dir, resume=resume, overwrite=overwrite)
            lock.acquire()
            if overwrite:
                rundir.clear_run(run_dir)
                before -= set(rundir.RUN_OUTPUTS)
            rundir.check_links(run_dir)
            rundir.RunDir(run_dir).preempted.unlink(missing_ok=True)
        result = _run(cfg, run_dir, resume=resume, ds_config=ds_config, dry_run=dry_run)
        undo = dry_run
        return result
    except SetupInterrupted as stop:
        if stop.name == TERM:
            undo = not resume
            raise Terminated("SIGTERM during setup: stopped before training, nothing to save") from None
        if main:  # the marker asks for a requeue: the directory may not exist yet when the signal came first thing
            run_dir.mkdir(parents=True, exist_ok=True)
            rundir.RunDir(run_dir).write(rundir.RunDir.PREEMPTED, "stopped during setup, before any new checkpoint\n")
        print("distill: SIGUSR1 during setup: stopped before training (nothing to save); marked PREEMPTED, continue with --resume",
              file=sys.stderr)
        return None
    except BaseException:
        undo = not resume and SIGNALS.phase == "setup"
        raise
    finally:
        undo = undo and lock is not None and lock.held  # never another job's files
        if undo:
            rundir.remove_created(run_dir, before)
        if lock is not None:
            lock.release()
        if undo and created:
            with contextlib.suppress(OSError):  # only when empty again
                run_dir.rmdir()
        SIGNALS.reset()
        if installed_here:
            SIGNALS.uninstall()


def _run(cfg: DistillConfig, run_dir: Path, *, resume: bool, ds_config: str | None, dry_run: bool = False) -> dict | None:
    """A run, step by step: what can fail without loading anything, the launcher's request and the
    accelerator, the checkpoint to resume from, the models, data and objective, the plan, the
    untrained student's evaluation, training, the saved student, its final evaluation and the report."""
    run = rundir.RunDir(run_dir)
    launch = launched.request(cfg, ds_config)
    extras.check_job(cfg, launch.ds_config)  # a missing extra is one line, naming it, before anything loads
    check_before_loading(cfg, run)
    if _global_rank() == 0:
        check_backends(cfg.tracking, run_dir)  # a tracker that cannot start is one line now, before anything loads
        for note in launch.notes:
            print(f"distill: {note}", file=sys.stderr)
    accelerator = start_accelerator(cfg, launch.ds_config)
    if accelerator.num_processes != launch.world_size:
        raise LaunchError(f"{launch.launcher} started {launch.world_size} processes but accelerate sees {accelerator.num_processes}; "
                          "start the job with distill launch, or see the README's launching section")
    latest = checkpoint_to_resume(accelerator, run, resume=resume, ds_config=launch.ds_config)
    tracker = None
    if accelerator.is_main_process:
        if latest is not None:  # metrics.jsonl cut back to the checkpoint's step before the trackers open it to append
            for log in (run.metrics, run.samples):
                truncate_metrics(log, checkpoint.saved_state(latest).step)
        if not dry_run:
            tracker = Tracker(cfg.tracking, run_dir, to_dict(cfg), resume=latest is not None)  # started before the models load
    failed = True
    try:
        result = _load_train_report(cfg, accelerator, launch, run, latest, tracker, dry_run=dry_run)
        failed = False
        return result
    finally:
        if tracker is not None:
            tracker.close(failed=failed)


def _load_train_report(cfg: DistillConfig, accelerator, launch, run: rundir.RunDir, latest: Path | None, tracker, *, dry_run: bool):
    """The models, data and objective, the plan, the untrained student's evaluation, training, the
    saved student, its final evaluation and the report (``tracker``: the main process's, started)."""
    job = load(cfg, accelerator)
    resolve_steps(cfg, job.setup, accelerator.num_processes, quiet=not accelerator.is_main_process)  # train.epochs, the warm-up
    by_source = validation_sets(job.setup, cfg, accelerator)
    validation = [batch for batches in by_source.values() for batch in batches]
    if accelerator.is_main_process:
        lines = [plan.launch_line(cfg, accelerator, launch), plan.batch_line(cfg, accelerator.num_processes)]
        for line in lines + (plan.loaded_lines(cfg, job, by_source) if dry_run else []):
            print(f"distill: {line}", file=sys.stderr)
    if dry_run:
        if accelerator.is_main_process:
            print("distill: --dry-run: everything loaded and checked; stopping before training (nothing written)", file=sys.stderr)
        return None
    if accelerator.is_main_process:
        save_config(cfg, run.config)
    initial = evaluate_untrained(cfg, accelerator, job, validation, run) if cfg.eval.at_end and cfg.eval.initial and latest is None else None

    # The objective's parameters (projections) are prepared, optimized and checkpointed with the student.
    model = Distillee(job.student, job.objective, job.task, job.vocab)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    student = accelerator.unwrap_model(model).student  # evaluated as it trains (ZeRO-3's hooks are on its modules)
    state = resume_state(accelerator, latest, scheduler, run)
    if tracker is not None:
        tracker.add_config({**to_dict(cfg), "models": model_facts(cfg, student, job.teacher, *job.parameters)})
    evaluate = lambda step: evaluation.quality(student, job.teacher, validation, vocab=job.vocab, device=accelerator.device, task=job.task)
    if not train(cfg, accelerator, job, model, optimizer, scheduler, state, run, tracker, evaluate):
        return None  # preempted: a checkpoint and the PREEMPTED marker are written
    lora = cfg.student.lora
    save_student(accelerator, model, job.setup.tokenizer, run.student, merge_lora=lora is not None and lora.merge,
                 base_quantization=cfg.student.quantization, model_class=job.task.auto_class)
    result = None
    if cfg.eval.at_end:
        del optimizer, student, model  # free optimizer state (and ZeRO shards) before evaluation
        result = evaluate_saved_student(cfg, accelerator, job, validation, by_source, initial, run, tracker)
    if tracker is not None:
        tracker.log_model(run.student, kind="student", step=cfg.train.max_steps, task=job.task.kind)
    accelerator.wait_for_everyone()
    return result


def check_before_loading(cfg: DistillConfig, run: rundir.RunDir) -> None:
    """What would fail only after training (a quantization library, an lm-eval task, a metric), checked before anything loads."""
    for method in cfg.eval.quantize:
        quantization_config(method)
    if cfg.eval.lm_eval is not None and cfg.eval.at_end:
        downstream.check_tasks(cfg.eval.lm_eval)
    for name in cfg.eval.metrics:
        metrics.load(name)


def start_accelerator(cfg: DistillConfig, ds_config: str | None):
    """The accelerator (DeepSpeed when ``ds_config``), the CPU allocator and the seed."""
    accelerator = make_accelerator(cfg, ds_config)
    tune_cpu_allocator(cfg.train.cpu_allocator, accelerator.device)
    set_seed(cfg.train.seed)
    return accelerator


def checkpoint_to_resume(accelerator, run: rundir.RunDir, *, resume: bool, ds_config: str | None) -> Path | None:
    """The latest complete checkpoint with ``--resume`` (a universal copy under DeepSpeed at another world size).
    checkpoint.load and checkpoint.to_universal verify a checkpoint before any library opens it."""
    latest = checkpoint.latest(run.checkpoints) if resume else None
    if resume and latest is None and accelerator.is_main_process:
        print(f"--resume: no complete checkpoint in {run.checkpoints}; starting from step 0", file=sys.stderr)
    if latest is not None and ds_config and checkpoint.saved_state(latest).world_size != accelerator.num_processes:
        latest = checkpoint.to_universal(accelerator, latest)
        accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True
    return latest


@dataclass
class Loaded:
    """What training needs, loaded and checked: models, data, the teacher's signal and the objective."""

    setup: Setup
    opened: object  # what the teacher's signal is read from (a store, a pool's client), or None for the model itself
    objective: object
    parameters: tuple[int, int]  # the student's trainable and total parameters

    task = property(lambda self: self.setup.task)
    student = property(lambda self: self.setup.student)
    teacher = property(lambda self: self.setup.teacher)
    vocab = property(lambda self: self.setup.vocab)

    @property
    def facts(self) -> dict:
        pairing = self.setup.pairing
        return {"student_trainable_params": self.parameters[0], "student_total_params": self.parameters[1],
                **({"pairing": pairing.counts} if pairing is not None else {})}


def load(cfg: DistillConfig, accelerator) -> Loaded:
    """Models, tokenizer and data; the teacher's signal (the model, a store or a pool); the objective, checked against them."""
    quiet = not accelerator.is_main_process
    source = SOURCES[cfg.teacher.source]  # a store or a pool gives the signal without the teacher: it is then not loaded for training
    check_rollouts(cfg, source, accelerator.device)  # a store cannot score the student's own text: said before anything loads
    setup = Setup(cfg, accelerator.device, load_teacher=source.runs_teacher and (teacher_needed(cfg.loss) or cfg.eval.at_end or cfg.train.eval_every > 0))
    opened = source.open(cfg, setup, quiet=quiet)
    task, student, teacher = setup.task, setup.student, setup.teacher
    objective = build_objective(cfg.loss, student=student, teacher=teacher, causal=task.causal, task=task, stored=getattr(opened, "features", None),
                                pairing=setup.pairing)
    source.check_objective(opened, objective)
    if not quiet and any(t.weight > 0 and not t.features for t in objective.terms):
        print(f"loss: {objective.path}", file=sys.stderr)
    if ATTENTIONS in objective.student_wants:
        models.use_eager_attention(student, teacher, quiet=quiet)
    if cfg.eval.quantize:
        for method in cfg.eval.quantize:
            check_method_fits(student.config, method, key="eval.quantize:", model_class=task.auto_class)
    trainable, total = models.trainable_parameters(student)
    if not quiet:
        print(f"student: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})", file=sys.stderr)
    return Loaded(setup, opened, objective, (trainable, total))


def evaluate_untrained(cfg: DistillConfig, accelerator, job: Loaded, validation: list[dict], run: rundir.RunDir) -> dict:
    """The student before training, the report's initial_student row (initial_eval.json)."""
    if cfg.student.quantization == "none":  # a bitsandbytes base is placed when loaded, never moved
        job.student.to(accelerator.device)
    with phase(f"evaluating the untrained student on {len(validation)} validation batches", quiet=not accelerator.is_main_process):
        initial = evaluation.quality(job.student, job.teacher, validation, vocab=job.vocab, device=accelerator.device, task=job.task,
                                     extra_metrics=cfg.eval.metrics)
    if accelerator.is_main_process:
        run.write_json(run.INITIAL_EVAL, initial)
    return initial


def resume_state(accelerator, latest: Path | None, scheduler, run: rundir.RunDir) -> checkpoint.TrainState:
    """Step 0, or the checkpoint's step with model, optimizer, scheduler and generators restored."""
    if latest is None:
        return checkpoint.TrainState(world_size=accelerator.num_processes)
    state = checkpoint.load(accelerator, latest, scheduler)
    state.world_size = accelerator.num_processes
    if accelerator.is_main_process:
        print(f"resuming from {latest} (step {state.step})", file=sys.stderr)
    return state


def train(cfg: DistillConfig, accelerator, job: Loaded, model, optimizer, scheduler, state, run: rundir.RunDir, tracker, evaluate) -> bool:
    """The training loop over the rank's stream from the teacher's signal; False when preempted (SIGUSR1)."""
    stream = train_stream(job.setup, cfg, accelerator, state.samples_consumed)
    source = build_source(cfg.teacher.source, job.teacher, job.task, job.vocab, job.objective.qkv_layers[1], opened=job.opened,
                          source_names=[name for name, *_ in job.setup.sources], tail=cfg.teacher.cache_tail)
    rollouts = build_rollouts(cfg, job.setup, accelerator)  # the student's completions (rollout.on_policy), or None
    try:
        fit(model, source, stream, accelerator=accelerator, optimizer=optimizer, scheduler=scheduler, cfg=cfg, task=job.task,
            objective=job.objective, state=state, run_dir=run.path, tracker=tracker, evaluate=evaluate, rollouts=rollouts)
    except Preempted as stop:
        if accelerator.is_main_process:
            print(f"distill: {stop}", file=sys.stderr)
        return False
    finally:
        source.close()
        if rollouts is not None:
            rollouts.close()
    return True


def evaluate_saved_student(cfg: DistillConfig, accelerator, job: Loaded, validation, by_source, initial, run: rundir.RunDir, tracker) -> dict | None:
    """What was saved is what is evaluated: whole, on every process, whatever the sharding. The report, and the trackers' summary."""
    final_student = models.load_for_evaluation(run.student, accelerator.device, base_quantization=cfg.student.quantization,
                                               model_class=job.task.auto_class)
    teacher = job.teacher
    if teacher is None:  # trained from a store or a pool: the comparison in the report needs the teacher itself
        teacher = models.load_teacher(cfg.teacher, accelerator.device, model_class=job.task.auto_class)
    facts = dict(job.facts)
    if job.task.row_labels:  # the rows training saw, from the logged windows (metrics.jsonl is cut back on resume, so they add up)
        records = run.records()
        facts.update({f"train_rows_{kind}": int(sum(r.get(f"train/{kind}_rows", 0) for r in records)) for kind in ("labelled", "unlabelled")})
    result = report.final_evaluation(cfg, accelerator, final_student, teacher, validation, job.vocab, run.path, job.setup.tokenizer, initial,
                                     facts, by_source=by_source if cfg.data.mixture else None)
    if tracker is not None:
        # In the history too (and metrics.jsonl), so a tracker's summary and the report agree: the final evaluation under
        # the report's names, and the student's under the names the mid-run evaluations used (eval/perplexity, ...).
        tracker.log({**report.final_metrics(result["rows"]), **report.final_eval_metrics(result["rows"])}, step=cfg.train.max_steps)
        seconds = train_seconds(run.records())
        samples = cfg.train.max_steps * cfg.train.micro_batch_size * cfg.train.grad_accum * accelerator.num_processes
        tracker.summary({**result, **summary_metrics(result["rows"]), "train/runtime_seconds": seconds,
                         "train/samples_per_second": samples / seconds if seconds else None})
    return result


def model_facts(cfg: DistillConfig, student, teacher, trainable: int, total: int) -> dict:
    """The models' sizes and configs, for the trackers' run config."""
    teacher_config = teacher.config if teacher is not None else models.teacher_config(cfg.teacher)
    return {"student": {"params": total, "trainable_params": trainable, "config": student.config.to_diff_dict()},
            "teacher": {"params": teacher.num_parameters() if teacher is not None else None, "config": teacher_config.to_diff_dict()}}


def _save_atomically(path: Path, write, *, needed: int = 0) -> None:
    """:func:`rundir.write_dir_atomic`, with a full disk reported as one line."""
    try:
        rundir.write_dir_atomic(path, write)
    except Exception as err:
        if checkpoint.out_of_space(err, path.parent):
            raise DiskFull(checkpoint.disk_full_message(path.name, path.parent, needed=needed)) from None
        raise


def save_student(accelerator, model, tokenizer, path: Path, *, merge_lora: bool = False, base_quantization: str = "none",
                 model_class: str = "AutoModelForCausalLM") -> None:
    """Saves the (consolidated) student of the prepared ``model`` with save_pretrained, under a temporary name first.

    The objective's own parameters (projections), if any, go to ``objective/`` beside ``path``,
    never into it: ``path`` loads with plain ``from_pretrained`` and holds only the student.

    A LoRA student saves its adapter (peft format): as ``path`` itself, or, with ``merge_lora``,
    as ``adapter/`` beside ``path``, which then holds the merged full model. The merge reloads
    base and adapter on the main process, so it works whatever the sharding or quantization.
    """
    gathered = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards (onto the main process only); collective
    if accelerator.is_main_process:
        state_dict, objective_state = split_state_dict(gathered)
        objective = accelerator.unwrap_model(model).objective
        model = accelerator.unwrap_model(model).student
        if objective_state:
            _save_atomically(path.with_name(rundir.RunDir.OBJECTIVE), lambda tmp: save_objective(objective, objective_state, tmp))
        is_peft = hasattr(model, "peft_config")
        target = path.with_name(rundir.RunDir.ADAPTER) if is_peft and merge_lora else path

        def write(tmp):
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        needed = sum(t.numel() * t.element_size() for t in state_dict.values() if torch.is_tensor(t))
        _save_atomically(target, write, needed=needed)
        if target != path:
            merged = models.load_for_evaluation(target, torch.device("cpu"), base_quantization=base_quantization,
                                                model_class=model_class).merge_and_unload()

            def write_merged(tmp):
                merged.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)

            _save_atomically(path, write_merged)
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    """Entry point of one job process: ``python -m distill.job CONFIG [--set k=v ...] [--resume | --overwrite]``.

    Errors map to the same one line and exit code as under ``distill run`` (distill.errors).
    """
    SIGNALS.install()
    parser = argparse.ArgumentParser(prog="python -m distill.job")
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    # --deepspeed_config is DeepSpeed's own spelling (what a script started by the deepspeed launcher takes).
    parser.add_argument("--ds-config", "--deepspeed_config", "--deepspeed-config", dest="ds_config", help="DeepSpeed JSON config (ZeRO) for the student")
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # DeepSpeed's flag beside --deepspeed_config: implied
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # launchers' legacy flag; LOCAL_RANK is used
    args = parser.parse_args(argv)
    return main_guard(lambda: run(load_config(args.config, args.overrides), resume=args.resume, ds_config=args.ds_config,
                                  overwrite=args.overwrite) and 0)


if __name__ == "__main__":
    sys.exit(main())
