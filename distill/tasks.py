"""Tasks (``task.kind``): what a batch's targets are and how a model's outputs for them are taken.

The training step asks the task rather than assuming a next-token shift, so a masked LM or a
classifier is a new task here, not a branch in the loop (DESIGN.md). A task says which model
class it loads, how rows are tokenized, which logits are compared at which targets, how feature
terms weigh positions, and which metrics its evaluation reports.
"""

from __future__ import annotations

import contextlib

import torch

from distill import data, models
from distill.config import LOGITS
from distill.errors import ConfigError
from distill.feature_terms import ATTENTIONS, HIDDEN, QKV, captured_qkv
from distill.fused import HEAD_INPUTS, head_bypassed
from distill.losses import IGNORE_INDEX, UNLABELED
from distill.objective import Outputs


class Task:
    """What every task shares; a task defines ``targets``, ``cut``, ``feature_weights`` and ``tokenize``."""

    kind: str
    causal: bool  # attention relations are masked causally
    metrics: str  # "lm", "masked" or "classes": the family of figures evaluation reports, declared below
    perplexity = True  # evaluation reports the perplexity of its targets
    label_metrics: tuple[str, ...] = ()  # shipped metrics (distill.metrics) of predictions against references
    generates = True  # speed is generation latency and throughput (else a forward per sequence)
    token_targets = True  # its targets are vocabulary tokens, whose sparse top-k a pool serves (a store holds any task's)
    row_labels = False  # each target is a row with a hard label or none (UNLABELED): the log counts both
    auto_class: str  # the transformers auto class teacher and student load with
    peft_task_type: str | None

    @classmethod
    def from_config(cls, cfg) -> "Task":
        """The task of ``task.*`` (a kind's own settings, such as masking, come from it)."""
        return cls()

    @staticmethod
    def targets(batch: dict) -> torch.Tensor:
        return batch["labels"]

    fused_head = False  # whether its logit terms may be computed from the output layer's inputs (distill.fused)

    @staticmethod
    def at_targets(outputs: torch.Tensor) -> torch.Tensor:
        """``outputs`` (``[B, S, ...]``) at the positions whose outputs are compared with the targets."""
        return outputs

    def cut(self, logits: torch.Tensor, vocab: int) -> torch.Tensor:
        """The logits at the target positions, cut to the shared vocabulary (or class count)."""
        return self.at_targets(logits)[..., :vocab]

    def logits(self, model, batch: dict, vocab: int) -> torch.Tensor:
        return self.cut(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, vocab)

    def outputs(self, model, batch: dict, wants: frozenset, vocab: int, qkv_layers: set[int] = frozenset()) -> Outputs:
        """The model's outputs that ``wants`` names, for the objective."""
        capture = captured_qkv(model, qkv_layers) if QKV in wants and qkv_layers else contextlib.nullcontext({})
        bypass = head_bypassed(model) if HEAD_INPUTS in wants else contextlib.nullcontext(None)
        with capture as qkv, bypass as head:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=HIDDEN in wants, output_attentions=ATTENTIONS in wants)
        features = dict(hidden_states=out.hidden_states if HIDDEN in wants else None, attentions=out.attentions if ATTENTIONS in wants else None,
                        qkv=qkv if QKV in wants else None)
        if head is not None:  # out.logits holds the output layer's inputs
            return Outputs(features=self.at_targets(out.logits), head=head, **features)
        return Outputs(logits=self.cut(out.logits, vocab) if LOGITS in wants else None, **features)

    def target_count(self, batch: dict) -> int:
        return int((self.targets(batch) != IGNORE_INDEX).sum())

    def unlabelled_count(self, batch: dict) -> int:
        """Targets without a hard label (only a row-labelled task has any)."""
        return int((self.targets(batch) == UNLABELED).sum())

    def eval_logits(self, model, batch: dict, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(``[N, vocab]`` logits, ``[N]`` targets) of every target position, masked ones included."""
        logits = self.logits(model, batch, vocab)
        return logits.reshape(-1, logits.shape[-1]), self.targets(batch).reshape(-1)

    @staticmethod
    def width(model, tokenizer=None) -> int:
        """The width of one model's distributions (its output vocabulary, cut to the tokenizer's when given)."""
        vocab = models.output_vocab(model)
        return vocab if tokenizer is None else min(vocab, len(tokenizer))

    @staticmethod
    def shared_outputs(teacher, student, tokenizer, *, truncate_vocab: bool) -> int:
        """The width of the distributions the two models are compared over (the shared vocabulary)."""

        if teacher is None:
            return models.output_vocab(student)
        return models.shared_vocab_size(teacher, student, tokenizer, truncate_vocab=truncate_vocab)


class CausalLM(Task):
    """Next-token prediction: the logits at position t predict the token at t + 1."""

    kind, causal, metrics = "causal_lm", True, "lm"
    auto_class, peft_task_type = "AutoModelForCausalLM", "CAUSAL_LM"

    @staticmethod
    def targets(batch: dict) -> torch.Tensor:
        """``[B, L-1]`` target ids, ``IGNORE_INDEX`` where masked (prompt, padding)."""
        return batch["labels"][:, 1:]

    fused_head = True

    @staticmethod
    def at_targets(outputs: torch.Tensor) -> torch.Tensor:
        return outputs[:, :-1]

    def feature_weights(self, batch: dict) -> torch.Tensor:
        """``[B, L]``: 1 at each position whose output predicts a target, else 0 (sums to the target count).

        A feature term is then a mean over the same positions the logit terms average over.
        """
        weights = torch.zeros(batch["labels"].shape, dtype=torch.float32, device=batch["labels"].device)
        weights[:, :-1] = (self.targets(batch) != IGNORE_INDEX).float()
        return weights

    @staticmethod
    def tokenize(raw, tokenizer, cfg, split_name: str, model_config):
        return data.tokenize(raw, tokenizer, cfg, split_name)


class MaskedLM(Task):
    """Masked-token prediction (BERT, DistilBERT): the student learns the teacher's distribution
    at the masked positions.

    Masking happens when the data is tokenized, per sequence, from (``task.mask_seed``, split,
    row): the same positions and replacements whatever the world size, the resume point or the
    order the stream visits them.
    """

    kind, causal, metrics = "masked_lm", False, "masked"
    label_metrics, generates = ("accuracy",), False
    fused_head = True
    auto_class, peft_task_type = "AutoModelForMaskedLM", None  # peft has no masked-LM task type: a plain PeftModel

    @classmethod
    def from_config(cls, cfg) -> "MaskedLM":
        return cls(cfg.mask_rate, cfg.mask_seed)

    def __init__(self, mask_rate: float = 0.15, mask_seed: int = 0):
        self.mask_rate, self.mask_seed = mask_rate, mask_seed

    def feature_weights(self, batch: dict) -> torch.Tensor:
        """Every token of a sequence weighs alike, and a sequence as much as its masked targets."""
        mask = batch["attention_mask"].float()
        targets = (self.targets(batch) != IGNORE_INDEX).float().sum(-1, keepdim=True)
        return mask * targets / mask.sum(-1, keepdim=True).clamp(min=1)

    def tokenize(self, raw, tokenizer, cfg, split_name: str, model_config):
        return data.tokenize_masked(raw, tokenizer, cfg, split_name, rate=self.mask_rate, seed=self.mask_seed)


class SequenceClassification(Task):
    """A class per sequence (or text pair): the teacher's class distribution is the target.

    Feature terms weigh each sequence's tokens equally and each sequence as one target, so a
    hidden-state term is a per-sequence mean over its tokens, averaged over sequences.
    """

    kind, causal, metrics = "sequence_classification", False, "classes"
    perplexity, label_metrics, generates, token_targets, row_labels = False, ("accuracy", "macro_f1"), False, False, True
    auto_class, peft_task_type = "AutoModelForSequenceClassification", "SEQ_CLS"

    def feature_weights(self, batch: dict) -> torch.Tensor:
        mask = batch["attention_mask"].float() * (self.targets(batch) != IGNORE_INDEX).float()[:, None]
        return mask / batch["attention_mask"].float().sum(-1, keepdim=True).clamp(min=1)

    @staticmethod
    def tokenize(raw, tokenizer, cfg, split_name: str, model_config):
        # Unlabelled rows train the teacher's terms; validation keeps the labelled ones (accuracy needs a label).
        return data.tokenize_labelled(raw, tokenizer, cfg, split_name, _label2id(model_config), keep_unlabelled=split_name.startswith("training"))

    @staticmethod
    def width(model, tokenizer=None) -> int:
        return model.config.num_labels

    @staticmethod
    def shared_outputs(teacher, student, tokenizer, *, truncate_vocab: bool) -> int:
        """The number of classes, after checking that the student's label set is the teacher's."""
        if teacher is not None:
            t, s = _labels(teacher.config), _labels(student.config)
            if t != s:
                raise ConfigError(f"the student's labels {s} differ from the teacher's {t}; a classifier student needs the teacher's label set "
                                  "(build it from student.architecture, or fine-tune a student with the same id2label)")
        return student.config.num_labels


def _labels(config) -> list[str]:
    return [str(config.id2label[i]) for i in range(config.num_labels)]


def _label2id(config) -> dict[str, int]:
    return {name: i for i, name in enumerate(_labels(config))}


TASKS = {task.kind: task for task in (CausalLM, MaskedLM, SequenceClassification)}


def build_task(cfg) -> Task:
    """The task of ``task.*`` (a TaskConfig, or just its kind)."""
    if isinstance(cfg, str):
        return TASKS[cfg]()
    return TASKS[cfg.kind].from_config(cfg)
