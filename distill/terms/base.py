"""What every objective term kind declares: its typed spec (a dataclass with the keys it takes), its checks
(at config load, torch-free), what it asks of the teacher, and how it builds its module
(:mod:`distill.logit_terms`, :mod:`distill.feature_terms`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from distill.errors import check


def check_number(value, key: str, *, positive: bool = False) -> None:
    """``value`` is a number (not a bool) >= 0, or > 0 when ``positive``; else a one-line error naming ``key``."""
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if positive:
        check(number and value > 0, f"{key} must be > 0 (got {value!r})")
    else:
        check(number and value >= 0, f"{key} must be a number >= 0 (got {value!r})")


@dataclass
class TermSpec:
    """One entry of ``loss.terms``, typed: what every kind takes. A kind's spec adds its own fields."""

    kind: str
    name: str
    weight: float = 1.0


class TermKind:
    """One kind of term (``loss.terms[i].kind``): its spec, its checks, what it asks of the teacher, how it builds."""

    kind = ""
    Spec: type[TermSpec] = TermSpec
    uses_teacher = True  # a weighted term of this kind makes the teacher run
    features = False  # it compares the teacher's features (hidden states, attention), not its targets
    stored = False  # its features can come from a store or a pool (--hidden-layers) instead of the loaded teacher
    across = False  # it trains with a teacher of another tokenizer (distill.pairing): build_across builds it then

    @classmethod
    def keys(cls) -> list[str]:
        """What a spec of this kind may hold."""
        return [f.name for f in dataclasses.fields(cls.Spec)]

    @classmethod
    def defaults(cls, loss) -> dict:
        """Values a spec takes from ``loss.*`` when it does not set them (the logits term's shorthand options)."""
        return {}

    @classmethod
    def parse(cls, mapping: dict, key: str, loss) -> TermSpec:
        """``mapping`` (its name filled in) as this kind's spec; unknown keys and a bad weight fail here, then :meth:`check`."""
        for name in mapping:
            check(name in cls.keys(), f"unknown config key: {key}.{name} (a {cls.kind} term takes {', '.join(sorted(cls.keys()))})")
        weight = mapping.get("weight", 1.0)
        check_number(weight, f"{key}.weight")
        spec = cls.Spec(**{**cls.defaults(loss), **mapping, "weight": float(weight)})
        cls.check(spec, key)
        return spec

    @classmethod
    def check(cls, spec: TermSpec, key: str) -> None:
        """The kind's own checks of ``spec`` (keys and weight are checked for every kind)."""

    @classmethod
    def build(cls, spec: TermSpec, key: str, *, student, teacher, causal: bool, stored=None):
        """The term's module (an ``nn.Module`` with ``name``, ``weight``, ``scale``, ``wants``, ``features``). ``stored``: the
        teacher's features a store holds (:class:`distill.stored_features.StoredFeatures`), when they stand in for the teacher."""
        raise NotImplementedError

    @classmethod
    def build_across(cls, spec: TermSpec, key: str, *, pairing):
        """The term when teacher and student tokenize differently (``pairing``: :class:`distill.pairing.Pairing`, its widths set)."""
        raise NotImplementedError
