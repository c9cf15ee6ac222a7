"""Sparse teacher targets: their format and their math, shared by the store, the pool and the loss.

:class:`SparseTargets` holds, per target position, the ids the teacher kept (top-k, drawn, or both)
with their log-probabilities and the log of the mass outside them. :func:`top_k`, :func:`sample` and
:func:`mixed` pick them from teacher logits; :func:`buckets`, :func:`bucket_forward_kl_and_grad` and
:func:`spread` turn them into what a divergence compares; :func:`encode` writes the bytes a store shard
and a pool answer share (safetensors: ``ids``, ``logprobs``, ``tail``, ``offsets``).

Pure tensors, no files: :mod:`distill.store` reads and writes them, :mod:`distill.service` sends them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from safetensors.torch import save

from distill.losses import forward_kl_and_grad, log_probs

TAIL_FLOOR = -1e4  # log-probability standing for 0: exp() is 0 and 0 * (floor - x) stays finite


@dataclass
class SparseTargets:
    """The teacher's top-k targets of some target rows: ``ids``/``logprobs`` ``[N, k]``, ``tail`` ``[N]``; ``actual`` ``[N]``,
    where kept, the log-probability of each row's own next token (the chain rule across tokenizers needs it; the top k may miss it)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor
    tail_mode: str = "bucket"  # how the loss treats the mass outside the top k (teacher.cache_tail)
    actual: torch.Tensor | None = None

    def __getitem__(self, rows) -> "SparseTargets":
        return SparseTargets(self.ids[rows], self.logprobs[rows], self.tail[rows], self.tail_mode, None if self.actual is None else self.actual[rows])

    def __len__(self) -> int:
        return self.ids.shape[0]

    @staticmethod
    def empty(k: int, actual: bool = False) -> "SparseTargets":
        return SparseTargets(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0), actual=torch.zeros(0) if actual else None)

    @staticmethod
    def cat(parts: list["SparseTargets"], tail_mode: str = "bucket") -> "SparseTargets":
        actual = torch.cat([p.actual for p in parts]) if parts and all(p.actual is not None for p in parts) else None
        return SparseTargets(*(torch.cat([getattr(p, f) for p in parts]) for f in ("ids", "logprobs", "tail")), tail_mode, actual)

    def to(self, device) -> "SparseTargets":
        return SparseTargets(self.ids.to(device), self.logprobs.to(device), self.tail.to(device), self.tail_mode,
                             None if self.actual is None else self.actual.to(device))


def top_k(logits: torch.Tensor, k: int) -> SparseTargets:
    """The top-k of ``logits`` ``[N, V]`` at temperature 1, with the log of the remaining mass."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = log_probs.topk(k, dim=-1)
    rest = log_probs.scatter(-1, ids, float("-inf")).logsumexp(-1) if k < logits.shape[-1] else log_probs.new_full(ids.shape[:1], float("-inf"))
    return SparseTargets(ids, values, rest)


def _drawn(weights: torch.Tensor, draws: int, generator: torch.Generator, excluded: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, ids) ``[N, draws]`` of ``draws`` ids drawn with replacement in proportion to
    ``weights`` ``[N, V]``: the distinct ids drawn first, then ids never drawn (count 0), never an
    ``excluded`` id."""
    drawn = torch.multinomial(weights, draws, replacement=True, generator=generator)
    counts = torch.zeros_like(weights).scatter_add_(-1, drawn, torch.ones_like(drawn, dtype=weights.dtype))
    if excluded is not None:
        counts.scatter_(-1, excluded, -1.0)
    return counts.topk(draws, dim=-1)


