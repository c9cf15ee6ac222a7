"""Teacher sources (``teacher.source``): ``signal(batch, wants) -> TeacherOutputs``.

The training loop never knows where the teacher's signal comes from. ``model`` runs the frozen
teacher in this process; a store of precomputed targets and a served teacher are further kinds
(DESIGN.md).
"""

from __future__ import annotations

import torch

from distill.objective import TeacherOutputs


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


SOURCES = {ModelSource.kind: ModelSource}


def build_source(kind: str, model, task, vocab: int, qkv_layers: set[int] = frozenset()):
    return SOURCES[kind](model, task, vocab, qkv_layers)
