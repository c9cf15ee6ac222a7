"""Completions the student writes (``rollout.*``): on-policy distillation, GKD's lambda.

Each optimizer step, before the teacher is asked, :meth:`Rollouts.apply` takes the step's micro-batches
(of this process) and, for the rows drawn (``rollout.draw``: every row of the ``rollout.on_policy`` share
of steps, drawn from ``(seed, step)`` as GKD and TRL draw batches; or that share of each step's rows, drawn
from ``(seed, step, source, row)``; either way the world size changes nothing), replaces what follows the
row's prompt with a completion the student writes now, with its current weights: every such prompt of the
step in one call to the engine (:mod:`distill.generation`), under ``no_grad``, with a KV cache; the
targets of such a row are the completion only. The other rows are the data as it is (its own targets,
so ``on_policy`` near 0 trains as today).

A row's prompt: what its labels mask before its last labelled span (a ``data.prompt_field`` prompt, a
conversation before its last assistant turn), else its first ``rollout.prompt_tokens`` tokens.
The teacher then scores prompt + completion like any batch (``teacher.source`` model or remote; a store
cannot score text it has not seen). A teacher of another tokenizer (:mod:`distill.pairing`) scores the
text: the prompt and the completion are decoded and tokenized by both, as the data's rows are.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from distill.config import data_sources
from distill.data import collate
from distill.errors import ConfigError
from distill.generation import ENGINES
from distill.losses import IGNORE_INDEX


def prompt_length(labels: list[int], *, length: int, lead: int, prompt_tokens: int) -> int:
    """The prompt of one row (``labels`` unshifted, ``length`` real tokens, ``lead`` of them BOS): the tokens
    before its last labelled span when they are more than the lead, else its first ``prompt_tokens``."""
    start = None
    for i in range(length - 1, -1, -1):
        if labels[i] != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX):
            start = i
            break
    if start is not None and start > lead:
        return start
    return min(prompt_tokens, length)


def row_prompt(row: dict, *, lead: int, prompt_tokens: int) -> list[int]:
    """The prompt ids of one tokenized row (``input_ids``, unshifted ``labels``), by :func:`prompt_length`."""
    ids = row["input_ids"]
    return ids[: prompt_length(row["labels"], length=len(ids), lead=lead, prompt_tokens=prompt_tokens)]


@dataclass
class _Totals:
    """What the step's generation cost, summed over a log window."""

    seconds: float = 0.0
    tokens: int = 0
    completions: int = 0
    rows: int = 0


