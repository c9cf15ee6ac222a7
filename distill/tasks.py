"""Tasks (``task.kind``): what a batch's targets are and where the models' logits for them come from.

The training step asks the task rather than assuming a next-token shift, so a masked LM or a
classifier is a new task here, not a branch in the loop (DESIGN.md). ``causal_lm`` is the only
kind so far.
"""

from __future__ import annotations

import torch

from distill.losses import IGNORE_INDEX


class CausalLM:
    """Next-token prediction: the logits at position t predict the token at t + 1."""

    kind = "causal_lm"

    @staticmethod
    def targets(batch: dict) -> torch.Tensor:
        """``[B, L-1]`` target ids, ``IGNORE_INDEX`` where masked (prompt, padding)."""
        return batch["labels"][:, 1:]

    @staticmethod
    def logits(model, batch: dict, vocab: int) -> torch.Tensor:
        """``[B, L-1, vocab]`` logits at the target positions, cut to the shared vocabulary."""
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab]

    @classmethod
    def target_count(cls, batch: dict) -> int:
        return int((cls.targets(batch) != IGNORE_INDEX).sum())


TASKS = {CausalLM.kind: CausalLM}


def build_task(kind: str):
    return TASKS[kind]()
