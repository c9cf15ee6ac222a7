"""Judging models as their users will: downstream benchmarks and speculative decoding.

- :func:`lm_eval_scores`: EleutherAI's lm-evaluation-harness on a model the job has loaded
  (its ``HFLM`` wrapper takes a model instance), for every report row. Tasks come from the
  harness's registry (whose data needs the hub) or from task YAML files in
  ``eval.lm_eval.include_path`` with local data files (what works offline).
- :func:`speculative`: the student as the teacher's draft model in transformers' assisted
  generation, greedy, batch 1: draft tokens accepted per teacher step, acceptance rate, and
  tokens/s of the teacher alone against the teacher with the draft. Greedy assisted generation
  must reproduce the teacher's own outputs exactly; that is checked on every prompt.
"""

from __future__ import annotations

import difflib
import functools
import os
import statistics
import time

import torch

from distill.config import ConfigError, LmEvalConfig
from distill.errors import first_line
from distill.models import output_vocab


def _lm_eval():
    try:
        import lm_eval  # optional dependency (distill[lm-eval])
        from lm_eval.tasks import TaskManager  # optional dependency (distill[lm-eval])
    except ImportError:
        raise ConfigError("eval.lm_eval needs lm-evaluation-harness: pip install 'distill[lm-eval]' (or pip install lm-eval)") from None
    return lm_eval, TaskManager


def task_manager(cfg: LmEvalConfig):
    """The harness's task index: its registry plus ``cfg.include_path`` (which takes precedence)."""
    _lm_eval()  # a missing harness is an error before anything else
    paths = tuple(os.path.expanduser(p) for p in cfg.include_path)
    for path in paths:
        if not os.path.isdir(path):
            raise ConfigError(f"eval.lm_eval.include_path: not a directory: {path}")
    return _indexed(paths)


@functools.lru_cache(maxsize=4)
def _indexed(paths: tuple):
    # Indexing the registry (some 15,000 task files) takes seconds: the check before training and
    # the evaluation after it share one index.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None)


def check_tasks(cfg: LmEvalConfig):
    """Fails before training on a missing harness, an unknown task or data that cannot load."""
    manager = task_manager(cfg)
    known = set(manager.all_tasks)
    for task in cfg.tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else "; add its YAML folder to eval.lm_eval.include_path"
            raise ConfigError(f"eval.lm_eval.tasks: unknown lm-eval task {task!r}{hint}")
    _task_dict(cfg, manager)  # loads each task's data now (from the hub or local files)
    return manager


def _task_dict(cfg: LmEvalConfig, manager) -> dict:
    from lm_eval.tasks import get_task_dict  # optional dependency (distill[lm-eval])

    try:
        return get_task_dict(list(cfg.tasks), manager)
    except Exception as err:  # datasets and the hub raise many types; the task and the cause matter
        text = first_line(err)
        offline = " (offline? registry tasks fetch their data from the hub; use a local task in eval.lm_eval.include_path)" \
            if "hub" in text.lower() or isinstance(err, ConnectionError) else ""
        raise ConfigError(f"eval.lm_eval.tasks {', '.join(cfg.tasks)}: cannot load the task data: {text}{offline}") from None


def lm_eval_scores(model, tokenizer, cfg: LmEvalConfig, manager) -> dict:
    """``{"lm_eval/TASK/METRIC": value, "lm_eval/TASK/METRIC_stderr": stderr}`` for ``model``."""
    lm_eval, _ = _lm_eval()
    from lm_eval.models.huggingface import HFLM  # optional dependency (distill[lm-eval])

    was_training = model.training
    model.eval()
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    limit = cfg.limit if cfg.limit is None or cfg.limit < 1 else int(cfg.limit)
    results = lm_eval.simple_evaluate(model=wrapped, tasks=list(cfg.tasks), task_manager=manager, num_fewshot=cfg.num_fewshot, limit=limit, log_samples=False,
                                      bootstrap_iters=cfg.bootstrap_iters)
    model.train(was_training)
    scores = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name = key.partition(",")[0]  # "acc,none" / "acc_stderr,none": metric, then the filter
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "sample_len":
                scores[f"lm_eval/{task}/{name}"] = float(value)
    return scores


# ----------------------------------------------------------------------------- speculative decoding


