"""What every augmentation kind declares: its typed spec (the keys it takes), its checks (at config load,
torch-free) and how it rewrites one text, seeded by the row and the copy.

An augmented source (``data.augment``, on ``data.*`` or on one ``data.mixture`` source) keeps its training
rows (unless ``originals: false``) and adds ``copies`` rewritten ones per row, without a label (the teacher's terms train on them, as
TinyBERT's augmented set). Copy ``c`` of row ``i`` of source ``s`` draws from ``Random("seed/s/i/c")``
alone, so resuming, the world size and the order rows are rewritten in change nothing.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass

from distill.errors import check

WORD = re.compile(r"\S+")  # the unit spans are deleted in: whitespace-separated words, punctuation attached


@dataclass
class AugmentSpec:
    """``data.augment``, typed: what every kind takes. A kind's spec adds its own fields."""

    kind: str
    copies: int = 4  # rewritten copies added per training row
    originals: bool = True  # keep the source's own rows beside the copies (false: a source of copies alone, weighed apart in data.mixture)
    rate: float = 0.3  # the share of words each copy changes
    seed: int = 0


class AugmentKind:
    """One kind of augmentation (``data.augment.kind``): its spec, its checks, how it rewrites a source's texts."""

    kind = ""
    Spec: type[AugmentSpec] = AugmentSpec
    tasks: tuple[str, ...] = ("causal_lm", "masked_lm", "sequence_classification")  # the task kinds it can serve

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.Spec)]

    @classmethod
    def parse(cls, mapping: dict, key: str) -> AugmentSpec:
        for name in mapping:
            check(name in cls.keys(), f"unknown config key: {key}.{name} (a {cls.kind} augmentation takes {', '.join(sorted(cls.keys()))})")
        spec = cls.Spec(**mapping)
        check(isinstance(spec.copies, int) and not isinstance(spec.copies, bool) and spec.copies >= 1, f"{key}.copies must be an integer >= 1 (got {spec.copies!r})")
        check(isinstance(spec.rate, (int, float)) and 0 < spec.rate <= 1, f"{key}.rate must be in (0, 1] (got {spec.rate!r})")
        check(isinstance(spec.seed, int), f"{key}.seed must be an integer (got {spec.seed!r})")
        check(isinstance(spec.originals, bool), f"{key}.originals must be true or false (got {spec.originals!r})")
        cls.check(spec, key)
        return spec

    @classmethod
    def check(cls, spec: AugmentSpec, key: str) -> None:
        """The kind's own checks of ``spec`` (copies, rate and seed are checked for every kind)."""

    @classmethod
    def check_task(cls, spec: AugmentSpec, key: str, task_kind: str) -> None:
        """Whether the kind can serve ``task.kind`` (at config load)."""
        check(task_kind in cls.tasks, f"{key}.kind={cls.kind} cannot serve task.kind={task_kind} (it serves {', '.join(cls.tasks)})")

    @classmethod
    def build(cls, spec: AugmentSpec, source: str, model_of) -> "AugmentKind":
        """The kind ready to rewrite ``source``'s rows; ``model_of(name)`` gives (a model, its tokenizer) to a kind that needs one."""
        return cls(spec, source)

    def __init__(self, spec: AugmentSpec, source: str):
        self.spec, self.source = spec, source

    def rng(self, row: int, copy: int) -> random.Random:
        return random.Random(f"{self.spec.seed}/{self.source}/{row}/{copy}")

    def rewrite(self, texts: list[str]) -> list[list[str]]:
        """``copies`` rewritten versions of each text (``[row][copy]``)."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind}, rate {self.spec.rate:g}"

    def identity(self) -> dict | None:
        """What decides the copies beside the spec, the source's name and its texts (a model's weights, a tokenizer), for
        the cache of rewritten rows; None: the kind is not cached (cheap to redo, or nothing stable to name it by)."""
        return None
