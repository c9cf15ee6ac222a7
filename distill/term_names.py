"""The objective's names, torch-free and importing nothing of the project: the divergences, the logits term's
kind, the ``loss.kind`` / ``loss.alpha`` shorthand, and the spelling of a term of the user's own.

Shared by :mod:`distill.config` (the schema) and :mod:`distill.terms` (the kinds), which the config's
checks import: a leaf, so that either package may load first.
"""

from __future__ import annotations

from typing import Literal

LossKind = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
LOGITS = "logits"  # the teacher output a logit term asks for, and that term's kind


def loss_terms(cfg) -> list[dict]:
    """``loss.terms`` with names filled in, or the terms the ``loss.kind`` / ``loss.alpha`` shorthand stands for."""
    if not cfg.terms:
        return [{"kind": LOGITS, "name": "kd", "divergence": cfg.kind, "weight": 1.0 - cfg.alpha}, {"kind": "ce", "name": "ce", "weight": cfg.alpha}]
    return [{**spec, "name": spec.get("name", _default_name(spec.get("kind")))} if isinstance(spec, dict) else spec for spec in cfg.terms]


def _default_name(kind) -> str:
    """kd for the logits term, the class for a term of the user's own, else the kind."""
    if kind == LOGITS:
        return "kd"
    own = user_term(kind)
    return own[1] if own else kind


def user_term(kind) -> tuple[str, str] | None:
    """(file, class) of a term of the user's own, ``kind: path/to/my_term.py:MyTerm``; None for a shipped kind."""
    if not isinstance(kind, str) or ".py:" not in kind:
        return None
    path, _, name = kind.rpartition(":")
    return (path, name) if path.endswith(".py") and name.isidentifier() else None
