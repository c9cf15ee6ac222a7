"""Augmentation kinds (``data.augment``), one file each: TinyBERT's masked-LM word replacement and
random span deletion. :func:`augmented` adds a source's rewritten copies to its training rows."""

from distill.augment.base import AugmentKind, AugmentSpec  # noqa: F401
from distill.augment.registry import AUGMENTS, parse_augment  # noqa: F401
from distill.augment.span_delete import SpanDelete  # noqa: F401
from distill.augment.word_replace import WordReplace  # noqa: F401
