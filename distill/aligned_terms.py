"""Logit terms across tokenizers: the teacher's and the student's next-token distributions compared group by group
(:mod:`distill.pairing`), where the two tokenize the same text differently.

For a group of student tokens s_1..s_m and teacher tokens t_1..t_n covering the same characters, each side's
distribution is the one before its group's first token, times the probability it gives the rest of the group's
actual tokens (the chain rule: ``q(v) = p(v | prefix) * prod_{r>1} p(x_r | prefix, x_<r)``). The mass is at most
1; the probability of the group's text itself is the entry of its first token. Then:

- ``logits`` (:class:`AlignedLogitsTerm`): the divergence of ``loss`` between the two over the tokens both
  vocabularies hold (:func:`distill.pairing.shared_vocabulary`), the rest of each side's mass as one more entry,
  so every divergence of the project applies to two proper distributions; plus ``unshared`` times the ULD
  distance on the tokens only one side holds.
- ``uld`` (:class:`UldTerm`): the L1 distance between the two sides' sorted probabilities (ULD, Boizard et al.
  2024), every token; no vocabulary is mapped. The baseline.

Both are sums over the groups whose tokens are all targets on the student's side and all inside the row on
the teacher's; they are called as feature terms (``term(student, teacher, weights, mask)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import divergence
from distill.term_names import LOGITS


@dataclass
class Paired:
    """What the teacher gives a batch tokenized by both (:class:`distill.objective.Outputs`' ``paired``)."""

    logits: torch.Tensor  # [B, Lt - 1, Vt]: the teacher's logits at each position but the last (each predicts the next token)
    teacher_ids: torch.Tensor  # [B, Lt]
    teacher_groups: torch.Tensor  # [B, Lt]: each teacher token's group in its row, -1 none
    ids: torch.Tensor  # [B, L]: the student's tokens
    groups: torch.Tensor  # [B, L]


def _side(logits: torch.Tensor, ids: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor, width: int, temperature: float):
    """One side's groups: ``[B, K]`` position of each group's first prediction (-1: none), ``[B, K]`` log-probability of
    its later tokens, ``[B, K]`` whether every token of it is a target; and the log-probabilities ``[B, L - 1, V]``."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    predicted = groups[:, 1:]  # the group of the token each position predicts
    actual = log_p.gather(-1, ids[:, 1:].clamp_min(0).unsqueeze(-1)).squeeze(-1)
    starts = (predicted >= 0) & (predicted != groups[:, :-1])
    slot = predicted.clamp_min(0)
    batch, positions = predicted.shape
    position = torch.arange(positions, device=ids.device).expand(batch, -1)
    # A group starts once in a row; the positions that start none write to a spare last column.
    first = torch.full((batch, width + 1), -1, dtype=torch.long, device=ids.device)
    first = first.scatter(1, torch.where(starts, slot, width), position)[:, :width]
    later = torch.zeros(batch, width, device=ids.device).scatter_add(1, slot, torch.where((predicted >= 0) & ~starts, actual, 0.0))
    tokens = torch.zeros(batch, width, device=ids.device).scatter_add(1, groups.clamp_min(0), (groups >= 0).float())
    counted = torch.zeros(batch, width, device=ids.device).scatter_add(1, slot, ((predicted >= 0) & targets).float())
    return first, later, counted == tokens, log_p


class _Paired(nn.Module):
    """Called like a feature term; :meth:`pair` gives the two sides' merged log-distributions of the compared groups."""

    wants = frozenset({LOGITS})
    features = True  # sums over groups itself, from the student's logits and the teacher's paired signal

    def __init__(self, name: str, weight: float, scale: float, temperature: float, student_width: int, teacher_width: int):
        super().__init__()
        self.name, self.weight, self.scale, self.temperature = name, weight, scale, temperature
        self.student_width, self.teacher_width = student_width, teacher_width  # each tokenizer's ids (an output layer may hold more)

    def pair(self, student, teacher, weights) -> tuple[torch.Tensor, torch.Tensor]:
        """(``[G, Vs]``, ``[G, Vt]``) log-measures of the G groups compared in the batch (each sums to at most 1)."""
        paired: Paired = teacher.paired
        width = int(max(paired.groups.max(), paired.teacher_groups.max(), 0)) + 1
        student_targets = weights[:, :-1] > 0  # the positions whose next token is a target
        teacher_inside = paired.teacher_groups[:, 1:] >= 0
        s_first, s_later, s_whole, s_log = _side(student.logits[..., : self.student_width], paired.ids, paired.groups, student_targets, width, self.temperature)
        t_first, t_later, t_whole, t_log = _side(paired.logits[..., : self.teacher_width], paired.teacher_ids, paired.teacher_groups, teacher_inside, width, self.temperature)
        rows, slots = torch.nonzero((s_first >= 0) & (t_first >= 0) & s_whole & t_whole, as_tuple=True)
        student_side = s_log[rows, s_first[rows, slots]] + s_later[rows, slots, None]
        teacher_side = t_log[rows, t_first[rows, slots]] + t_later[rows, slots, None]
        return student_side, teacher_side


def _sorted_l1(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``[G]`` L1 distance between the two sides' probabilities sorted in decreasing order, the shorter padded with 0."""
    a, b = student.sort(dim=-1, descending=True).values, teacher.sort(dim=-1, descending=True).values
    width = max(a.shape[-1], b.shape[-1])
    return (F.pad(a, (0, width - a.shape[-1])) - F.pad(b, (0, width - b.shape[-1]))).abs().sum(-1)


class AlignedLogitsTerm(_Paired):
    """A divergence on the shared vocabulary (plus one entry for the rest of the mass), and ULD on what is not shared."""

    def __init__(self, name: str, weight: float, *, divergence_kind: str, temperature: float, jsd_beta: float, skew_alpha: float,
                 shared: tuple[list[int], list[int]], student_width: int, teacher_width: int, unshared: float):
        super().__init__(name, weight, scale=temperature**2, temperature=temperature, student_width=student_width, teacher_width=teacher_width)
        self.divergence_kind, self.unshared = divergence_kind, unshared
        self.fn = divergence(divergence_kind, temperature=1.0, jsd_beta=jsd_beta, skew_alpha=skew_alpha)
        student_ids, teacher_ids = (torch.tensor(ids, dtype=torch.long) for ids in shared)
        keep = (student_ids < student_width) & (teacher_ids < teacher_width)
        self.register_buffer("student_shared", student_ids[keep], persistent=False)
        self.register_buffer("teacher_shared", teacher_ids[keep], persistent=False)
        for side, ids, width in (("student", student_ids[keep], student_width), ("teacher", teacher_ids[keep], teacher_width)):
            only = torch.ones(width, dtype=torch.bool)
            only[ids] = False
            self.register_buffer(f"{side}_only", torch.nonzero(only).squeeze(-1), persistent=False)

    def forward(self, student, teacher, weights, attention_mask=None) -> torch.Tensor:
        student_side, teacher_side = self.pair(student, teacher, weights)
        if student_side.shape[0] == 0:
            return student.logits.sum() * 0.0
        sums = self.fn(_with_rest(student_side[:, self.student_shared]), _with_rest(teacher_side[:, self.teacher_shared])).sum()
        if self.unshared > 0:
            student_only, teacher_only = student_side[:, self.student_only].exp(), teacher_side[:, self.teacher_only].exp()
            sums = sums + self.unshared * _sorted_l1(student_only, teacher_only).sum()
        return sums


def _with_rest(log_shared: torch.Tensor) -> torch.Tensor:
    """``[G, M + 1]`` log-probabilities: the shared entries and one for the rest of the mass (1 minus theirs, at least 1e-12)."""
    rest = (1.0 - log_shared.exp().sum(-1, keepdim=True)).clamp_min(1e-12).log()
    return torch.cat([log_shared, rest], dim=-1)


class UldTerm(_Paired):
    """ULD: the L1 distance between the sorted probabilities of the two sides' merged distributions, every token."""

    def __init__(self, name: str, weight: float, *, temperature: float, student_width: int, teacher_width: int):
        super().__init__(name, weight, scale=1.0, temperature=temperature, student_width=student_width, teacher_width=teacher_width)

    def forward(self, student, teacher, weights, attention_mask=None) -> torch.Tensor:
        student_side, teacher_side = self.pair(student, teacher, weights)
        if student_side.shape[0] == 0:
            return student.logits.sum() * 0.0
        return _sorted_l1(student_side.exp(), teacher_side.exp()).sum()
