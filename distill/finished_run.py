"""A finished run directory, opened by one module for every post-training tool.

``distill eval`` and ``distill quantize`` (and, later, comparisons and sweeps) open a run here:
its saved config, its student, its previous evaluation, and the models and validation data
loaded the way the job loaded them. They never reach into the trainer's helpers.
"""

from __future__ import annotations

import os
from pathlib import Path

from distill import downstream, metrics, report, rundir
from distill.config import ConfigError, DistillConfig, LmEvalConfig, load_config, loss_terms, user_term, validate
from distill.models import _pretrained
from distill.quantize import check_method_fits, quantization_config, quantized_rows
from distill.setup import Setup, make_accelerator, validation_sets
from distill.tasks import build_task


class FinishedRun:
    """``RUN_DIR`` of a run that saved its student; :meth:`load` brings its models and data up."""

    def __init__(self, path: str | os.PathLike, *, allow_code: bool = False):
        self.run = rundir.RunDir(path)
        self.dir = self.run.path
        if not self.run.is_run():
            raise ConfigError(f"{self.dir} is not a run directory (no config.yaml); pass the output_dir of a run")
        if not self.run.student.is_dir():
            raise ConfigError(f"{self.dir} has no student/ (the run did not finish); resume it with distill run --resume")
        rundir.check_links(self.dir)
        self.cfg = load_config(self.run.config, [f"output_dir={self.dir}"])
        code = [f"eval.metrics: {', '.join(names)}" for names in [metrics.code_named(self.cfg.eval.metrics)] if names]
        code += [f"loss.terms[{i}].kind: {spec['kind']}" for i, spec in enumerate(loss_terms(self.cfg.loss)) if user_term(spec.get("kind"))]
        if code and not allow_code:
            # A run directory may come from someone else: what its config names must not run unasked.
            raise ConfigError(f"{self.run.config} names code to run ({'; '.join(code)}); "
                              "pass --allow-code if you trust this run directory and that code")
        self.previous = self.run.read_eval() or {}

    def lock(self) -> rundir.RunLock:
        """Post-training tools rewrite eval.json and report.md: one writer at a time."""
        return rundir.RunLock(self.dir)

    def facts(self) -> dict:
        """Figures only training knows (trainable parameters), kept from the previous evaluation."""
        return {key: self.previous[key] for key in ("student_trainable_params", "student_total_params") if key in self.previous}

    def quantized_methods(self) -> list[str]:
        """Quantization rows the report has (from eval.quantize or distill quantize)."""
        added = [row["model"].split("+", 1)[1] for row in self.previous.get("rows", []) if str(row.get("model", "")).startswith("student+")]
        return list(dict.fromkeys([*self.cfg.eval.quantize, *added]))

    def load(self) -> "Loaded":
        """Teacher, the saved student, tokenizer and validation batches, as the job loads them."""

        saved_student(self.cfg, self.dir)
        accelerator = make_accelerator(self.cfg)
        setup = Setup(self.cfg, accelerator.device)
        setup.student.to(accelerator.device)
        return Loaded(accelerator, setup, validation_sets(setup, self.cfg, accelerator))


class Loaded:
    def __init__(self, accelerator, setup, by_source: dict):
        self.accelerator, self.setup = accelerator, setup
        self.validation = [batch for batches in by_source.values() for batch in batches]
        self.by_source = by_source
        self.device = accelerator.device


def saved_student(cfg: DistillConfig, run_dir: Path) -> None:
    """Points ``cfg`` at the run's saved student (a LoRA adapter loads with its base)."""
    cfg.student.path, cfg.student.architecture, cfg.student.prune = str(rundir.RunDir(run_dir).student), {}, {}
    cfg.student.init, cfg.student.init_layers, cfg.student.init_from = "random", [], None
    cfg.student.lora, cfg.student.quantization = None, "none"


def evaluate_run(run_dir: str | os.PathLike, *, lm_eval_tasks: list[str] | None = None, lm_eval_include: list[str] | None = None,
                 lm_eval_limit: float | None = None, speculative: bool = False, allow_code: bool = False) -> dict | None:
    """Re-evaluates a finished run from its saved config and student (``distill eval``).

    Rows that ``distill quantize`` added are measured again (re-quantized from student/).
    ``lm_eval_tasks`` (with ``lm_eval_include`` folders and ``lm_eval_limit``) and
    ``speculative`` add downstream benchmarks and the draft-model measurement to the run's own
    ``eval.lm_eval`` and ``eval.speculative``. Metric code the run's config names runs only with ``allow_code``.
    """
    run = FinishedRun(run_dir, allow_code=allow_code)
    with run.lock():
        cfg = run.cfg
        cfg.eval.quantize = run.quantized_methods()
        _add_downstream(cfg, lm_eval_tasks, lm_eval_include, lm_eval_limit, speculative)
        loaded = run.load()
        s = loaded.setup
        return report.final_evaluation(cfg, loaded.accelerator, s.student, s.teacher, loaded.validation, s.vocab, run.dir, s.tokenizer,
                                       None, run.facts(), by_source=loaded.by_source if cfg.data.mixture else None)


def _add_downstream(cfg: DistillConfig, tasks, include, limit, speculative: bool) -> None:
    if tasks:
        lm = cfg.eval.lm_eval or LmEvalConfig()
        lm.tasks = list(dict.fromkeys([*lm.tasks, *tasks]))
        lm.include_path = list(dict.fromkeys([*lm.include_path, *(include or [])]))
        lm.limit = limit if limit is not None else lm.limit
        cfg.eval.lm_eval = lm
    cfg.eval.speculative = cfg.eval.speculative or speculative
    validate(cfg)
    if cfg.eval.lm_eval is not None:
        downstream.check_tasks(cfg.eval.lm_eval)


def quantize_run(run_dir: str | os.PathLike, methods: list[str], *, allow_code: bool = False) -> dict:
    """``distill quantize``: quantizes RUN_DIR/student with each method and adds its row to the report
    (metric code the run's config names runs only with ``allow_code``)."""
    from transformers import AutoConfig  # start-up time: transformers loads only when this runs

    for method in methods:  # every method checked before any work
        quantization_config(method)
    if not rundir.RunDir(run_dir).eval.is_file():
        raise ConfigError(f"{run_dir} is not a finished run (needs student/ and eval.json); run distill run first")
    run = FinishedRun(run_dir, allow_code=allow_code)
    with run.lock():  # it writes quantized/, eval.json and report.md: one writer
        student_config = _pretrained(AutoConfig, str(run.run.student), "the run's student/")
        for method in methods:
            check_method_fits(student_config, method, model_class=build_task(run.cfg.task).auto_class)
        loaded = run.load()
        s = loaded.setup
        result = dict(run.previous)
        result["rows"] = [r for r in result.get("rows", []) if r["model"] not in {f"student+{m}" for m in methods}]
        measure = report.downstream_measure(run.cfg, s.teacher, s.tokenizer, loaded.validation, loaded.device)
        result["rows"] += quantized_rows(run.dir, methods, teacher=s.teacher, validation=loaded.validation, vocab=s.vocab,
                                         device=loaded.device, eval_cfg=run.cfg.eval, pad_id=s.tokenizer.pad_token_id, measure=measure,
                                         task=s.task)
        report.write_report(result, run.dir)
        return result
