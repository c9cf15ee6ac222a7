"""The objective of a training step: a list of named, weighted terms (``loss.terms``).

Each term gives a per-token loss over the task's targets; the objective sums every term over the
unmasked targets of a micro-batch in one chunked pass (:func:`distill.losses.term_sums`), and the
step divides by the global target count. The step's loss is ``sum_i weight_i * scale_i * term_i``
(``scale`` is T^2 for a logit divergence at temperature T, which keeps its gradient's size
independent of T). Terms are ``nn.Module`` s, so a term that owns parameters (a projection from
student to teacher width) joins the optimizer, the checkpoints and ZeRO with the objective.

``loss.kind`` / ``loss.alpha`` are the shorthand for
``[{kind: logits, name: kd, divergence: KIND, weight: 1 - alpha}, {kind: ce, name: ce, weight: alpha}]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distill.config import LOGITS, LossConfig, loss_terms
from distill.losses import cross_entropy, divergence, term_sums


class Term(nn.Module):
    """One named, weighted term; :meth:`per_token` is its loss at each target."""

    wants: frozenset = frozenset()

    def __init__(self, name: str, weight: float, scale: float = 1.0):
        super().__init__()
        self.name, self.weight, self.scale = name, weight, scale

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LogitsTerm(Term):
    """A divergence between the teacher's and the student's distributions at temperature T."""

    wants = frozenset({LOGITS})

    def __init__(self, name: str, weight: float, *, divergence_kind: str, temperature: float, jsd_beta: float, skew_alpha: float):
        super().__init__(name, weight, scale=temperature**2)
        self.fn = divergence(divergence_kind, temperature=temperature, jsd_beta=jsd_beta, skew_alpha=skew_alpha)

    def per_token(self, student_logits, teacher_logits, labels):
        if teacher_logits is None:  # weight 0: the teacher is not run; the term is reported as 0
            return student_logits.new_zeros(student_logits.shape[0], dtype=torch.float32)
        return self.fn(student_logits, teacher_logits)


class CrossEntropyTerm(Term):
    """The task's hard-label loss."""

    def per_token(self, student_logits, teacher_logits, labels):
        return cross_entropy(student_logits, teacher_logits, labels)


@dataclass
class TeacherOutputs:
    """What a teacher source returns for a batch: only what the objective asked for."""

    logits: torch.Tensor | None = None  # [B, L, V] at the task's target positions


class Objective(nn.Module):
    def __init__(self, terms: list[Term], chunk_size: int):
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.chunk_size = chunk_size
        # Zero-weight terms are still reported, but never make the teacher run.
        self.wants = frozenset().union(*(t.wants for t in terms if t.weight > 0))

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def sums(self, student_logits: torch.Tensor, teacher: TeacherOutputs | None, labels: torch.Tensor) -> torch.Tensor:
        """``[n_terms]`` float32 sums over the unmasked targets of one micro-batch."""
        teacher_logits = teacher.logits if teacher is not None else None
        return term_sums(student_logits, teacher_logits, labels, [t.per_token for t in self.terms], chunk_size=self.chunk_size)

    def total(self, sums: torch.Tensor) -> torch.Tensor:
        """The step loss (a sum over targets) from :meth:`sums`."""
        weights = torch.tensor([t.weight * t.scale for t in self.terms], dtype=sums.dtype, device=sums.device)
        return (sums * weights).sum()


def build_objective(cfg: LossConfig) -> Objective:
    """The objective of ``loss.terms`` (or its shorthand), as checked when the config loaded."""
    terms = []
    for spec in loss_terms(cfg):
        name, weight = spec["name"], float(spec.get("weight", 1.0))
        if spec["kind"] == LOGITS:
            terms.append(LogitsTerm(name, weight, divergence_kind=spec.get("divergence", cfg.kind),
                                    temperature=float(spec.get("temperature", cfg.temperature)),
                                    jsd_beta=float(spec.get("jsd_beta", cfg.jsd_beta)), skew_alpha=float(spec.get("skew_alpha", cfg.skew_alpha))))
        else:
            terms.append(CrossEntropyTerm(name, weight))
    return Objective(terms, chunk_size=cfg.chunk_size)
