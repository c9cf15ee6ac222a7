"""``logits``: a divergence between the teacher's and the student's distributions at temperature T (counted T^2 times)."""

from __future__ import annotations

import typing
from dataclasses import dataclass

from distill.term_names import LOGITS, LossKind
from distill.terms.base import TermKind, TermSpec, check, check_number


@dataclass
class LogitsSpec(TermSpec):
    divergence: str = "forward_kl"
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    unshared: float = 1.0  # with a teacher of another tokenizer: the weight of ULD on the tokens only one vocabulary holds
    fold: bool = True  # with a teacher of another tokenizer: a token only one side holds counts for the shared token it starts with
    inside: bool = True  # with a teacher of another tokenizer: a student token inside a teacher token is compared too


class Logits(TermKind):
    kind = LOGITS
    Spec = LogitsSpec

    @classmethod
    def defaults(cls, loss):
        return {"divergence": loss.kind, "temperature": loss.temperature, "jsd_beta": loss.jsd_beta, "skew_alpha": loss.skew_alpha}

    @classmethod
    def check(cls, spec, key):
        kinds = typing.get_args(LossKind)
        check(spec.divergence in kinds, f"{key}.divergence: must be one of {', '.join(kinds)} (got {spec.divergence!r})")
        check_number(spec.temperature, f"{key}.temperature", positive=True)
        check_number(spec.unshared, f"{key}.unshared")
        check(isinstance(spec.fold, bool), f"{key}.fold must be true or false (got {spec.fold!r})")
        check(isinstance(spec.inside, bool), f"{key}.inside must be true or false (got {spec.inside!r})")

    across = True

    @classmethod
    def build_across(cls, spec, key, *, pairing):
        """Group by group (distill.pairing): the divergence on the shared vocabulary and the rest of the mass, ULD (weight
        ``unshared``) on the tokens only one side holds."""
        from distill.aligned_terms import AlignedLogitsTerm  # torch: the config reads the kinds without it

        return AlignedLogitsTerm(spec.name, spec.weight, divergence_kind=spec.divergence, temperature=float(spec.temperature),
                                 jsd_beta=float(spec.jsd_beta), skew_alpha=float(spec.skew_alpha), shared=pairing.shared, folds=pairing.folds if spec.fold else ({}, {}),
                                 teacher_order=pairing.teacher_order if spec.inside else None,
                                 student_width=pairing.student_width, teacher_width=pairing.teacher_width, unshared=float(spec.unshared))

    @classmethod
    def build(cls, spec, key, *, student, teacher, causal, stored=None):
        from distill.logit_terms import LogitsTerm  # torch: the config reads the kinds without it

        return LogitsTerm(spec.name, spec.weight, divergence_kind=spec.divergence, temperature=float(spec.temperature),
                          jsd_beta=float(spec.jsd_beta), skew_alpha=float(spec.skew_alpha))
