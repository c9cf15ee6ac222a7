"""Evaluation: the same measuring code for teacher and student, and the report.

Quality is measured on validation batches: cross-entropy and perplexity against the data, and
KL(teacher || model) and top-1 agreement against the teacher, all per unmasked target token.
Sums and predictions are combined across processes first, so the figures do not depend on the
world size. The metrics are ``evaluate`` modules shipped in :mod:`distill.metrics` and loaded by
path: ``evaluate.load("accuracy")`` would fetch the metric's code from the hub.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill import metrics, models
from distill.downstream import report_tables
from distill.losses import IGNORE_INDEX, forward_kl
from distill.tasks import CausalLM


def _sum_across_processes(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values = values.clone()
        torch.distributed.all_reduce(values)
    return values


def _on(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _task(task):
    return task or CausalLM()


def _gather(values: list) -> list:
    """``values`` of every process, concatenated in rank order."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, values)
        return [v for part in parts for v in part]
    return values


@torch.inference_mode()
def quality(model, teacher, batches: list[dict], *, vocab: int, device, teacher_is_model: bool = False, task=None,
            extra_metrics: list[str] = ()) -> dict:
    """Per-target CE, KL(teacher || model) and top-1 agreement on ``batches``; perplexity for a
    language model, and masked-token accuracy for a masked one; accuracy and macro-F1 for a
    classifier (``vocab`` is then the class count).

    The metrics other than CE and perplexity are ``evaluate`` modules (:mod:`distill.metrics`),
    computed on the targets of every process gathered, so no figure depends on the world size;
    ``extra_metrics`` (``eval.metrics``) are computed on the same predictions and references.
    ``teacher`` may be None (no comparison); ``teacher_is_model`` skips the duplicate forward
    when the teacher itself is evaluated.
    """

    task = _task(task)
    if across(batches):  # the teacher tokenizes differently: measured on its own tokens, compared with nothing
        if teacher_is_model:
            batches, vocab = own_tokens(batches), models.output_vocab(model)
        teacher = None
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # ce, targets, the bytes of text they cover (rows that count them: distill.pairing)
    predictions, references, teacher_predictions, kl = [], [], [], []
    for batch in batches:
        batch = _on(batch, device)
        logits, labels = task.eval_logits(model, batch, vocab)
        logits, mask = logits.float(), labels != IGNORE_INDEX
        sums[0] += F.cross_entropy(logits, labels.clamp(min=0), reduction="none")[mask].sum().item()
        sums[1] += mask.sum().item()
        sums[2] += batch["target_bytes"].sum().item() if "target_bytes" in batch else 0
        predictions += logits.argmax(-1)[mask].tolist()
        references += labels[mask].tolist()
        if teacher is not None and not teacher_is_model:
            teacher_logits = task.eval_logits(teacher, batch, vocab)[0].float()
            teacher_predictions += teacher_logits.argmax(-1)[mask].tolist()
            kl += forward_kl(logits, teacher_logits)[mask].tolist()
    model.train(was_training)
    sums = _sum_across_processes(sums)
    predictions, references = _gather(predictions), _gather(references)
    result = {"ce": sums[0].item() / max(sums[1].item(), 1.0), "tokens": int(sums[1].item())}
    if task.perplexity:
        result["perplexity"] = math.exp(min(result["ce"], 80.0))
    if sums[2] > 0:  # the same text's cost under either tokenizer
        result["bits_per_byte"] = sums[0].item() / math.log(2) / sums[2].item()
    for name in task.label_metrics:
        result.update(metrics.compute(name, predictions=predictions, references=references))
    if teacher is not None and not teacher_is_model:
        result.update(metrics.compute("kl_to_teacher", predictions=_gather(kl)))
        result.update(metrics.compute("top1_agreement", predictions=predictions, references=_gather(teacher_predictions)))
    for name in extra_metrics:
        values = metrics.compute(name, predictions=predictions, references=references)
        result.update({f"metric/{metric_name(name)}/{key}": value for key, value in values.items() if isinstance(value, (int, float))})
    return result


