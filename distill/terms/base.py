"""What every objective term kind declares: the keys its spec takes, its checks (at config load, torch-free),
what it asks of the teacher, and how it builds its module (:mod:`distill.objective`, :mod:`distill.feature_terms`)."""

from __future__ import annotations

from distill.errors import ConfigError


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


class TermKind:
    """One kind of term (``loss.terms[i].kind``). A spec is the term's mapping in ``loss.terms`` (name filled in)."""

    kind = ""
    keys: frozenset = frozenset({"kind", "name", "weight"})  # what a spec of this kind may hold
    uses_teacher = True  # a weighted term of this kind makes the teacher run
    features = False  # it compares the teacher's features (hidden states, attention), which a store or a pool does not give

    @classmethod
    def check(cls, spec: dict, key: str, loss) -> None:
        """The kind's own checks of ``spec`` (keys and weight are checked for every kind); ``loss`` is ``loss.*``."""

    @classmethod
    def build(cls, spec: dict, key: str, *, loss, student, teacher, causal: bool):
        """The term's module (an ``nn.Module`` with ``name``, ``weight``, ``scale``, ``wants``, ``features``)."""
        raise NotImplementedError
