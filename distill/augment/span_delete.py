"""``span_delete``: each copy drops random spans of words (up to ``max_span`` words each) until ``rate`` of
the text's words are gone; a text of one word is kept as it is."""

from __future__ import annotations

from dataclasses import dataclass

from distill.augment.base import WORD, AugmentKind, AugmentSpec
from distill.errors import check


@dataclass
class SpanDeleteSpec(AugmentSpec):
    max_span: int = 3  # words in one deleted span, at most


class SpanDelete(AugmentKind):
    kind = "span_delete"
    Spec = SpanDeleteSpec

    @classmethod
    def check(cls, spec, key):
        check(isinstance(spec.max_span, int) and spec.max_span >= 1, f"{key}.max_span must be an integer >= 1 (got {spec.max_span!r})")

    def rewrite(self, texts):
        return [[self._copy(text, row, copy) for copy in range(self.spec.copies)] for row, text in enumerate(texts)]

    def _copy(self, text: str, row: int, copy: int) -> str:
        words = WORD.findall(text)
        if len(words) < 2:
            return text
        rng = self.rng(row, copy)
        target = min(len(words) - 1, max(1, round(self.spec.rate * len(words))))
        gone: set[int] = set()
        while len(gone) < target:
            length = min(rng.randint(1, self.spec.max_span), target - len(gone))
            start = rng.randrange(len(words) - length + 1)
            gone.update(range(start, start + length))
        return " ".join(w for i, w in enumerate(words) if i not in gone)

    def describe(self):
        return f"span_delete, {self.spec.rate:.0%} of the words in spans of up to {self.spec.max_span}"