def metric_name(name: str) -> str:
    """A metric's short name: a hub name as given, a path by its file or folder name."""

    return Path(name).stem if ("/" in name or name.endswith(".py")) else name


def across(batches: list[dict]) -> bool:
    """Whether ``batches`` pair the student with a teacher of another tokenizer (:mod:`distill.pairing`): they hold its tokens too."""
    return bool(batches) and "teacher_input_ids" in batches[0]


def own_tokens(batches: list[dict]) -> list[dict]:
    """Batches of a teacher of another tokenizer (:mod:`distill.pairing`) as it tokenizes them: its ids, and as targets its
    tokens of the text the student's targets are compared on (those in a group)."""
    return [{"input_ids": b["teacher_input_ids"], "attention_mask": b["teacher_attention_mask"],
             "labels": torch.where(b["teacher_groups"] >= 0, b["teacher_input_ids"], IGNORE_INDEX), "target_bytes": b["teacher_target_bytes"]}
            for b in batches]


@torch.inference_mode()
def teacher_fidelity(full_teacher, quantized_teacher, batches: list[dict], *, vocab: int, device, task=None) -> float:
    """KL(full-precision teacher || quantized teacher) per target."""
    task = _task(task)
    if across(batches):
        batches, vocab = own_tokens(batches), models.output_vocab(full_teacher)
    total = torch.zeros(2, dtype=torch.float64)  # KL sum, targets
    for batch in batches:
        batch = _on(batch, device)
        full, labels = task.eval_logits(full_teacher, batch, vocab)
        quant = task.eval_logits(quantized_teacher, batch, vocab)[0]
        mask = labels != IGNORE_INDEX
        total[0] += forward_kl(quant.float(), full.float())[mask].sum().item()
        total[1] += mask.sum().item()
    total = _sum_across_processes(total)
    return total[0].item() / max(total[1].item(), 1.0)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def speed(model, batches: list[dict], *, device, new_tokens: int, batch_size: int, repeats: int, pad_id: int) -> dict:
    """Latency of greedy generation at batch 1 and forward throughput at ``batch_size``.

    Returns:
        ``latency_ms_per_token`` (decode, with KV cache, 16-token prompt) and
        ``throughput_tokens_per_s`` (full-sequence forward passes).
    """
    model.eval()
    width = min(b["input_ids"].shape[1] for b in batches)  # a teacher's own tokens of the batches (own_tokens) vary in width
    rows = torch.cat([b["input_ids"][:, :width] for b in batches])
    prompt = rows[:1, :16].to(device)
    generate = lambda: model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
        synced_gpus=False,  # measured on the main process alone; the default syncs all ranks under ZeRO-3
    )
    latency = _timed(generate, device, repeats)
    block = rows[torch.arange(batch_size) % rows.shape[0]].to(device)
    throughput_time = _timed(lambda: model(input_ids=block), device, repeats)
    return {
        "latency_ms_per_token": 1000.0 * latency / new_tokens,
        "throughput_tokens_per_s": block.numel() / throughput_time,
    }


@torch.inference_mode()
def classifier_speed(model, batches: list[dict], *, device, batch_size: int, repeats: int, **_) -> dict:
    """Latency of one sequence's forward at batch 1 and forward throughput at ``batch_size``."""
    model.eval()
    rows, mask = batches[0]["input_ids"], batches[0]["attention_mask"]  # one batch: their padded widths differ
    one = {"input_ids": rows[:1].to(device), "attention_mask": mask[:1].to(device)}
    latency = _timed(lambda: model(**one), device, repeats)
    pick = torch.arange(batch_size) % rows.shape[0]
    block = {"input_ids": rows[pick].to(device), "attention_mask": mask[pick].to(device)}
    throughput_time = _timed(lambda: model(**block), device, repeats)
    return {"latency_ms_per_sequence": 1000.0 * latency, "throughput_tokens_per_s": int(block["attention_mask"].sum()) / throughput_time,
            "throughput_sequences_per_s": batch_size / throughput_time}


