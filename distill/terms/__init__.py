"""The objective's term kinds, one file each (its keys, checks, what it asks of the teacher, how it builds),
looked up by ``loss.terms[i].kind``; a term of the user's own loads by path (:mod:`distill.terms.user`).

Torch-free: the config checks every spec with these when it loads; the modules are built by
:func:`distill.objective.build_objective`.
"""

from __future__ import annotations

from distill.config.schema import user_term
from distill.terms.attention import Attention
from distill.terms.base import TermKind
from distill.terms.ce import CrossEntropy
from distill.terms.hidden import Hidden
from distill.terms.logits import Logits
from distill.terms.user import UserTerm

TERMS: dict[str, type[TermKind]] = {kind.kind: kind for kind in (Logits, CrossEntropy, Hidden, Attention)}


def kind_of(kind) -> type[TermKind] | None:
    """The kind of ``loss.terms[i].kind``: a shipped one, a term of the user's own by path, or None."""
    return TERMS.get(kind) if isinstance(kind, str) and kind in TERMS else UserTerm if user_term(kind) else None


def teacher_needed(loss) -> bool:
    """Whether a term with a weight asks the teacher for anything (``loss``: ``loss.*``)."""
    from distill.config.schema import loss_terms

    return any(kind_of(spec["kind"]).uses_teacher and float(spec.get("weight", 1.0)) > 0 for spec in loss_terms(loss))
