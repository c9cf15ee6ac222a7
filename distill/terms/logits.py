"""``logits``: a divergence between the teacher's and the student's distributions at temperature T (counted T^2 times)."""

from __future__ import annotations

import typing

from distill.config.schema import LOGITS, LossKind
from distill.terms.base import TermKind, check


class Logits(TermKind):
    kind = LOGITS
    keys = frozenset({"kind", "name", "weight", "divergence", "temperature", "jsd_beta", "skew_alpha"})

    @classmethod
    def check(cls, spec, key, loss):
        kinds = typing.get_args(LossKind)
        check(spec.get("divergence", loss.kind) in kinds, f"{key}.divergence: must be one of {', '.join(kinds)} (got {spec.get('divergence')!r})")
        temperature = spec.get("temperature", loss.temperature)
        check(not isinstance(temperature, bool) and isinstance(temperature, (int, float)) and temperature > 0,
              f"{key}.temperature must be > 0 (got {temperature!r})")

    @classmethod
    def build(cls, spec, key, *, loss, student, teacher, causal):
        from distill.logit_terms import LogitsTerm

        return LogitsTerm(spec["name"], float(spec.get("weight", 1.0)), divergence_kind=spec.get("divergence", loss.kind),
                          temperature=float(spec.get("temperature", loss.temperature)), jsd_beta=float(spec.get("jsd_beta", loss.jsd_beta)),
                          skew_alpha=float(spec.get("skew_alpha", loss.skew_alpha)))