def _prompts(batches: list[dict], count: int, length: int) -> list[torch.Tensor]:
    """The first ``count`` validation sequences cut to ``length`` tokens (no padding)."""
    prompts = []
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            real = ids[mask.bool()]
            prompts.append(real[: min(length, max(1, len(real) // 2))].unsqueeze(0))
            if len(prompts) == count:
                return prompts
    return prompts


class _ForwardCounter:
    def __init__(self, model):
        self.count = 0
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.count += 1

    def remove(self):
        self._handle.remove()


def _generate(model, prompt, *, device, new_tokens: int, draft=None) -> torch.Tensor:
    ids = prompt.to(device)
    extra = {"assistant_model": draft} if draft is not None else {}
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                          synced_gpus=False, **extra)[0, ids.shape[1]:]


def vocab_mismatch(teacher, draft) -> str | None:
    t, d = output_vocab(teacher), output_vocab(draft)
    return None if t == d else f"not measured: the teacher's and the draft's vocabularies differ ({t} vs {d} ids)"


@torch.inference_mode()
def teacher_alone(teacher, batches: list[dict], *, device, new_tokens: int, prompts: int, prompt_tokens: int) -> dict:
    """Greedy outputs and tokens/s of the teacher by itself (the reference for every draft)."""
    cases = _prompts(batches, prompts, prompt_tokens)
    _generate(teacher, cases[0], device=device, new_tokens=4)  # warm-up
    outputs, seconds = [], 0.0
    for prompt in cases:
        start = time.perf_counter()
        outputs.append(_generate(teacher, prompt, device=device, new_tokens=new_tokens).cpu())
        seconds += time.perf_counter() - start
    return {"prompts": cases, "outputs": outputs, "tokens_per_s": sum(len(o) for o in outputs) / seconds}


@torch.inference_mode()
def speculative(teacher, draft, reference: dict, *, device, new_tokens: int) -> dict:
    """Assisted generation of the teacher with ``draft``, against ``reference`` (:func:`teacher_alone`).

    A teacher step verifies the draft's candidates and adds one token of its own, so over a
    generation ``accepted = new tokens - teacher steps``; each draft forward proposes one token.
    """
    mismatch = vocab_mismatch(teacher, draft)
    if mismatch:
        return {"spec_note": mismatch}
    was_training = draft.training
    draft.eval()
    _generate(teacher, reference["prompts"][0], device=device, new_tokens=4, draft=draft)  # warm-up
    teacher_steps, draft_steps = _ForwardCounter(teacher), _ForwardCounter(draft)
    generated, seconds, identical, per_step = 0, 0.0, True, []
    try:
        for prompt, expected in zip(reference["prompts"], reference["outputs"]):
            steps_before = teacher_steps.count
            start = time.perf_counter()
            out = _generate(teacher, prompt, device=device, new_tokens=new_tokens, draft=draft).cpu()
            seconds += time.perf_counter() - start
            identical = identical and torch.equal(out, expected)
            generated += len(out)
            steps = teacher_steps.count - steps_before
            per_step.append((len(out) - steps) / max(steps, 1))
    finally:
        teacher_steps.remove()
        draft_steps.remove()
        draft.train(was_training)
    accepted = generated - teacher_steps.count
    tokens_per_s = generated / seconds
    return {
        "spec_accepted_per_step": statistics.fmean(per_step),
        "spec_acceptance_rate": min(1.0, accepted / max(draft_steps.count, 1)),
        "spec_tokens_per_s": tokens_per_s,
        "spec_teacher_tokens_per_s": reference["tokens_per_s"],
        "spec_speedup": tokens_per_s / reference["tokens_per_s"],
        "spec_identical": identical,
    }


# ----------------------------------------------------------------------------- the report


def report_tables(rows: list[dict]) -> list[str]:
    """Markdown tables of the benchmark scores, further metrics and draft-model figures (empty when none ran)."""
    lines = []
    scores = sorted({k for r in rows for k in r if k.startswith("lm_eval/") and not k.endswith("_stderr")})
    if scores:
        header = ["model", *(k.removeprefix("lm_eval/") for k in scores)]
        body = [[r["model"], *(_score(r, k) for k in scores)] for r in rows if any(k in r for k in scores)]
        lines += ["Downstream benchmarks (lm-evaluation-harness; ± standard error):", "", *_markdown(header, body), ""]
    extra = sorted({k for r in rows for k in r if k.startswith("metric/")})
    if extra:
        header = ["model", *(k.removeprefix("metric/") for k in extra)]
        body = [[r["model"], *(f"{r[k]:.4f}" if k in r else "-" for k in extra)] for r in rows if any(k in r for k in extra)]
        lines += ["Further metrics (eval.metrics):", "", *_markdown(header, body), ""]
    drafts = [r for r in rows if any(k.startswith("spec_") for k in r)]
    if drafts:
        header = ["draft for the teacher", "accepted/step", "acceptance", "teacher tok/s", "with draft tok/s", "speedup", "same outputs"]
        body = []
        for r in drafts:
            if "spec_note" in r:
                body.append([r["model"], r["spec_note"], "", "", "", "", ""])
                continue
            body.append([r["model"], f"{r['spec_accepted_per_step']:.2f}", f"{r['spec_acceptance_rate']:.1%}", f"{r['spec_teacher_tokens_per_s']:,.0f}",
                         f"{r['spec_tokens_per_s']:,.0f}", f"{r['spec_speedup']:.2f}x", "yes" if r["spec_identical"] else "NO"])
        lines += ["Speculative decoding (greedy, batch 1, the model as the teacher's draft):", "", *_markdown(header, body), ""]
    return lines


def _score(row: dict, key: str) -> str:
    if key not in row:
        return "-"
    stderr = row.get(key + "_stderr")
    return f"{row[key]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def _markdown(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]


def summary_metrics(rows: list[dict]) -> dict:
    """Numeric per-model figures for the trackers: ``MODEL/lm_eval/TASK/METRIC``, ``MODEL/spec_*``, ``MODEL/metric/NAME/KEY``."""
    flat = {}
    for row in rows:
        for key, value in row.items():
            if (key.startswith(("lm_eval/", "spec_", "metric/"))) and isinstance(value, (int, float)):
                flat[f"{row['model']}/{key}"] = float(value)
    return flat