class Rollouts:
    """The on-policy share of each step's rows, rewritten with the student's completions (see the module)."""

    def __init__(self, cfg, *, tokenizer, vocab: int, seed: int, zero3: bool = False, world_size: int = 1, sample_prompts=(), pairing=None,
                 teacher_limit: int | None = None):
        self.cfg, self.seed, self.tokenizer, self.sample_prompts = cfg, seed, tokenizer, list(sample_prompts)
        self.pairing, self.teacher_limit = pairing, teacher_limit or 1 << 30  # a teacher of another tokenizer: rows rebuilt for both
        self.engine = ENGINES[cfg.engine](cfg, tokenizer=tokenizer, vocab=vocab)
        self.bos, self.pad = tokenizer.bos_token_id, self.engine.pad
        self.synced = zero3 and world_size > 1  # ZeRO-3 gathers each layer collectively: every process runs every forward
        self.totals = _Totals()

    def on_policy(self, step: int, source: int, row: int) -> bool:
        drawn = f"{self.seed}/{step}" if self.cfg.draw == "step" else f"{self.seed}/{step}/{source}/{row}"
        return random.Random(drawn).random() < self.cfg.on_policy

    def split(self, batch: dict) -> list[tuple[list[int], list[int], list[int], tuple[int, int]]]:
        """Each row of ``batch`` as (prompt ids, the data's continuation, the row's own labels, the row's (source, index))."""
        out = []
        for ids, labels, mask, where in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist(),
                                             batch["rows"].tolist()):
            length = sum(mask)
            lead = int(self.bos is not None and length > 0 and ids[0] == self.bos)
            cut = prompt_length(labels, length=length, lead=lead, prompt_tokens=self.cfg.prompt_tokens)
            out.append((ids[:cut], ids[cut:length], labels[:length], tuple(where)))
        return out

    def apply(self, model, batches: list[dict], *, step: int, rank: int) -> list[dict]:
        """The step's micro-batches with prompt + completion rows, targets on the completions only (see the module)."""
        start = time.perf_counter()
        rows = [self.split(batch) for batch in batches]
        chosen = [(b, i) for b, batch_rows in enumerate(rows) for i, (_, _, _, (source, index)) in enumerate(batch_rows)
                  if self.on_policy(step, source, index)]
        prompts = [rows[b][i][0] for b, i in chosen]
        if self.synced and not prompts and self.cfg.draw == "row":  # this process still runs the forwards the others run
            prompts = [rows[0][0][0]]
        written = self.engine.generate(model, prompts, seed=self.seed * 1_000_003 + step * 1009 + rank, synced=self.synced) if prompts else []
        for (b, i), completion in zip(chosen, written):
            prompt, _, _, where = rows[b][i]
            # Every token the student wrote is a target, its EOS too; its prompt is not.
            rows[b][i] = (prompt, completion, [IGNORE_INDEX] * len(prompt) + completion, where)
        out = []
        for b, batch_rows in enumerate(rows):
            sequences = [{"input_ids": prompt + rest, "labels": labels} for prompt, rest, labels, _ in batch_rows]
            if self.pairing is not None:
                written_rows = {i: completion for (c, i), completion in zip(chosen, written) if c == b}
                sequences = [self._paired(batch_rows[i][0], written_rows[i]) if i in written_rows else _paired_row(batches[b], i)
                             for i in range(len(batch_rows))]
            out.append(collate(sequences, self.pad, [where for *_, where in batch_rows]))
        self.totals.seconds += time.perf_counter() - start
        self.totals.tokens += sum(len(c) for c in written[: len(chosen)])
        self.totals.completions += len(chosen)
        self.totals.rows += sum(len(r) for r in rows)
        return out

    def _paired(self, prompt: list[int], completion: list[int]) -> dict:
        """A row the student completed, for a teacher of another tokenizer: the prompt's and the completion's text tokenized by
        both and matched (:meth:`distill.pairing.Pairing.document`); the student's targets are its completion as it tokenizes
        the text again (its own ids where it wrote them the usual way), closed by its EOS only where it wrote one."""
        from distill.pairing import blocks  # torch-free

        text = lambda ids: self.tokenizer.decode([i for i in ids if i not in (self.bos, self.tokenizer.eos_token_id)], skip_special_tokens=False)
        ended = bool(completion) and completion[-1] == self.tokenizer.eos_token_id  # else cut at rollout.max_new_tokens: no EOS on either side
        doc = self.pairing.document([(text(prompt), False), (text(completion), True)], "rollout", eos=ended)
        row = blocks(doc, [(0, len(doc))], self.teacher_limit)[0]
        return {**row, **self.pairing.target_bytes(row)}

    def metrics(self, seconds: float, accelerator=None) -> dict:
        """The log window's generation figures over every process (``seconds``: the window's training time), then a fresh window.
        A collective when ``accelerator`` is given: every process calls it at the same steps."""
        t, self.totals = self.totals, _Totals()
        counts = [float(t.tokens), float(t.completions), float(t.rows)]
        if accelerator is not None and accelerator.num_processes > 1:
            counts = accelerator.reduce(torch.tensor(counts, device=accelerator.device), reduction="sum").tolist()
        tokens, completions, rows = counts
        processes = accelerator.num_processes if accelerator is not None else 1
        return {"train/generation_time_share": t.seconds / max(seconds, 1e-9),  # this process's
                "train/generated_tokens_per_s": tokens / processes / max(t.seconds, 1e-9),  # a process's, on average
                "train/completion_length": tokens / max(completions, 1), "train/on_policy_rows": completions / max(rows, 1)}

    def samples(self, model, step: int) -> list[dict]:
        """The student's completions of the first validation prompts (``rollout.samples``), as text: at every evaluation, the same
        prompts and sampling seed, so the rows of two evaluations differ by what the student learnt between them."""
        if not self.sample_prompts:
            return []
        written = self.engine.generate(model, self.sample_prompts, seed=self.seed * 1_000_003 - 1, synced=self.synced)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        return [{"prompt": decode(p), "completion": decode(c), "tokens": len(c)} for p, c in zip(self.sample_prompts, written)]

    def close(self) -> None:
        self.engine.close()


