"""Teacher sources (``teacher.source``): ``signal(batch, wants) -> TeacherOutputs``.

The training loop never knows where the teacher's signal comes from. ``model`` runs the frozen
teacher in this process; a store of precomputed targets and a served teacher are further kinds
(DESIGN.md).
"""

from __future__ import annotations

import torch

from distill.objective import LOGITS, TeacherOutputs


class ModelSource:
    """The frozen teacher model, forwarded in this process under inference mode."""

    kind = "model"

    def __init__(self, model, task, vocab: int):
        self.model, self.task, self.vocab = model, task, vocab

    def signal(self, batch: dict, wants: frozenset) -> TeacherOutputs:
        if LOGITS not in wants:
            return TeacherOutputs()
        with torch.inference_mode():
            logits = self.task.logits(self.model, batch, self.vocab)
        # Cloned outside inference mode: autograd must be able to save it for the student's backward.
        return TeacherOutputs(logits=logits.clone())


SOURCES = {ModelSource.kind: ModelSource}


def build_source(kind: str, model, task, vocab: int):
    return SOURCES[kind](model, task, vocab)
