"""The registry of term kinds (``TERMS``), the lookup of ``loss.terms[i].kind``, and the parse of ``loss.terms`` into typed specs.

A module of its own, so that :mod:`distill.config` can import it while :mod:`distill.terms` itself is still loading.
"""

from __future__ import annotations

from distill.term_names import loss_terms, user_term
from distill.errors import ConfigError
from distill.terms.attention import Attention
from distill.terms.base import TermKind, TermSpec
from distill.terms.ce import CrossEntropy
from distill.terms.hidden import Hidden
from distill.terms.logits import Logits
from distill.terms.uld import Uld
from distill.terms.user import UserTerm

TERMS: dict[str, type[TermKind]] = {kind.kind: kind for kind in (Logits, CrossEntropy, Hidden, Attention, Uld)}


def kind_of(kind) -> type[TermKind] | None:
    """The kind of ``loss.terms[i].kind``: a shipped one, a term of the user's own by path, or None."""
    return TERMS.get(kind) if isinstance(kind, str) and kind in TERMS else UserTerm if user_term(kind) else None


def parse_terms(loss) -> list[TermSpec]:
    """``loss.terms`` (or the terms its ``loss.kind`` / ``loss.alpha`` shorthand stands for) as typed specs, each checked
    by its kind; fails naming ``loss.terms[i].key``. ``loss``: ``loss.*``."""
    specs = []
    for i, mapping in enumerate(loss_terms(loss)):
        key = f"loss.terms[{i}]"
        if not isinstance(mapping, dict):
            raise ConfigError(f"{key}: expected a mapping such as {{kind: logits, weight: 0.5}}, got {mapping!r}")
        kind = kind_of(mapping.get("kind"))
        if kind is None:
            raise ConfigError(f"{key}.kind: must be one of {', '.join(TERMS)} (got {mapping.get('kind')!r}), or path/to/file.py:Class for a term of your own")
        spec = kind.parse(mapping, key, loss)
        if spec.name in {s.name for s in specs}:
            raise ConfigError(f"{key}.name: {spec.name!r} is used twice; give each term its own name")
        specs.append(spec)
    return specs


def teacher_needed(loss) -> bool:
    """Whether a term with a weight asks the teacher for anything (``loss``: ``loss.*``)."""
    return any(kind_of(spec.kind).uses_teacher and spec.weight > 0 for spec in parse_terms(loss))
