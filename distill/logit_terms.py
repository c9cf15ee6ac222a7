"""The logit terms' modules: a divergence at temperature T (:class:`LogitsTerm`), the hard-label loss
(:class:`CrossEntropyTerm`), and :class:`Term`, the base a term of the user's own derives from.

Per-token losses over the task's targets, from full logits or a store's sparse targets; the fused
path (:mod:`distill.fused`) takes their closed-form gradients where they have one. Their kinds (keys,
checks, building) are in :mod:`distill.terms`; the feature terms' modules are in :mod:`distill.feature_terms`.
"""

from __future__ import annotations

import torch
from torch import nn

from distill.term_names import LOGITS
from distill.losses import cross_entropy, cross_entropy_and_grad, divergence, forward_kl_and_grad
from distill.sparse import SparseTargets, bucket_forward_kl_and_grad, buckets, spread


class Term(nn.Module):
    """One named, weighted term; :meth:`per_token` is its loss at each target.

    A term of the user's own derives from this class in a file of theirs (``loss.terms: [{kind:
    path/to/my_term.py:MyTerm, ...}]``): ``__init__(name, weight, **its options)``, ``wants`` (the
    teacher's ``logits``, or nothing) and :meth:`per_token` (float32 ``[N]`` from the student's and
    the teacher's logits ``[N, V]`` and the targets ``[N]``). Its parameters, if any, are trained,
    sharded and checkpointed with the student, like a projection's.
    """

    wants: frozenset = frozenset()
    features = False  # a per-target term of logits (feature terms sum over positions themselves)

    def __init__(self, name: str, weight: float, scale: float = 1.0):
        super().__init__()
        self.name, self.weight, self.scale = name, weight, scale

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def closed_form(self, teacher_logits):
        """``fn(student_logits, teacher_logits, labels, student_log_probs) -> (per-token loss, its
        gradient with respect to student_logits)`` when the term has one for this teacher signal
        (``student_log_probs(T)``: the student's log-probabilities at T, shared by the terms); else
        None, and the fused path differentiates :meth:`per_token` with autograd."""
        return None

    def sampled_targets_problem(self) -> str | None:
        """Why this term cannot train on sampled teacher targets (unbiased for the forward KL at T=1 only), or None."""
        return None


class LogitsTerm(Term):
    """A divergence between the teacher's and the student's distributions at temperature T."""

    wants = frozenset({LOGITS})

    def __init__(self, name: str, weight: float, *, divergence_kind: str, temperature: float, jsd_beta: float, skew_alpha: float):
        super().__init__(name, weight, scale=temperature**2)
        self.temperature, self.divergence_kind = temperature, divergence_kind
        self.fn = divergence(divergence_kind, temperature=temperature, jsd_beta=jsd_beta, skew_alpha=skew_alpha)
        # On a store's sparse targets: the same divergence between k + 1 buckets already at temperature T.
        self.bucket_fn = divergence(divergence_kind, temperature=1.0, jsd_beta=jsd_beta, skew_alpha=skew_alpha)

    def per_token(self, student_logits, teacher_logits, labels):
        if teacher_logits is None:  # weight 0: the teacher is not run; the term is reported as 0
            return _unreported(student_logits, None, labels)
        if isinstance(teacher_logits, SparseTargets):
            if teacher_logits.tail_mode == "uniform":
                return self.fn(student_logits, spread(teacher_logits, student_logits.shape[-1]))
            return self.bucket_fn(*buckets(student_logits, teacher_logits, self.temperature))
        return self.fn(student_logits, teacher_logits)

    def closed_form(self, teacher_logits):
        if self.divergence_kind != "forward_kl":
            return None
        if isinstance(teacher_logits, SparseTargets):
            if teacher_logits.tail_mode != "bucket":
                return None
            return lambda s, t, labels, log_probs: bucket_forward_kl_and_grad(s, t, self.temperature, log_s=log_probs(self.temperature))
        return lambda s, t, labels, log_probs: forward_kl_and_grad(s, t, temperature=self.temperature, log_s=log_probs(self.temperature))

    def sampled_targets_problem(self):
        if self.weight and (self.divergence_kind != "forward_kl" or self.temperature != 1.0):
            return f"{self.divergence_kind} at temperature {self.temperature:g}"
        return None


class CrossEntropyTerm(Term):
    """The task's hard-label loss."""

    def per_token(self, student_logits, teacher_logits, labels):
        return cross_entropy(student_logits, teacher_logits, labels)

    def closed_form(self, teacher_logits):
        return lambda s, t, labels, log_probs: cross_entropy_and_grad(s, labels, log_s=log_probs(1.0))


def _unreported(student_logits, _teacher, _labels) -> torch.Tensor:
    return student_logits.new_zeros(student_logits.shape[0], dtype=torch.float32)
