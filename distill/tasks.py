"""Tasks (``task.kind``): what a batch's targets are and how a model's outputs for them are taken.

The training step asks the task rather than assuming a next-token shift, so a masked LM or a
classifier is a new task here, not a branch in the loop (DESIGN.md).
"""

from __future__ import annotations

import contextlib

import torch

from distill.config import LOGITS
from distill.errors import ConfigError
from distill.feature_terms import ATTENTIONS, HIDDEN, QKV, captured_qkv
from distill.losses import IGNORE_INDEX
from distill.objective import Outputs


class CausalLM:
    """Next-token prediction: the logits at position t predict the token at t + 1."""

    kind = "causal_lm"
    causal = True
    metrics = "lm"
    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"

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

    @classmethod
    def eval_logits(cls, model, batch: dict, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(``[N, vocab]`` logits, ``[N]`` targets) of every target position, masked ones included."""
        logits = cls.logits(model, batch, vocab)
        return logits.reshape(-1, logits.shape[-1]), cls.targets(batch).reshape(-1)

    @staticmethod
    def tokenize(raw, tokenizer, cfg, split_name: str, model_config):
        from distill import data

        return data.tokenize(raw, tokenizer, cfg, split_name)

    @staticmethod
    def shared_outputs(teacher, student, tokenizer, *, truncate_vocab: bool) -> int:
        """The width of the distributions the two models are compared over (the shared vocabulary)."""
        from distill import models

        if teacher is None:
            return models.output_vocab(student)
        return models.shared_vocab_size(teacher, student, tokenizer, truncate_vocab=truncate_vocab)


class SequenceClassification:
    """A class per sequence (or text pair): the teacher's class distribution is the target.

    Feature terms weigh each sequence's tokens equally and each sequence as one target, so a
    hidden-state term is a per-sequence mean over its tokens, averaged over sequences.
    """

    kind = "sequence_classification"
    causal = False
    metrics = "classes"
    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"

    @staticmethod
    def targets(batch: dict) -> torch.Tensor:
        """``[B]`` class ids."""
        return batch["labels"]

    @staticmethod
    def logits(model, batch: dict, vocab: int) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :vocab]

    @classmethod
    def feature_weights(cls, batch: dict) -> torch.Tensor:
        mask = batch["attention_mask"].float() * (cls.targets(batch) != IGNORE_INDEX).float()[:, None]
        return mask / batch["attention_mask"].float().sum(-1, keepdim=True).clamp(min=1)

    @classmethod
    def outputs(cls, model, batch: dict, wants: frozenset, vocab: int, qkv_layers: set[int] = frozenset()) -> Outputs:
        capture = captured_qkv(model, qkv_layers) if QKV in wants and qkv_layers else contextlib.nullcontext({})
        with capture as qkv:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=HIDDEN in wants, output_attentions=ATTENTIONS in wants)
        return Outputs(logits=out.logits[:, :vocab] if LOGITS in wants else None,
                       hidden_states=out.hidden_states if HIDDEN in wants else None,
                       attentions=out.attentions if ATTENTIONS in wants else None, qkv=qkv if QKV in wants else None)

    @classmethod
    def target_count(cls, batch: dict) -> int:
        return int((cls.targets(batch) != IGNORE_INDEX).sum())

    @classmethod
    def eval_logits(cls, model, batch: dict, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        return cls.logits(model, batch, vocab), cls.targets(batch)

    @staticmethod
    def tokenize(raw, tokenizer, cfg, split_name: str, model_config):
        from distill import data

        return data.tokenize_labelled(raw, tokenizer, cfg, split_name, _label2id(model_config))

    @staticmethod
    def shared_outputs(teacher, student, tokenizer, *, truncate_vocab: bool) -> int:
        """The number of classes, after checking that the student's label set is the teacher's."""
        if teacher is not None:
            t, s = _labels(teacher.config), _labels(student.config)
            if t != s:
                raise ConfigError(f"the student's labels {s} differ from the teacher's {t}; a classifier student needs the teacher's label set "
                                  "(build it from student.architecture, or fine-tune a student with the same id2label)")
        return student.config.num_labels


class MaskedLM:
    """Masked-token prediction (BERT, DistilBERT): the student learns the teacher's distribution
    at the masked positions.

    Masking happens when the data is tokenized, per sequence, from (``task.mask_seed``, split,
    row): the same positions and replacements whatever the world size, the resume point or the
    order the stream visits them.
    """

    kind = "masked_lm"
    causal = False
    metrics = "masked"
    auto_class = "AutoModelForMaskedLM"
    peft_task_type = None  # peft has no masked-LM task type; a plain PeftModel

    def __init__(self, mask_rate: float = 0.15, mask_seed: int = 0):
        self.mask_rate, self.mask_seed = mask_rate, mask_seed

    @staticmethod
    def targets(batch: dict) -> torch.Tensor:
        """``[B, L]`` original ids at masked positions, ``IGNORE_INDEX`` elsewhere."""
        return batch["labels"]

    @staticmethod
    def logits(model, batch: dict, vocab: int) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :vocab]

    @classmethod
    def feature_weights(cls, batch: dict) -> torch.Tensor:
        """Every token of a sequence weighs alike, and a sequence as much as its masked targets."""
        mask = batch["attention_mask"].float()
        targets = (cls.targets(batch) != IGNORE_INDEX).float().sum(-1, keepdim=True)
        return mask * targets / mask.sum(-1, keepdim=True).clamp(min=1)

    @classmethod
    def outputs(cls, model, batch: dict, wants: frozenset, vocab: int, qkv_layers: set[int] = frozenset()) -> Outputs:
        capture = captured_qkv(model, qkv_layers) if QKV in wants and qkv_layers else contextlib.nullcontext({})
        with capture as qkv:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=HIDDEN in wants, output_attentions=ATTENTIONS in wants)
        return Outputs(logits=out.logits[..., :vocab] if LOGITS in wants else None,
                       hidden_states=out.hidden_states if HIDDEN in wants else None,
                       attentions=out.attentions if ATTENTIONS in wants else None, qkv=qkv if QKV in wants else None)

    @classmethod
    def target_count(cls, batch: dict) -> int:
        return int((cls.targets(batch) != IGNORE_INDEX).sum())

    @classmethod
    def eval_logits(cls, model, batch: dict, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = cls.logits(model, batch, vocab)
        return logits.reshape(-1, logits.shape[-1]), cls.targets(batch).reshape(-1)

    def tokenize(self, raw, tokenizer, cfg, split_name: str, model_config):
        from distill import data

        return data.tokenize_masked(raw, tokenizer, cfg, split_name, rate=self.mask_rate, seed=self.mask_seed)

    shared_outputs = staticmethod(CausalLM.shared_outputs)


def _labels(config) -> list[str]:
    return [str(config.id2label[i]) for i in range(config.num_labels)]


def _label2id(config) -> dict[str, int]:
    return {name: i for i, name in enumerate(_labels(config))}


TASKS = {CausalLM.kind: CausalLM, SequenceClassification.kind: SequenceClassification, MaskedLM.kind: MaskedLM}


def build_task(cfg):
    """The task of ``task.*`` (a TaskConfig, or just its kind)."""
    if isinstance(cfg, str):
        return TASKS[cfg]()
    if cfg.kind == MaskedLM.kind:
        return MaskedLM(cfg.mask_rate, cfg.mask_seed)
    return TASKS[cfg.kind]()