def _paired_row(batch: dict, i: int) -> dict:
    """Row ``i`` of a collated batch tokenized by both (:func:`distill.data.collate`), as the row it was collated from."""
    n, m = int(batch["attention_mask"][i].sum()), int(batch["teacher_attention_mask"][i].sum())
    row = {key: batch[key][i, :n].tolist() for key in ("input_ids", "labels", "groups")}
    row.update({key: batch[key][i, :m].tolist() for key in ("teacher_input_ids", "teacher_labels", "teacher_groups")})
    row["inside"] = [tuple(t) for t in batch["inside"][i, :n].tolist()]
    row.update({key: int(batch[key][i]) for key in ("target_bytes", "teacher_target_bytes")})
    return row


def check_rollouts(cfg, source_kind, device) -> None:
    """What refuses rollouts before anything loads: a teacher source that cannot score new text, an engine without its device."""
    r = cfg.rollout
    if r.on_policy == 0:
        return
    if not source_kind.scores_new_text:
        raise ConfigError(f"rollout.on_policy={r.on_policy:g}: teacher.source={source_kind.kind} cannot score completions the student has just written "
                          "(a store holds the teacher's targets of the data's own text); use teacher.source=model or remote, or rollout.on_policy=0")
    if ENGINES[r.engine].needs_cuda and torch.device(device).type != "cuda":
        raise ConfigError(f"rollout.engine={r.engine} needs a CUDA GPU and this process has none; use rollout.engine=hf")


def build_rollouts(cfg, setup, accelerator) -> Rollouts | None:
    """The job's rollouts (None when ``rollout.on_policy`` is 0), checked against the models and data before step 0."""
    r, tokenizer = cfg.rollout, setup.tokenizer
    if r.on_policy == 0:
        return None
    if tokenizer.eos_token_id is None and tokenizer.pad_token_id is None:
        raise ConfigError("rollout.on_policy: the tokenizer has neither an EOS nor a padding token to end and pad completions with")
    sources = [(source.name, source.data, train) for source, (_, _, train, _) in zip(data_sources(cfg.data), setup.sources)]
    prompted = [name for name, source, _ in sources if source.prompt_field or source.messages_field]
    longest = cfg.data.seq_len if prompted else min(r.prompt_tokens, cfg.data.seq_len)
    for name, model in (("student", setup.student), ("teacher", setup.teacher)):
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if context and longest + r.max_new_tokens > context:
            raise ConfigError(f"rollout.max_new_tokens={r.max_new_tokens} after prompts of up to {longest} tokens exceeds the {name}'s context of {context} "
                              f"tokens; lower rollout.max_new_tokens{' or data.seq_len' if prompted else ' or rollout.prompt_tokens'}")
    for name, source, train in sources:
        if source.prompt_field:  # a row whose prompt is empty would be prompted by its first tokens instead: said, not guessed
            lead = int(tokenizer.bos_token_id is not None)
            empty = sum(1 for labels in train["labels"] if labels[lead] != IGNORE_INDEX)
            if empty:
                rows = f"{empty:,} training row{' has' if empty == 1 else 's have'}"
                raise ConfigError(f"rollout.on_policy: {rows}{'' if name == 'data' else ' (source ' + name + ')'} an empty data.prompt_field; "
                                  "every row needs a prompt for the student to complete")
    plugin = accelerator.state.deepspeed_plugin
    lead = int(tokenizer.bos_token_id is not None)
    validation = setup.sources[0][3]
    shown = [validation[i] for i in range(min(r.samples, len(validation)))]
    prompts = [row_prompt(row, lead=lead, prompt_tokens=r.prompt_tokens) for row in shown]
    teacher_config = setup.teacher.config if setup.teacher is not None else None
    return Rollouts(r, tokenizer=tokenizer, vocab=setup.vocab, seed=cfg.train.seed, zero3=plugin is not None and plugin.zero_stage == 3,
                    world_size=accelerator.num_processes, sample_prompts=prompts, pairing=setup.pairing,
                    teacher_limit=getattr(teacher_config, "max_position_embeddings", None))
