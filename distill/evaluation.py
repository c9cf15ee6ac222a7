"""Evaluation: the same measuring code for teacher and student, and the report.

Quality is measured on validation batches: cross-entropy and perplexity against the data, and
KL(teacher || model) and top-1 agreement against the teacher, all per unmasked target token.
Sums are all-reduced across processes before dividing, so the figures do not depend on the
world size. The core metrics are computed here rather than with ``evaluate.load``, which needs
the hub to fetch metric code.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

from distill.losses import IGNORE_INDEX, forward_kl


def _sum_across_processes(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values = values.clone()
        torch.distributed.all_reduce(values)
    return values


def forward_logits(model, batch: dict, vocab: int, device) -> torch.Tensor:
    """``[B, L-1, vocab]`` logits predicting tokens 1..L-1, cut to the shared vocabulary."""
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return logits[:, :-1, :vocab]


@torch.inference_mode()
def quality(model, teacher, batches: list[dict], *, vocab: int, device, teacher_is_model: bool = False) -> dict:
    """Per-token CE, perplexity, KL(teacher || model) and top-1 agreement on ``batches``.

    ``teacher`` may be None (no comparison). ``teacher_is_model`` skips the duplicate forward
    when the teacher itself is evaluated.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # ce, kl, agree, tokens
    for batch in batches:
        labels = batch["labels"][:, 1:].to(device)
        mask = labels != IGNORE_INDEX
        logits = forward_logits(model, batch, vocab, device).float()
        ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        sums[0] += ce[mask].sum().item()
        sums[3] += mask.sum().item()
        if teacher is not None and not teacher_is_model:
            teacher_logits = forward_logits(teacher, batch, vocab, device).float()
            sums[1] += forward_kl(logits, teacher_logits)[mask].sum().item()
            sums[2] += (logits.argmax(-1) == teacher_logits.argmax(-1))[mask].sum().item()
    model.train(was_training)
    sums = _sum_across_processes(sums)
    tokens = max(sums[3].item(), 1.0)
    result = {"ce": sums[0].item() / tokens, "tokens": int(sums[3].item())}
    result["perplexity"] = math.exp(min(result["ce"], 80.0))
    if teacher is not None and not teacher_is_model:
        result["kl_to_teacher"] = sums[1].item() / tokens
        result["top1_agreement"] = sums[2].item() / tokens
    return result


@torch.inference_mode()
def teacher_fidelity(full_teacher, quantized_teacher, batches: list[dict], *, vocab: int, device) -> float:
    """KL(full-precision teacher || quantized teacher) per target token."""
    total = torch.zeros(2, dtype=torch.float64)  # KL sum, tokens
    for batch in batches:
        mask = batch["labels"][:, 1:].to(device) != IGNORE_INDEX
        full = forward_logits(full_teacher, batch, vocab, device).float()
        quant = forward_logits(quantized_teacher, batch, vocab, device).float()
        total[0] += forward_kl(quant, full)[mask].sum().item()
        total[1] += mask.sum().item()
    total = _sum_across_processes(total)
    return total[0].item() / max(total[1].item(), 1.0)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
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
    rows = torch.cat([b["input_ids"] for b in batches])
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
    ("kl_to_teacher", "KL(T||S)", "{:.4f}"),
    ("top1_agreement", "top-1 agree", "{:.1%}"),
    ("latency_ms_per_token", "latency ms/tok", "{:.2f}"),
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


def table(rows: list[dict]) -> str:
    """A Markdown table, one row per model; readable on a terminal too."""
    header = [c[1] for c in COLUMNS]
    body = [[_cell(r, c) for c in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def summary_lines(result: dict) -> list[str]:
    """The headline comparisons under the table."""
    lines = []
    rows = {r["model"]: r for r in result["rows"]}
    teacher, student = rows.get("teacher"), rows.get("student")
    if teacher and student:
        if student.get("throughput_tokens_per_s") and teacher.get("throughput_tokens_per_s"):
            lines.append(f"student speedup over teacher: {student['throughput_tokens_per_s'] / teacher['throughput_tokens_per_s']:.2f}x throughput, "
                         f"{teacher['latency_ms_per_token'] / student['latency_ms_per_token']:.2f}x latency")
        if student.get("disk_bytes") and teacher.get("disk_bytes"):
            lines.append(f"student compression: {teacher['params'] / student['params']:.2f}x fewer parameters, "
                         f"{teacher['disk_bytes'] / student['disk_bytes']:.2f}x fewer bytes on disk")
    if "initial_student" in rows and student:
        lines.append(f"perplexity: {rows['initial_student']['perplexity']:.2f} before training -> {student['perplexity']:.2f} distilled (teacher {teacher['perplexity']:.2f})")
    trainable, total = result.get("student_trainable_params"), result.get("student_total_params")
    if trainable and total and trainable < total:
        lines.append(f"trained parameters: {trainable:,} of {total:,} ({trainable / total:.2%}; LoRA adapters)")
    if result.get("teacher_fidelity_kl") is not None:
        lines.append(f"teacher fidelity: KL(full-precision || {teacher['quantization']}) = {result['teacher_fidelity_kl']:.5f} per token; "
                     f"memory {result['teacher_full_memory_bytes'] / 1e6:.2f} MB -> {teacher['memory_bytes'] / 1e6:.2f} MB")
    return lines


def markdown_report(result: dict) -> str:
    from distill.downstream import report_tables

    lines = [
        "# Distillation report", "",
        f"Validation: {result['validation_tokens']:,} target tokens. Perplexity and KL are per token; "
        "KL(T||S) is the forward KL from the teacher at temperature 1; latency is greedy decoding at batch 1, "
        f"throughput is forward passes at batch {result['throughput_batch_size']}.", "",
        table(result["rows"]), "",
        *[f"- {line}" for line in summary_lines(result)], "",
        *report_tables(result["rows"]),
    ]
    return "\n".join(lines)
