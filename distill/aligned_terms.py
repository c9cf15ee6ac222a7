"""Logit terms across tokenizers: the teacher's and the student's next-token distributions compared group by group
(:mod:`distill.pairing`), where the two tokenize the same text differently.

For a group of student tokens s_1..s_m and teacher tokens t_1..t_n covering the same text, each side gives the
distribution before the group, p(v | prefix), and by the chain rule the probability of the group's text,
P(text) = p(x_1 | prefix) * prod_{r>1} p(x_r | prefix, x_<r). Then:

- ``logits`` (:class:`AlignedLogitsTerm`): each side's distribution over the tokens both vocabularies hold
  (:func:`distill.pairing.shared_vocabulary`), plus one entry for the group's text and one for the rest of the
  mass. The text's probability is taken out of the first token's entry: where the group is that one token, all
  of it; where the token is a prefix of the group's text ("ret" of "return", "27" of "2718"), the share that
  goes on as the text, leaving p(x_1) (1 - p(rest | x_1)) for its other continuations. So a number that is one
  token for the student and four for the teacher is compared as the same number, not as its first digit (the
  failure reported for GOLD's merge). Where one side's group is one token both vocabularies hold, the other
  side's entry for that token (a tokenization it did not take) joins its text entry too. A token only one
  vocabulary holds counts for the longest shared token its text starts with (``fold``). A student token inside
  one teacher token, where no group starts (``inside``), is compared as two outcomes: its probability against
  the teacher's share, of its mass on tokens continuing the text before it, on those continuing it with this
  token. The divergence of the term (every kind of the project) is taken between
  the two proper distributions, plus ``unshared`` times the ULD distance on the tokens only one side holds.
- ``uld`` (:class:`UldTerm`): the L1 distance between the two sides' sorted probabilities (ULD, Boizard et al.
  2024) after TRL GOLD's chain-rule merge (each entry before the group times the later tokens' probability);
  no vocabulary is mapped. The baseline.

Both are sums over the groups whose tokens are all targets on the student's side and all inside the row on
the teacher's; they are called as feature terms (``term(student, teacher, weights, mask)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import IGNORE_INDEX, divergence
from distill.sparse import TAIL_FLOOR
from distill.term_names import LOGITS


@dataclass
class Paired:
    """What the teacher gives a batch tokenized by both (:class:`distill.objective.Outputs`' ``paired``)."""

    logits: torch.Tensor  # [B, Lt - 1, Vt]: the teacher's logits at each position but the last (each predicts the next token)
    teacher_ids: torch.Tensor  # [B, Lt]
    teacher_groups: torch.Tensor  # [B, Lt]: each teacher token's group in its row, -1 none
    ids: torch.Tensor  # [B, L]: the student's tokens
    groups: torch.Tensor  # [B, L]
    inside: torch.Tensor | None = None  # [B, L, 5]: a student token within one teacher token (distill.pairing.Document.inside)
    known: torch.Tensor | None = None  # [B, Lt - 1]: the positions whose distribution is the teacher's (from a store or a pool: its targets); None: all


def densified(sparse, labels: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[B, Lt - 1, width]`` log-probabilities, ``[B, Lt - 1]`` known) from the teacher's sparse targets (a store's or a pool's,
    :class:`distill.sparse.SparseTargets` with ``actual``) of the unmasked positions of ``labels`` ``[B, Lt - 1]`` (its next tokens):
    each position's top k as stored, its own next token's log-probability exact, the rest of the mass (the tail less that token's)
    spread evenly over the ids not held. A position without a target is not known: no group is compared there."""
    known = labels != IGNORE_INDEX
    ids, values = sparse.ids.long(), sparse.logprobs.float().clamp_min(TAIL_FLOOR)
    own, actual = labels[known], sparse.actual.float().clamp_min(TAIL_FLOOR)
    held = (ids == own[:, None]).any(-1)
    rest = (sparse.tail.float().exp() - torch.where(held, 0.0, actual.exp())).clamp_min(0.0)
    free = (width - ids.shape[1] - (~held).long()).clamp_min(1)
    flat = (rest / free).clamp_min(1e-30).log().clamp_min(TAIL_FLOOR)[:, None].expand(-1, width).clone()
    flat = flat.scatter(-1, ids, values).scatter(-1, own[:, None], actual[:, None])
    dense = torch.full((*labels.shape, width), -math.log(width), device=flat.device)
    dense[known] = flat
    return dense, known


@dataclass
class Sides:
    """The compared groups of a batch, each side's: the distribution before the group ``[G, V]`` (log), the group's first
    actual token ``[G]``, and the log-probability of its later tokens ``[G]`` (0 for a group of one token)."""

    student: torch.Tensor
    student_first: torch.Tensor
    student_later: torch.Tensor
    teacher: torch.Tensor
    teacher_first: torch.Tensor
    teacher_later: torch.Tensor
    student_log_p: torch.Tensor  # [B, L - 1, Vs] every position's
    teacher_log_p: torch.Tensor  # [B, Lt - 1, Vt]


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
    """Called like a feature term; :meth:`sides` gives both sides of the groups compared in a batch."""

    wants = frozenset({LOGITS})
    features = True  # sums over groups itself, from the student's logits and the teacher's paired signal

    def __init__(self, name: str, weight: float, scale: float, temperature: float, student_width: int, teacher_width: int):
        super().__init__()
        self.name, self.weight, self.scale, self.temperature = name, weight, scale, temperature
        self.student_width, self.teacher_width = student_width, teacher_width  # each tokenizer's ids (an output layer may hold more)

    def sides(self, student, teacher, weights) -> Sides:
        paired: Paired = teacher.paired
        width = int(max(paired.groups.max(), paired.teacher_groups.max(), 0)) + 1
        student_targets = weights[:, :-1] > 0  # the positions whose next token is a target
        teacher_inside = paired.teacher_groups[:, 1:] >= 0
        if paired.known is not None:  # a store's or a pool's targets: only where they hold the teacher's distribution
            teacher_inside = teacher_inside & paired.known
        s_first, s_later, s_whole, s_log = _side(student.logits[..., : self.student_width], paired.ids, paired.groups, student_targets, width,
                                                 self.temperature)
        t_first, t_later, t_whole, t_log = _side(paired.logits[..., : self.teacher_width], paired.teacher_ids, paired.teacher_groups,
                                                 teacher_inside, width, self.temperature)
        rows, slots = torch.nonzero((s_first >= 0) & (t_first >= 0) & s_whole & t_whole, as_tuple=True)
        s_at, t_at = s_first[rows, slots], t_first[rows, slots]
        return Sides(s_log[rows, s_at], paired.ids[rows, s_at + 1], s_later[rows, slots],
                     t_log[rows, t_at], paired.teacher_ids[rows, t_at + 1], t_later[rows, slots], s_log, t_log)


def _sorted_l1(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``[G]`` L1 distance between the two sides' probabilities sorted in decreasing order, the shorter padded with 0."""
    a, b = student.sort(dim=-1, descending=True).values, teacher.sort(dim=-1, descending=True).values
    width = max(a.shape[-1], b.shape[-1])
    return (F.pad(a, (0, width - a.shape[-1])) - F.pad(b, (0, width - b.shape[-1]))).abs().sum(-1)


def _spans_apart(log_p: torch.Tensor, first: torch.Tensor, later: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[G, V]`` log-probabilities before the group with the group's own text taken out of its first token's entry,
    ``[G]`` the log-probability of the group's text). A first token that is the whole group gives all its mass to the text;
    one that is a prefix of it keeps what continues otherwise: p(x1) (1 - p(rest | x1))."""
    at_first = log_p.gather(-1, first[:, None]).squeeze(-1)
    split = later < 0  # a group of several tokens (or one whose later tokens are all but certain: then like one token)
    otherwise = torch.log(-torch.expm1(torch.where(split, later, -1.0)))  # log(1 - p(rest | x1)), kept finite where unused
    kept = torch.where(split, at_first + otherwise, torch.full_like(at_first, -1e4))
    return log_p.scatter(-1, first[:, None], kept[:, None]), at_first + later


class AlignedLogitsTerm(_Paired):
    """A divergence over the shared vocabulary, the group's text and the rest of the mass; ULD on what is not shared."""

    def __init__(self, name: str, weight: float, *, divergence_kind: str, temperature: float, jsd_beta: float, skew_alpha: float,
                 shared: tuple[list[int], list[int]], student_width: int, teacher_width: int, unshared: float,
                 folds: tuple[dict, dict] = ({}, {}), teacher_order: list[int] | None = None):
        super().__init__(name, weight, scale=temperature**2, temperature=temperature, student_width=student_width, teacher_width=teacher_width)
        self.divergence_kind, self.unshared = divergence_kind, unshared
        self.fn = divergence(divergence_kind, temperature=1.0, jsd_beta=jsd_beta, skew_alpha=skew_alpha)
        student_ids, teacher_ids = (torch.tensor(ids, dtype=torch.long) for ids in shared)
        keep = (student_ids < student_width) & (teacher_ids < teacher_width)
        self.register_buffer("student_shared", student_ids[keep], persistent=False)
        self.register_buffer("teacher_shared", teacher_ids[keep], persistent=False)
        # The teacher's ids in the order of their texts (distill.pairing.sorted_by_text): a student token inside a teacher token is
        # compared with the teacher's mass on the tokens that continue the text before it with it; None: not compared.
        self.register_buffer("teacher_order", torch.tensor(teacher_order or [], dtype=torch.long), persistent=False)
        self.inside = teacher_order is not None
        places = torch.cumsum(keep.long(), 0) - 1  # a shared token's place among those kept
        for side, ids, width, fold in (("student", student_ids[keep], student_width, folds[0]), ("teacher", teacher_ids[keep], teacher_width, folds[1])):
            index = torch.full((width,), -1, dtype=torch.long)  # each id's place among the shared tokens, -1 for none
            index[ids] = torch.arange(len(ids))
            self.register_buffer(f"{side}_index", index, persistent=False)
            folded = {i: int(places[k]) for i, k in fold.items() if i < width and keep[k]}
            self.register_buffer(f"{side}_fold_from", torch.tensor(sorted(folded), dtype=torch.long), persistent=False)
            self.register_buffer(f"{side}_fold_to", torch.tensor([folded[i] for i in sorted(folded)], dtype=torch.long), persistent=False)
            only = torch.ones(width, dtype=torch.bool)  # neither shared nor folded into a shared token: ULD's
            only[ids] = False
            only[sorted(folded)] = False
            self.register_buffer(f"{side}_only", torch.nonzero(only).squeeze(-1), persistent=False)

    def forward(self, student, teacher, weights, attention_mask=None) -> torch.Tensor:
        sides = self.sides(student, teacher, weights)
        if sides.student.shape[0] == 0:
            return student.logits.sum() * 0.0
        s_rest, s_text = _spans_apart(sides.student, sides.student_first, sides.student_later)
        t_rest, t_text = _spans_apart(sides.teacher, sides.teacher_first, sides.teacher_later)
        s_shared = _folded(s_rest, self.student_shared, self.student_fold_from, self.student_fold_to)
        t_shared = _folded(t_rest, self.teacher_shared, self.teacher_fold_from, self.teacher_fold_to)
        # Where one side's group is one shared token, that token is the group's text on the other side too: its entry there
        # (a tokenization the other side did not take) joins the text's, so neither side holds the text twice.
        s_single, t_single = sides.student_later == 0, sides.teacher_later == 0
        s_index, t_index = self.student_index[sides.student_first], self.teacher_index[sides.teacher_first]
        s_shared, s_text = _moved(s_shared, s_text, t_index, t_single & ~s_single)
        t_shared, t_text = _moved(t_shared, t_text, s_index, s_single & ~t_single)
        sums = self.fn(_bins(s_shared, s_text), _bins(t_shared, t_text)).sum()
        if self.inside and teacher.paired.inside is not None:
            sums = sums + self._inside_sums(sides, teacher.paired, weights)
        if self.unshared > 0:
            sums = sums + self.unshared * _sorted_l1(s_rest[:, self.student_only].exp(), t_rest[:, self.teacher_only].exp()).sum()
        return sums

    def _inside_sums(self, sides: Sides, paired: Paired, weights: torch.Tensor) -> torch.Tensor:
        """The student tokens inside one teacher token (a byte of a word the teacher writes whole): the probability the student
        gives the token against the teacher's that the text goes on so, as a distribution of two (the token, anything else)."""
        inside = paired.inside[:, 1:]  # the student token each position predicts
        rows, positions = torch.nonzero((inside[..., 0] >= 0) & (weights[:, :-1] > 0), as_tuple=True)
        found = inside[rows, positions]
        if paired.known is not None:  # the teacher's distribution before its token must be held
            held = paired.known[rows, (found[:, 0] - 1).clamp_min(0)]
            rows, positions, found = rows[held], positions[held], found[held]
        if rows.numel() == 0:
            return sides.student_log_p.new_zeros(())
        target = _inside_targets(sides.teacher_log_p[rows, found[:, 0] - 1], self.teacher_order, found[:, 1:])
        student = sides.student_log_p[rows, positions].gather(-1, paired.ids[rows, positions + 1, None]).squeeze(-1).exp()
        return self.fn(_two_bins(student.clamp(1e-12, 1 - 1e-7)), _two_bins(target)).sum()


def _inside_targets(log_p: torch.Tensor, order: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """``[N]`` the probability that the text continues with a student token, given the text before it within the teacher's
    token: the mass of the teacher's tokens starting with both over the mass of those starting with (strictly after) the text
    before. ``log_p`` ``[N, Vt]`` the teacher's distribution there; ``ranges`` ``[N, 4]`` (lo_p, hi_p, lo_x, hi_x) in ``order``."""
    mass = torch.cumsum(F.pad(log_p[:, order].exp(), (1, 0)), dim=-1)  # [N, V + 1]: the mass of the first v tokens in text order
    within = lambda lo, hi: mass.gather(-1, hi[:, None]).squeeze(-1) - mass.gather(-1, lo[:, None]).squeeze(-1)
    return (within(ranges[:, 2], ranges[:, 3]) / within(ranges[:, 0], ranges[:, 1]).clamp_min(1e-12)).clamp(1e-6, 1 - 1e-6)


def _folded(log_p: torch.Tensor, shared: torch.Tensor, fold_from: torch.Tensor, fold_to: torch.Tensor) -> torch.Tensor:
    """``[G, M]`` log-probabilities of the shared tokens, each with the mass of the unshared tokens that start with it."""
    if fold_from.numel() == 0:
        return log_p[:, shared]
    extra = torch.zeros(log_p.shape[0], shared.numel(), dtype=log_p.dtype, device=log_p.device)
    extra = extra.index_add(1, fold_to, log_p[:, fold_from].exp())
    return torch.logaddexp(log_p[:, shared], extra.clamp_min(1e-30).log())


def _two_bins(p: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` log-probabilities of an event of probability ``p`` and of its complement."""
    return torch.stack([p.log(), torch.log1p(-p)], dim=-1)


def _moved(log_shared: torch.Tensor, log_text: torch.Tensor, index: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log_shared`` with entry ``index`` of each group where ``where`` (and the index is a shared token) added to the text's."""
    move = where & (index >= 0)
    at = index.clamp_min(0)[:, None]
    entry = log_shared.gather(-1, at).squeeze(-1)
    text = torch.where(move, torch.logaddexp(log_text, entry), log_text)
    shared = log_shared.scatter(-1, at, torch.where(move, torch.full_like(entry, -1e4), entry)[:, None])
    return shared, text


def _bins(log_shared: torch.Tensor, log_text: torch.Tensor) -> torch.Tensor:
    """``[G, M + 2]`` log-probabilities: the shared tokens, the group's text, and the rest of the mass (at least 1e-12)."""
    known = torch.cat([log_shared, log_text[:, None]], dim=-1)
    rest = (1.0 - known.exp().sum(-1, keepdim=True)).clamp_min(1e-12).log()
    return torch.cat([known, rest], dim=-1)


class UldTerm(_Paired):
    """ULD: the L1 distance between the sorted probabilities of the two sides' merged distributions, every token."""

    def __init__(self, name: str, weight: float, *, temperature: float, student_width: int, teacher_width: int):
        super().__init__(name, weight, scale=1.0, temperature=temperature, student_width=student_width, teacher_width=teacher_width)

    def forward(self, student, teacher, weights, attention_mask=None) -> torch.Tensor:
        sides = self.sides(student, teacher, weights)
        if sides.student.shape[0] == 0:
            return student.logits.sum() * 0.0
        # The chain rule's merge of TRL's GOLD ("observed"): the distribution before the group times the later tokens' probability.
        return _sorted_l1((sides.student + sides.student_later[:, None]).exp(), (sides.teacher + sides.teacher_later[:, None]).exp()).sum()
