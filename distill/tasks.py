"""Tasks (``task.kind``): what a batch's targets are and how a model's outputs for them are taken.

The training step asks the task rather than assuming a next-token shift, so a masked LM or a
classifier is a new task here, not a branch in the loop (DESIGN.md).
"""

from __future__ import annotations

import contextlib

import torch

from distill.config import LOGITS
from distill.feature_terms import ATTENTIONS, HIDDEN, QKV, captured_qkv
from distill.losses import IGNORE_INDEX
from distill.objective import Outputs


class CausalLM:
    """Next-token prediction: the logits at position t predict the token at t + 1."""

    kind = "causal_lm"
    causal = True

    @staticmethod
    def targets(batch: dict) -> torch.Tensor:
        """``[B, L-1]`` target ids, ``IGNORE_INDEX`` where masked (prompt, padding)."""
        return batch["labels"][:, 1:]

    @staticmethod
    def logits(model, batch: dict, vocab: int) -> torch.Tensor:
        """``[B, L-1, vocab]`` logits at the target positions, cut to the shared vocabulary."""
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab]

    @classmethod
    def feature_weights(cls, batch: dict) -> torch.Tensor:
        """``[B, L]``: 1 at each position whose output predicts a target, else 0 (sums to the target count).

        A feature term is then a mean over the same positions the logit terms average over.
        """
        weights = torch.zeros(batch["labels"].shape, dtype=torch.float32, device=batch["labels"].device)
        weights[:, :-1] = (cls.targets(batch) != IGNORE_INDEX).float()
        return weights

    @classmethod
    def outputs(cls, model, batch: dict, wants: frozenset, vocab: int, qkv_layers: set[int] = frozenset()) -> Outputs:
        """The model's outputs that ``wants`` names, for the objective."""
        capture = captured_qkv(model, qkv_layers) if QKV in wants and qkv_layers else contextlib.nullcontext({})
        with capture as qkv:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=HIDDEN in wants, output_attentions=ATTENTIONS in wants)
        return Outputs(logits=out.logits[:, :-1, :vocab] if LOGITS in wants else None,
                       hidden_states=out.hidden_states if HIDDEN in wants else None,
                       attentions=out.attentions if ATTENTIONS in wants else None, qkv=qkv if QKV in wants else None)

    @classmethod
    def target_count(cls, batch: dict) -> int:
        return int((cls.targets(batch) != IGNORE_INDEX).sum())


TASKS = {CausalLM.kind: CausalLM}


def build_task(kind: str):
    return TASKS[kind]()
