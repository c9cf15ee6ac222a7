"""Teacher sources (``teacher.source``): ``signal(batch, wants) -> TeacherOutputs``.

The training loop never knows where the teacher's signal comes from. ``model`` runs the frozen
teacher in this process; ``cache`` reads its precomputed top-k targets from a store
(:mod:`distill.store`); a served teacher is a further kind (DESIGN.md).
"""

from __future__ import annotations

import torch

from distill.errors import ConfigError
from distill.objective import TeacherOutputs
from distill.store import SparseTargets


class ModelSource:
    """The frozen teacher model, forwarded in this process without autograd."""

    kind = "model"

    def __init__(self, model, task, vocab: int, qkv_layers: set[int] = frozenset()):
        self.model, self.task, self.vocab, self.qkv_layers = model, task, vocab, qkv_layers

    def signal(self, batch: dict, wants: frozenset) -> TeacherOutputs:
        if not wants:
            return TeacherOutputs()
        # no_grad rather than inference_mode: autograd may save these tensors for the student's
        # backward, which inference tensors forbid (and cloning them would copy the logits).
        with torch.no_grad():
            return self.task.outputs(self.model, batch, wants, self.vocab, self.qkv_layers)


class CacheSource:
    """A teacher store (:mod:`distill.store`): the top-k targets of each batch row, read by the row's
    (source, index), so any stream order, resume point or world size reads the right ones."""

    kind = "cache"

    def __init__(self, store, task, source_names: list[str], split: str = "training", tail: str = "bucket"):
        self.store, self.task, self.names, self.split, self.tail = store, task, source_names, split, tail

    def signal(self, batch: dict, wants: frozenset) -> TeacherOutputs:
        if not wants:
            return TeacherOutputs()
        rows = batch["rows"].tolist()
        parts = [self.store.rows(self.split, self.names[source], [index]) for source, index in rows]
        sparse = SparseTargets.cat(parts, self.tail)
        expected = self.task.target_count(batch)
        if len(sparse) != expected:
            raise ConfigError(f"teacher.cache: the store holds {len(sparse)} targets for a batch that has {expected}; "
                              "it was built for other sequences: run distill cache-teacher with this config")
        return TeacherOutputs(sparse=sparse.to(batch["input_ids"].device))


SOURCES = {ModelSource.kind: ModelSource, CacheSource.kind: CacheSource}


def build_source(kind: str, model, task, vocab: int, qkv_layers: set[int] = frozenset(), *, store=None, source_names=(), tail: str = "bucket"):
    if kind == CacheSource.kind:
        return CacheSource(store, task, list(source_names), tail=tail)
    return ModelSource(model, task, vocab, qkv_layers)
