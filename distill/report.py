"""The report of a run: every model measured by the same code, written to eval.json and report.md.

Used at the end of training and by every post-training tool (through :mod:`distill.finished_run`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import yaml

from distill import downstream, evaluation, models, plots, rundir
from distill.config import DistillConfig, data_sources, loss_terms, to_dict
from distill.downstream import report_tables
from distill.progress import phase
from distill.quantize import quantized_rows
from distill.tasks import build_task
from distill.trackers.base import markdown_table


def final_evaluation(cfg: DistillConfig, accelerator, student, teacher, validation, vocab, run_dir: Path, tokenizer, initial: dict | None,
                     facts: dict | None = None, by_source: dict | None = None) -> dict | None:
    """Evaluates teacher and student with the same code; writes eval.json and report.md.

    ``by_source`` (a mixture's validation batches per source) adds one row per source and model,
    and the total weighted by the sources' weights.
    """

    device = accelerator.device
    ev = cfg.eval
    task = build_task(cfg.task)
    quiet = not accelerator.is_main_process
    rows = []
    with phase(f"final evaluation of the teacher and the student on {len(validation)} validation batches", quiet=quiet):
        teacher_quality = evaluation.quality(teacher, teacher, validation, vocab=vocab, device=device, teacher_is_model=True, task=task,
                                             extra_metrics=ev.metrics)
        student_quality = evaluation.quality(student, teacher, validation, vocab=vocab, device=device, task=task, extra_metrics=ev.metrics)
    run = rundir.RunDir(run_dir)
    if initial is None and run.initial_eval.exists():
        initial = json.loads(run.initial_eval.read_text())
    fidelity, full_memory = None, None
    if cfg.teacher.quantization != "none" and ev.teacher_fidelity:
        with phase("teacher fidelity: the full-precision teacher against the quantized one", quiet=quiet):
            full_teacher = models.load_teacher(cfg.teacher, device, quantized=False, model_class=task.auto_class)
            fidelity = evaluation.teacher_fidelity(full_teacher, teacher, validation, vocab=vocab, device=device, task=task)
        full_memory = full_teacher.get_memory_footprint()
        del full_teacher
    sources = source_rows(cfg, task, student, teacher, by_source, vocab, device) if by_source else None
    if not accelerator.is_main_process:
        return None
    student_dir = run.student
    pad_id = tokenizer.pad_token_id
    measure = downstream_measure(cfg, teacher, tokenizer, validation, device)
    for name, model, q, path in (("teacher", teacher, teacher_quality, cfg.teacher.path), ("student", student, student_quality, student_dir)):
        row = {"model": name, "params": evaluation.parameter_count(model), "disk_bytes": models.bytes_on_disk(path),
               "memory_bytes": model.get_memory_footprint(), "quantization": cfg.teacher.quantization if name == "teacher" else "none",
               **q}
        if ev.speed:
            own = name == "teacher" and evaluation.across(validation)  # a teacher of another tokenizer: on its own tokens
            with phase(f"speed of the {name} (latency, throughput; {ev.speed_repeats} repeats)"):
                row.update(evaluation.measure_speed(model, evaluation.own_tokens(validation) if own else validation, task=task, device=device,
                                                    eval_cfg=ev, pad_id=(model.config.pad_token_id or 0) if own else pad_id))
        row.update(measure(model, name))
        rows.append(row)
    if initial is not None:
        student_row = rows[-1]
        rows.insert(1, {"model": "initial_student", "params": student_row["params"], "disk_bytes": None,
                        "memory_bytes": student_row["memory_bytes"], "quantization": "none", **initial})
    baseline = baseline_row(cfg) if ev.baseline else None
    if baseline is not None:
        rows.insert(next(i for i, r in enumerate(rows) if r["model"] == "student"), baseline)
    if ev.quantize:
        rows += quantized_rows(run_dir, ev.quantize, teacher=teacher, validation=validation, vocab=vocab, device=device,
                               eval_cfg=ev, pad_id=pad_id, measure=measure, task=task)
    result = {
        "rows": rows,
        **({"sources": sources} if sources else {}),
        "task": cfg.task.kind,
        "validation_tokens": student_quality["tokens"],
        "throughput_batch_size": ev.throughput_batch_size,
        "teacher_fidelity_kl": fidelity,
        "teacher_full_memory_bytes": full_memory,
        "loss": cfg.loss.kind,
        "objective": loss_terms(cfg.loss),
        "steps": cfg.train.max_steps,
        **(facts or {}),
    }
    write_report(result, run_dir)
    write_model_card(cfg, result, student_dir, auto_class=task.auto_class)
    return result


# What must match for another run's student to be this job's baseline: the student, the data it saw and is measured on, the steps.
BASELINE_MATCH = ("task.kind", "student.path", "student.architecture", "student.init", "data.train_files", "data.validation_files",
                  "data.dataset", "data.validation_split", "data.seq_len", "data.max_validation_sequences", "data.mixture", "train.max_steps",
                  "train.micro_batch_size", "train.grad_accum", "train.seed")


def baseline_row(cfg: DistillConfig) -> dict | None:
    """The student row of the run in ``eval.baseline``, renamed ``baseline``; None (with the reason printed) when it does not match."""

    baseline = rundir.RunDir(cfg.eval.baseline)
    path = baseline.path
    try:
        theirs = yaml.safe_load(baseline.config.read_text())
        student = next(r for r in (baseline.read_eval() or {})["rows"] if r["model"] == "student")
    except (OSError, ValueError, StopIteration, KeyError, TypeError):
        print(f"eval.baseline: {path} holds no evaluated run (config.yaml, eval.json); the report has no baseline row", file=sys.stderr)
        return None

    def setting(config: dict, key: str):
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return where(value)

    def where(value):  # paths compared by where they point
        if isinstance(value, str) and ("/" in value or value.startswith("~")):
            return os.path.realpath(os.path.expanduser(value))
        return [where(v) for v in value] if isinstance(value, list) else value

    mine = to_dict(cfg)
    differ = [key for key in BASELINE_MATCH if setting(mine, key) != setting(theirs, key)]
    if differ:
        print(f"eval.baseline: {path} is not shown: its run differs from this job in {', '.join(differ)}", file=sys.stderr)
        return None
    return {**student, "model": "baseline"}


def hub_name(path: str | None) -> str | None:
    """The hub id of a model or dataset given as ``path``: a hub id itself (``org/name``), or the id inside a local copy of the
    hub's cache (``.../models--org--name/snapshots/HASH``); None for a local directory of one's own."""
    if not path:
        return None
    cached = re.search(r"(?:models|datasets)--([^/]+?)--([^/]+)", path)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if os.path.exists(os.path.expanduser(path)) or path.startswith(("/", ".", "~")):
        return None
    return path if re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", path) else None


def model_name(path: str) -> str:
    """How the card names a model: its hub id, else its directory's name (never a local cache path)."""
    return hub_name(path) or Path(os.path.expanduser(path)).name or path


def card_metadata(cfg: DistillConfig, *, lora: bool) -> dict:
    """The model card's YAML front matter: what the hub indexes (base model, datasets, license, tags, pipeline)."""
    datasets = [hub_name(source.data.dataset) for source in data_sources(cfg.data) if source.data.dataset]
    front = {"library_name": "peft" if lora else "transformers",
             "base_model": hub_name(cfg.student.path) if lora else hub_name(cfg.teacher.path),
             "datasets": [d for d in dict.fromkeys(datasets) if d] or None,
             "license": cfg.student.license,
             "tags": ["distillation", "knowledge-distillation", cfg.task.kind],
             "pipeline_tag": {"causal_lm": "text-generation", "masked_lm": "fill-mask", "sequence_classification": "text-classification"}[cfg.task.kind]}
    return {key: value for key, value in front.items() if value is not None}


def write_model_card(cfg: DistillConfig, result: dict, student_dir: Path, *, auto_class: str) -> None:
    """student/README.md: what the student is, how it was made and how it compares, ready for ``distill push``.

    A LoRA adapter's base model is the pretrained student it adapts; a whole student's ``base_model`` is the teacher it
    was distilled from (where the teacher has a hub id)."""
    if not student_dir.is_dir():
        return

    lora = cfg.student.lora is not None and not cfg.student.lora.merge
    teacher = model_name(cfg.teacher.path)
    data = cfg.data.dataset or ", ".join(Path(str(f)).name for f in cfg.data.train_files) or "a data mixture"
    objective = "; ".join(f"{t.get('name', t.get('kind'))} (" + ", ".join(f"{k} {v}" for k, v in t.items() if k != "name") + ")"
                          if isinstance(t, dict) else str(t) for t in result["objective"])
    loader = "AutoPeftModelForCausalLM" if lora else auto_class
    lines = [
        "---", yaml.safe_dump(card_metadata(cfg, lora=lora), sort_keys=False).strip(), "---", "",
        f"# {student_dir.parent.name}: a student distilled from {teacher}", "",
        f"This {'LoRA adapter' if lora else 'model'} was trained by knowledge distillation with distill: "
        f"it learned to match the teacher `{teacher}`"
        + (f" (loaded in {cfg.teacher.quantization})" if cfg.teacher.quantization != "none" else "") + ".", "",
        "## Training", "",
        f"- data: {data} (sequences of {cfg.data.seq_len} tokens)",
        f"- objective: {objective}" + ("" if cfg.loss.terms else f"; temperature {cfg.loss.temperature:g}"),
        f"- {result['steps']} optimizer steps of {cfg.train.micro_batch_size} x {cfg.train.grad_accum} sequences per process, "
        f"learning rate {cfg.train.lr:g} ({cfg.train.scheduler}), precision {cfg.train.precision}",
        f"- student: {result.get('student_total_params', 0):,} parameters ({result.get('student_trainable_params', 0):,} trained)", "",
        "## Evaluation", "",
        f"On the run's validation data ({result['validation_tokens']:,} targets), every model measured by the same code:", "",
        evaluation.table(result["rows"]), "",
        "## Intended use", "",
        f"A smaller, faster stand-in for `{teacher}` on text like its training data, or a draft model for the teacher's "
        "speculative decoding. It inherits the teacher's limitations and biases and has not been evaluated beyond the table above.", "",
        "## Loading", "",
        "PATH is this folder, or the hub repository it was pushed to (`distill push RUN_DIR REPO_ID`).", "",
        "```python",
        f"from transformers import AutoTokenizer{'' if lora else ', ' + auto_class}" + ("\nfrom peft import AutoPeftModelForCausalLM" if lora else ""),
        "",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        f"model = {loader}.from_pretrained(PATH)",
        "```", "",
    ]
    rundir.write_atomic(student_dir / "README.md", "\n".join(lines))


def final_metrics(rows: list[dict]) -> dict:
    """The report's numbers as tracker metrics, one per model row and figure: ``final/student/perplexity``, ..."""
    return {f"final/{row['model']}/{key}": float(value) for row in rows for key, value in row.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


QUALITY_METRICS = ("ce", "tokens", "perplexity", "kl_to_teacher", "top1_agreement", "accuracy", "macro_f1")


def final_eval_metrics(rows: list[dict]) -> dict:
    """The saved student's final evaluation under the names the mid-run evaluations log (``eval/perplexity``), so a
    tracker's last value and summary of each is the final one."""
    student = next((row for row in rows if row.get("model") == "student"), {})
    return {f"eval/{key}": float(value) for key, value in student.items()
            if (key in QUALITY_METRICS or key.startswith("metric/")) and isinstance(value, (int, float)) and not isinstance(value, bool)}


SOURCE_METRICS = ("perplexity", "accuracy", "macro_f1", "kl_to_teacher", "top1_agreement")


def source_rows(cfg: DistillConfig, task, student, teacher, by_source: dict, vocab: int, device) -> list[dict]:
    """One row per source and model (teacher, student), then each model's total weighted by the sources' weights."""
    weights = {source.name: source.weight for source in data_sources(cfg.data)}
    rows = []
    for name, batches in by_source.items():
        for model_name, model in (("teacher", teacher), ("student", student)):
            q = evaluation.quality(model, teacher, batches, vocab=vocab, device=device, task=task, teacher_is_model=model is teacher)
            rows.append({"source": name, "weight": weights[name], "model": model_name, "targets": q["tokens"],
                         **{k: q[k] for k in SOURCE_METRICS if k in q}})
    total = sum(weights[name] for name in by_source)  # the validated sources (one of unlabelled text has no validation)
    for model_name in ("teacher", "student"):
        mine = [r for r in rows if r["model"] == model_name and r["source"] in weights]
        rows.append({"source": "weighted total", "weight": total, "model": model_name, "targets": sum(r["targets"] for r in mine),
                     **{k: sum(r[k] * r["weight"] for r in mine) / total for k in SOURCE_METRICS if all(k in r for r in mine)}})
    return rows


def downstream_measure(cfg: DistillConfig, teacher, tokenizer, validation, device):
    """``fn(model, row name) -> fields``: lm-eval scores for every row, and the draft-model
    figures for every student row (measured against one run of the teacher by itself)."""

    ev = cfg.eval
    manager = downstream.task_manager(ev.lm_eval) if ev.lm_eval is not None else None
    reference = None
    if ev.speculative:
        reference = downstream.teacher_alone(teacher, validation, device=device, new_tokens=ev.speculative_new_tokens,
                                             prompts=ev.speculative_prompts, prompt_tokens=32)

    def measure(model, name: str) -> dict:
        fields = {}
        if manager is not None:
            fields.update(downstream.lm_eval_scores(model, tokenizer, ev.lm_eval, manager))
        if reference is not None and name != "teacher":
            fields.update(downstream.speculative(teacher, model, reference, device=device, new_tokens=ev.speculative_new_tokens))
        return fields

    return measure


def write_report(result: dict, run_dir: Path) -> None:
    drawn = plots.draw_run(run_dir, result)
    result["plots"] = [p.relative_to(run_dir).as_posix() for p in drawn]
    run = rundir.RunDir(run_dir)
    run.write_json(run.EVAL, result)
    samples = run.last_samples()
    shown = ["", f"## The student's completions at step {samples[0]['step']}", "", "Validation prompts, completed as in training (rollout.*).", "",
             markdown_table([{k: v for k, v in row.items() if k != "step"} for row in samples]), ""] if samples else []
    run.write(run.REPORT, evaluation.markdown_report(result) + "\n".join([*shown, "", *plots.markdown(drawn, run_dir)]))
    print("\n" + evaluation.table(result["rows"]))
    for line in evaluation.summary_lines(result):
        print(line)
    extra = report_tables(result["rows"])
    if extra:
        print("\n" + "\n".join(extra).rstrip())
    print(f"\nreport: {run_dir / 'report.md'}")
