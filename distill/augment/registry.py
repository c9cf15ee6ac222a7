"""The registry of augmentation kinds (``AUGMENTS``) and the parse of ``data.augment`` into a typed spec
(torch-free: the config reads it when it loads)."""

from __future__ import annotations

from distill.augment.base import AugmentKind, AugmentSpec
from distill.augment.span_delete import SpanDelete
from distill.augment.word_replace import WordReplace
from distill.errors import ConfigError

AUGMENTS: dict[str, type[AugmentKind]] = {kind.kind: kind for kind in (WordReplace, SpanDelete)}


def parse_augment(mapping, key: str) -> AugmentSpec:
    """``data.augment`` (``key`` names it) as its kind's spec, checked; fails naming the key."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{key}: expected a mapping such as {{kind: word_replace, copies: 4, rate: 0.3}}, got {mapping!r}")
    kind = AUGMENTS.get(mapping.get("kind"))
    if kind is None:
        raise ConfigError(f"{key}.kind: must be one of {', '.join(AUGMENTS)} (got {mapping.get('kind')!r})")
    return kind.parse(mapping, key)
