"""Distillation divergences: pure functions of logits.

Each divergence takes ``student_logits`` and ``teacher_logits`` of shape ``[..., vocab]``, softens
both with ``temperature``, computes in float32 whatever the input dtype, and returns the
per-token loss of shape ``student_logits.shape[:-1]`` with no reduction. The trainer masks,
sums and normalizes (see :func:`term_sums`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# A target without a hard label (a classifier's unlabelled row): the teacher's terms use it, the label's (ce) give it 0.
UNLABELED = -1


def log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim, from log-probabilities; 0 * log 0 counts as 0."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p * p + (1 - weight_p) * q), computed stably in log space."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_T || p_S): mass-covering; the classic Hinton KD objective.

    Args:
        student_logits: ``[..., V]`` logits of the student.
        teacher_logits: ``[..., V]`` logits of the teacher.
        temperature: softmax temperature applied to both.

    Returns:
        ``[...]`` float32 per-token divergence.
    """
    return _kl(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_S || p_T): mode-seeking (MiniLLM). Shapes as in :func:`forward_kl`."""
    return _kl(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature))


def jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, Eq. 1), TRL's convention.

    With M = beta * p_T + (1 - beta) * p_S the loss is beta * KL(p_T || M) + (1 - beta) * KL(p_S || M).
    The endpoints are defined as the limits TRL uses: beta = 0 is forward KL, beta = 1 reverse KL.
    Shapes as in :func:`forward_kl`.
    """
    log_t, log_s = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = _log_mix(log_t, log_s, beta)
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def skew_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, alpha: float = 0.1, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_T || alpha * p_T + (1 - alpha) * p_S), DistiLLM's skew KL (Ko et al. 2024)."""
    log_t, log_s = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    if alpha == 0.0:
        return _kl(log_t, log_s)
    return _kl(log_t, _log_mix(log_t, log_s, alpha))


def skew_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, alpha: float = 0.1, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_S || alpha * p_S + (1 - alpha) * p_T), DistiLLM's skew reverse KL."""
    log_t, log_s = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    if alpha == 0.0:
        return _kl(log_s, log_t)
    return _kl(log_s, _log_mix(log_s, log_t, alpha))


def tvd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Total variation distance 0.5 * sum |p_T - p_S|. Shapes as in :func:`forward_kl`."""
    p_t = log_probs(teacher_logits, temperature).exp()
    p_s = log_probs(student_logits, temperature).exp()
    return 0.5 * (p_t - p_s).abs().sum(-1)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}


def divergence(kind: str, *, temperature: float, jsd_beta: float = 0.5, skew_alpha: float = 0.1) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The divergence ``kind`` with its parameters bound: ``fn(student_logits, teacher_logits)``."""
    fn = DIVERGENCES[kind]
    extra = {"jsd": {"beta": jsd_beta}, "skew_forward_kl": {"alpha": skew_alpha}, "skew_reverse_kl": {"alpha": skew_alpha}}.get(kind, {})
    return lambda s, t: fn(s, t, temperature=temperature, **extra)


PerToken = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]


def cross_entropy(student_logits: torch.Tensor, _teacher_logits, labels: torch.Tensor) -> torch.Tensor:
    """Per-token hard-label cross-entropy in float32: 0 at an :data:`UNLABELED` target (masked tokens give garbage; callers mask)."""
    return F.cross_entropy(student_logits.float(), labels.clamp(min=0), reduction="none") * (labels >= 0)


def forward_kl_and_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                        log_s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`forward_kl` and its gradient with respect to ``student_logits``, in closed form:
    ``(p_S - p_T) / T`` per token. No autograd graph: the fused path (:mod:`distill.fused`) uses it
    for the most common term, at about half the time of differentiating the loss.

    ``log_s``: the student's log-probabilities at ``temperature``, when already computed.
    Returns ``([...] per-token loss, [..., V] float32 gradient)``; the loss equals
    :func:`forward_kl`'s (the same float32 operations as ``kl_div``).
    """
    log_t = log_probs(teacher_logits, temperature)
    log_s = log_probs(student_logits, temperature) if log_s is None else log_s
    p_t = log_t.exp()
    loss = log_t.sub_(log_s).mul_(p_t).sum(-1)  # in place: each [N, V] buffer costs as much as the arithmetic
    grad = log_s.exp().sub_(p_t)
    return loss, grad if temperature == 1.0 else grad.div_(temperature)


def cross_entropy_and_grad(student_logits: torch.Tensor, labels: torch.Tensor, *, log_s: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cross_entropy` and its gradient ``softmax(z) - onehot(label)`` in closed form (see
    :func:`forward_kl_and_grad`); every label must be a target (the fused path passes only those)."""
    log_s = F.log_softmax(student_logits.float(), dim=-1) if log_s is None else log_s
    index = labels.clamp(min=0).unsqueeze(-1)
    loss = -log_s.gather(-1, index).squeeze(-1)
    return loss, log_s.exp().scatter_add_(-1, index, torch.full(index.shape, -1.0, device=log_s.device))


def _chunk_sums(fns: tuple, student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    mask = (labels != IGNORE_INDEX).float()
    return torch.stack([(fn(student, teacher, labels) * mask).sum() for fn in fns])


def term_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    fns: list[PerToken],
    *,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Sums of several per-token losses over the unmasked tokens, computed in one pass of chunks.

    Each chunk's float32 softmax intermediates are recomputed in backward (activation
    checkpointing), so at most one chunk of float32 logits is alive at a time instead of a full
    ``[batch, seq, vocab]`` float32 copy, however many terms share it.

    Args:
        student_logits: ``[B, L, V]`` student logits at positions predicting ``labels``.
        teacher_logits: ``[B, L, V]`` teacher logits, or None when no function needs them.
        labels: ``[B, L]`` target token ids, ``IGNORE_INDEX`` where masked.
        fns: per-token functions ``fn(student [N, V], teacher [N, V] | None, labels [N]) -> [N]``.
        chunk_size: tokens per chunk.

    Returns:
        ``[len(fns)]`` float32 sums (not means), part of the student's graph even when every
        token is masked (zero gradients: DDP and ZeRO need every rank to run backward).
    """
    vocab = student_logits.shape[-1]
    student_flat = student_logits.reshape(-1, vocab)
    # A store's sparse targets (distill.sparse.SparseTargets) come one row per position already.
    teacher_flat = teacher_logits.reshape(-1, vocab) if isinstance(teacher_logits, torch.Tensor) else teacher_logits
    labels_flat = labels.reshape(-1)
    total = student_flat[:0].float().sum() * torch.zeros(len(fns), device=student_flat.device)
    for start in range(0, labels_flat.numel(), chunk_size):
        chunk_labels = labels_flat[start : start + chunk_size]
        if not bool((chunk_labels != IGNORE_INDEX).any()):
            continue
        args = (
            student_flat[start : start + chunk_size],
            None if teacher_flat is None else teacher_flat[start : start + chunk_size],
            chunk_labels,
        )
        if torch.is_grad_enabled() and student_flat.requires_grad:
            sums = checkpoint(_chunk_sums, tuple(fns), *args, use_reentrant=False)
        else:
            sums = _chunk_sums(tuple(fns), *args)
        total = total + sums
    return total