def sample(logits: torch.Tensor, k: int, generator: torch.Generator) -> SparseTargets:
    """``k`` ids drawn with replacement from softmax(``logits``) ``[N, V]`` at temperature 1, kept as
    the distinct ids drawn with their frequencies (``log(count / k)``; slots beyond them hold other
    ids at probability 0) and no tail ("Sparse Logit Sampling", Anshumann et al., ACL 2025).

    The frequencies are an unbiased estimate of the teacher's distribution, so the forward KL's
    gradient against them is an unbiased estimate of the dense one, which top-k's is not.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    frequency, ids = _drawn(probs, k, generator)
    return SparseTargets(ids, torch.log(frequency / k), probs.new_full(ids.shape[:1], float("-inf")))


def mixed(logits: torch.Tensor, k: int, generator: torch.Generator) -> SparseTargets:
    """The teacher's top ``k // 2`` ids with their exact log-probabilities, then ``k - k // 2`` ids
    drawn with replacement from the rest of softmax(``logits``) ``[N, V]`` at temperature 1, kept as
    in :func:`sample` with their frequencies scaled by the rest's mass; no tail.

    Still an unbiased estimate of the teacher's distribution (exact where it is largest, sampled
    beyond), so the forward KL's gradient stays unbiased; only the mass outside the head is
    estimated, so its noise is that of the rest (mass ``r``: variance ``r^2`` times that of
    sampling the rest alone), well below :func:`sample`'s at the same bytes.
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    head_values, head_ids = log_p.topk(k // 2, dim=-1)
    draws = k - k // 2
    rest = log_p.exp().scatter_(-1, head_ids, 0.0)
    mass = rest.sum(-1, keepdim=True)
    weights = rest
    if not bool((mass > 0).all()):  # a row whose rest underflows to 0 draws from any other id; its frequencies are weighted by that 0 mass
        weights = torch.where(mass > 0, rest, torch.ones_like(rest).scatter_(-1, head_ids, 0.0))
    frequency, ids = _drawn(weights, draws, generator, excluded=head_ids)
    values = torch.log(mass) + torch.log(frequency / draws)
    return SparseTargets(torch.cat([head_ids, ids], -1), torch.cat([head_values, values], -1), log_p.new_full(ids.shape[:1], float("-inf")))


PICK = {"top_k": lambda logits, k, generator: top_k(logits, k), "sampled": sample, "mixed": mixed}
METHODS = tuple(PICK)


def _bucket_parts(log_s: torch.Tensor, teacher: SparseTargets, temperature: float) -> tuple[torch.Tensor, ...]:
    """(student buckets, teacher buckets, both before the floor; the student's stored-id
    log-probabilities; their mass) from the student's log-probabilities at ``temperature``."""
    s_top = log_s.gather(-1, teacher.ids.long())
    # The rest from the top's mass (k values, not another pass over the vocabulary); its float32
    # resolution ends where the student puts all but ~1e-6 of its mass on the stored ids.
    mass = s_top.exp().sum(-1, keepdim=True)
    s_rest = torch.log1p(-mass.clamp(max=1 - 1e-6))
    t_log = teacher.logprobs.float()
    tail = teacher.tail.float().unsqueeze(-1)
    if temperature != 1.0:
        kept = torch.log1p(-tail.clamp(max=0).exp().clamp(max=1 - 1e-7))
        t_log = kept + torch.log_softmax(t_log / temperature, dim=-1)
    return torch.cat([s_top, s_rest], dim=-1), torch.cat([t_log, tail], dim=-1), s_top, mass


def buckets(student_logits: torch.Tensor, teacher: SparseTargets, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probabilities ``[N, k + 1]`` over the stored ids and one bucket for the rest.

    The student's are exact at temperature T: log softmax(z / T) at each stored id, and the log of
    its remaining mass. The teacher's stored log-probabilities are at T = 1; at another T the stored
    ids are softened among themselves and keep their total mass: ``p_T(i) = (1 - tail) *
    softmax(logp / T)_i``, and the rest keeps ``tail``. At T = 1 both are the dense distributions
    restricted to the same k + 1 buckets, so every divergence of :mod:`distill.losses` applies.
    """
    student, teacher_buckets, _, _ = _bucket_parts(log_probs(student_logits, temperature), teacher, temperature)
    return student.clamp(min=TAIL_FLOOR), teacher_buckets.clamp(min=TAIL_FLOOR)


def bucket_forward_kl_and_grad(student_logits: torch.Tensor, teacher: SparseTargets, temperature: float,
                               log_s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward KL between :func:`buckets` (as ``forward_kl`` at T=1 computes it on them) and its
    gradient with respect to ``student_logits``, in closed form: the fused path's store and pool
    targets (:mod:`distill.fused`), without an autograd graph through the gather and the tail.

    ``log_s``: the student's log-probabilities at ``temperature``, when already computed.
    """
    log_s = log_probs(student_logits, temperature) if log_s is None else log_s
    student, teacher_buckets, s_top, mass = _bucket_parts(log_s, teacher, temperature)
    loss, g = forward_kl_and_grad(student.clamp(min=TAIL_FLOOR), teacher_buckets.clamp(min=TAIL_FLOOR))  # g: d loss / d bucket
    # Through the floor (zero where clamped), then the rest's bucket through its mass, to the stored ids.
    g.mul_(student >= TAIL_FLOOR)
    k = s_top.shape[-1]
    g_top = g[:, :k] + g[:, k:] * (mass <= 1 - 1e-6) * (-1 / (1 - mass.clamp(max=1 - 1e-6))) * s_top.exp()
    grad = log_s.exp().mul_(-g_top.sum(-1, keepdim=True)).scatter_add_(-1, teacher.ids.long(), g_top)
    return loss, grad if temperature == 1.0 else grad.div_(temperature)


def spread(teacher: SparseTargets, vocab: int) -> torch.Tensor:
    """``[N, vocab]`` teacher log-probabilities: the stored ones at their ids, the tail mass spread
    evenly over the other ``vocab - k`` ids (``teacher.cache_tail: uniform``). A dense distribution,
    so a divergence applies its temperature to it exactly as to full teacher logits."""
    ids, k = teacher.ids.long(), teacher.ids.shape[-1]
    each = teacher.tail.float() - math.log(max(vocab - k, 1))
    dense = each.clamp(min=TAIL_FLOOR).unsqueeze(-1).expand(-1, vocab).contiguous()
    return dense.scatter_(-1, ids, teacher.logprobs.float())


def shard_tensors(targets: SparseTargets, counts: list[int], vocab: int) -> dict[str, torch.Tensor]:
    """The targets of some rows as a shard's tensors (the layout in the module's docstring), for :func:`encode`
    or to be saved beside other tensors of the same rows (their hidden states)."""

    offsets = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
    tensors = {"ids": targets.ids.to(torch.int16 if vocab <= 32767 else torch.int32), "logprobs": targets.logprobs.half(),
               "tail": targets.tail.float(), "offsets": offsets, **actual_tensor(targets)}
    return {name: t.contiguous() for name, t in tensors.items()}


def actual_tensor(targets: SparseTargets) -> dict[str, torch.Tensor]:
    """``{"actual": [N] float16}`` where the targets keep their own tokens' log-probabilities (saved beside any encoding), else ``{}``."""
    return {} if targets.actual is None else {"actual": targets.actual.half().contiguous()}


def encode(targets: SparseTargets, counts: list[int], vocab: int) -> bytes:
    """The targets of some rows as a shard's bytes (safetensors). The teacher service (:mod:`distill.service`) answers in the same bytes."""
    return save(shard_tensors(targets, counts, vocab))