def measure_speed(model, batches: list[dict], *, task, device, eval_cfg, pad_id: int) -> dict:
    """The task's speed figures: generation latency for a language model, forward latency for a classifier."""
    measure = speed if _task(task).generates else classifier_speed
    return measure(model, batches, device=device, new_tokens=eval_cfg.latency_new_tokens, batch_size=eval_cfg.throughput_batch_size,
                   repeats=eval_cfg.speed_repeats, pad_id=pad_id)


def parameter_count(model) -> int:
    """Parameters as the unquantized model would count them (4-bit packing undone)."""
    return model.num_parameters() if hasattr(model, "num_parameters") else sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- report

COLUMNS = [
    ("model", "model", "{}"),
    ("params", "params", "{:,}"),
    ("disk_bytes", "disk MB", "{:.2f}", 1e-6),
    ("memory_bytes", "memory MB", "{:.2f}", 1e-6),
    ("quantization", "quant", "{}"),
    ("perplexity", "ppl", "{:.2f}"),
    ("bits_per_byte", "bits/byte", "{:.3f}"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("macro_f1", "macro-F1", "{:.3f}"),
    ("kl_to_teacher", "KL(T||S)", "{:.4f}"),
    ("top1_agreement", "top-1 agree", "{:.1%}"),
    ("latency_ms_per_token", "latency ms/tok", "{:.2f}"),
    ("latency_ms_per_sequence", "latency ms/seq", "{:.2f}"),
    ("throughput_tokens_per_s", "tokens/s", "{:,.0f}"),
]


def _cell(row: dict, column: tuple) -> str:
    key, fmt = column[0], column[2]
    value = row.get(key)
    if value is None:
        return "-"
    if len(column) > 3:
        value = value * column[3]
    return fmt.format(value)


def _markdown(columns: list[tuple], rows: list[dict], keep: tuple = ()) -> list[str]:
    """Lines of a Markdown table of ``rows``: the ``columns`` some row has (``keep`` always); readable on a terminal too."""
    columns = [c for c in columns if c[0] in keep or any(r.get(c[0]) is not None for r in rows)]
    header = [c[1] for c in columns]
    body = [[_cell(r, c) for c in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]


def table(rows: list[dict]) -> str:
    """A Markdown table, one row per model, of the columns some model has."""
    return "\n".join(_markdown(COLUMNS, rows, keep=("model", "params")))


def summary_lines(result: dict) -> list[str]:
    """The headline comparisons under the table."""
    lines = []
    rows = {r["model"]: r for r in result["rows"]}
    teacher, student = rows.get("teacher"), rows.get("student")
    if teacher and student:
        if student.get("latency_ms_per_sequence") and teacher.get("latency_ms_per_sequence"):
            lines.append(f"student speedup over teacher: {student['throughput_tokens_per_s'] / teacher['throughput_tokens_per_s']:.2f}x throughput, "
                         f"{teacher['latency_ms_per_sequence'] / student['latency_ms_per_sequence']:.2f}x latency")
        elif student.get("throughput_tokens_per_s") and teacher.get("throughput_tokens_per_s"):
            lines.append(f"student speedup over teacher: {student['throughput_tokens_per_s'] / teacher['throughput_tokens_per_s']:.2f}x throughput, "
                         f"{teacher['latency_ms_per_token'] / student['latency_ms_per_token']:.2f}x latency")
        if student.get("disk_bytes") and teacher.get("disk_bytes"):
            lines.append(f"student compression: {teacher['params'] / student['params']:.2f}x fewer parameters, "
                         f"{teacher['disk_bytes'] / student['disk_bytes']:.2f}x fewer bytes on disk")
    if "initial_student" in rows and student and student.get("accuracy") is not None:
        lines.append(f"accuracy: {rows['initial_student']['accuracy']:.1%} before training -> {student['accuracy']:.1%} distilled (teacher {teacher['accuracy']:.1%})")
    elif "initial_student" in rows and student and result.get("pairing"):  # each model's perplexity is per token of its own tokenizer
        lines.append(f"bits per byte: {rows['initial_student']['bits_per_byte']:.3f} before training -> {student['bits_per_byte']:.3f} distilled "
                     f"(teacher {teacher['bits_per_byte']:.3f})")
    elif "initial_student" in rows and student:
        lines.append(f"perplexity: {rows['initial_student']['perplexity']:.2f} before training -> {student['perplexity']:.2f} distilled (teacher {teacher['perplexity']:.2f})")
    baseline = rows.get("baseline")
    if baseline and student:
        metric = "accuracy" if student.get("accuracy") is not None else "perplexity"
        better = student[metric] > baseline[metric] if metric == "accuracy" else student[metric] < baseline[metric]
        change = (student[metric] - baseline[metric]) / baseline[metric]
        shown = (lambda v: f"{v:.1%}") if metric == "accuracy" else (lambda v: f"{v:.2f}")
        lines.append(f"against the baseline (the same student, data and steps, without the teacher): {metric} {shown(baseline[metric])} -> "
                     f"{shown(student[metric])} distilled ({abs(change):.1%} {'better' if better else 'worse'})")
    if result.get("pairing"):
        p = result["pairing"]
        lines.append(f"pairing: the teacher tokenizes differently ({p['teacher_vocabulary']:,} ids, the student {p['student_vocabulary']:,}, "
                     f"{p['shared_tokens']:,} tokens in both); {p['aligned_targets']:,} of {p['targets']:,} training targets matched to the "
                     "teacher's tokens; each model's perplexity is per token of its own tokenizer, bits per byte compare them")
    if result.get("train_rows_unlabelled"):
        lines.append(f"training rows seen: {result['train_rows_labelled']:,} labelled, {result['train_rows_unlabelled']:,} without a label "
                     "(the teacher's terms only)")
    trainable, total = result.get("student_trainable_params"), result.get("student_total_params")
    if trainable and total and trainable < total:
        lines.append(f"trained parameters: {trainable:,} of {total:,} ({trainable / total:.2%}; LoRA adapters)")
    if result.get("teacher_fidelity_kl") is not None:
        lines.append(f"teacher fidelity: KL(full-precision || {teacher['quantization']}) = {result['teacher_fidelity_kl']:.5f} per token; "
                     f"memory {result['teacher_full_memory_bytes'] / 1e6:.2f} MB -> {teacher['memory_bytes'] / 1e6:.2f} MB")
    return lines


def markdown_report(result: dict) -> str:
    if result.get("task", "causal_lm") == "causal_lm":
        about = (f"Validation: {result['validation_tokens']:,} target tokens. Perplexity and KL are per token; "
                 "KL(T||S) is the forward KL from the teacher at temperature 1; latency is greedy decoding at batch 1, ")
    elif result["task"] == "masked_lm":
        about = (f"Validation: {result['validation_tokens']:,} masked tokens. Perplexity, accuracy and KL are per masked token; "
                 "KL(T||S) is the forward KL from the teacher at temperature 1; latency is one sequence's forward pass at batch 1, ")
    else:
        about = (f"Validation: {result['validation_tokens']:,} labelled sequences. KL(T||S) is the forward KL of the class distributions "
                 "at temperature 1, per sequence; latency is one sequence's forward pass at batch 1, ")
    lines = [
        "# Distillation report", "",
        about + f"throughput is forward passes at batch {result['throughput_batch_size']}.", "",
        table(result["rows"]), "",
        *[f"- {line}" for line in summary_lines(result)], "",
        *source_table(result.get("sources")),
        *report_tables(result["rows"]),
    ]
    return "\n".join(lines)


def source_table(rows: list[dict] | None) -> list[str]:
    """The per-source rows of a mixture as Markdown (empty without one)."""
    if not rows:
        return []
    columns = [("source", "source", "{}"), ("weight", "weight", "{:g}"), ("model", "model", "{}"), ("targets", "targets", "{:,}"),
               *[c for c in COLUMNS if c[0] in ("perplexity", "accuracy", "macro_f1", "kl_to_teacher", "top1_agreement")]]
    return ["Per source of the mixture (the total weighs each source by its weight):", "", *_markdown(columns, rows), ""]
