"""The objective of a training step: a list of named, weighted terms (``loss.terms``).

A logit term (``logits``, ``ce``) gives a per-token loss over the task's targets, and the
objective sums those over the unmasked targets of a micro-batch in one chunked pass
(:func:`distill.losses.term_sums`); a feature term (``hidden``, ``attention``,
:mod:`distill.feature_terms`) gives its own sum over the task's feature positions. The step
divides every sum by the global target count. The step's loss is ``sum_i weight_i * scale_i * term_i``
(``scale`` is T^2 for a logit divergence at temperature T, which keeps its gradient's size
independent of T). Terms are ``nn.Module`` s, so a term that owns parameters (a projection from
student to teacher width) joins the optimizer, the checkpoints and ZeRO with the objective.

``loss.kind`` / ``loss.alpha`` are the shorthand for
``[{kind: logits, name: kd, divergence: KIND, weight: 1 - alpha}, {kind: ce, name: ce, weight: alpha}]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from distill.config import LOGITS, LossConfig
from distill.errors import ConfigError
from distill.feature_terms import QKV
from distill.fused import HEAD_INPUTS, chunk_rows, head_sums, plain_linear, teacher_chunks
from distill.logit_terms import CrossEntropyTerm, LogitsTerm, Term, _unreported  # noqa: F401  (Term: the base of a user's own term)
from distill.losses import IGNORE_INDEX, term_sums
from distill.sparse import SparseTargets
from distill.terms import kind_of, parse_terms


@dataclass
class Outputs:
    """What a model gives the objective for a batch: only what the objective asked for.

    The teacher source returns one for the teacher (``TeacherOutputs``), the task one for the student.
    """

    logits: torch.Tensor | None = None  # [B, T, V] at the task's target positions
    sparse: SparseTargets | None = None  # a store's top-k targets of the unmasked targets, in order (instead of logits)
    features: torch.Tensor | None = None  # [B, T, H] the output layer's inputs there (instead of logits: distill.fused)
    head: object = None  # the output layer, with features
    hidden_states: tuple | None = None  # (L + 1) x [B, S, H]: embeddings, then each layer
    attentions: tuple | None = None  # L x [B, heads, S, S]
    qkv: dict | None = None  # {layer: [q, k, v]}, each [B, S, width]
    paired: object = None  # a teacher of another tokenizer: its logits on its own tokens, and the groups (distill.aligned_terms.Paired)


TeacherOutputs = Outputs


class Objective(nn.Module):
    """The named, weighted terms. ``fused``: logit terms are computed from the output layers'
    inputs (:mod:`distill.fused`), and neither model computes logits in training."""

    def __init__(self, terms: list[nn.Module], chunk_size: int, fused: bool = False, path: str = ""):
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.chunk_size, self.path = chunk_size, path  # path: which logit path runs, and why (the log's line)
        # Zero-weight terms are still reported, but never make the teacher run.
        self.wants = frozenset().union(*(t.wants for t in terms if t.weight > 0))
        if fused and LOGITS in self.wants:
            self.wants = (self.wants - {LOGITS}) | {HEAD_INPUTS}
        self.student_wants = frozenset({HEAD_INPUTS if fused else LOGITS}).union(self.wants - {LOGITS, HEAD_INPUTS})
        self.qkv_layers = ({s for t in terms if QKV in t.wants for s, _ in t.pairs}, {t_ for t in terms if QKV in t.wants for _, t_ in t.pairs})

    def chunk(self, vocab: int) -> int:
        """Tokens per chunk of the logit terms: ``loss.chunk_size``, or about 4M logits (16 MB in float32)."""
        return self.chunk_size or chunk_rows(vocab)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def sums(self, student: Outputs, teacher: Outputs | None, labels: torch.Tensor, feature_weights: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, vocab: int | None = None, report: bool = True) -> torch.Tensor:
        """``[n_terms]`` float32 sums over the unmasked targets of one micro-batch.

        Args:
            labels: ``[B, T]`` targets of the logit terms, ``IGNORE_INDEX`` where masked.
            feature_weights: ``[B, S]`` per-position weights of the feature terms (the task's).
            attention_mask: ``[B, S]`` the batch's key mask (relation terms).
            vocab: the shared vocabulary the logits are cut to (fused: the student's whole output layer when None).
            report: compute zero-weight terms too (they only inform the log); otherwise they are 0.
        """
        token_terms = [t for t in self.terms if not t.features]
        fns = [t.per_token if report or t.weight > 0 else _unreported for t in token_terms]
        if not fns:  # every term sums itself (a teacher of another tokenizer's logits term alone, feature terms alone)
            token_sums = []
        elif student.features is not None:
            vocab = vocab or student.head.out_features
            terms = [(fn, t.closed_form, t.weight * t.scale) for fn, t in zip(fns, token_terms)]
            token_sums = head_sums(student.features, student.head, teacher_chunks(teacher, labels, vocab), labels, terms, vocab=vocab,
                                   chunk_size=self.chunk(vocab))
        else:
            teacher_logits = None if teacher is None else teacher.logits if teacher.sparse is None else _at_every_position(teacher.sparse, labels)
            token_sums = term_sums(student.logits, teacher_logits, labels, fns, chunk_size=self.chunk(student.logits.shape[-1]))
        token_sums = iter(token_sums)
        anchor = student.features if student.features is not None else student.logits
        sums = []
        for term in self.terms:
            if not term.features:
                sums.append(next(token_sums))
            elif teacher is None or term.weight == 0:
                # Not computed, reported as 0; its parameters still join the graph (DDP/ZeRO expect their gradients).
                sums.append(sum((p.sum() for p in term.parameters()), anchor.new_zeros((), dtype=torch.float32)) * 0.0)
            else:
                sums.append(term(student, teacher, feature_weights, attention_mask))
        return torch.stack([s.float() for s in sums])

    def total(self, sums: torch.Tensor) -> torch.Tensor:
        """The step loss (a sum over targets) from :meth:`sums`."""
        weights = torch.tensor([t.weight * t.scale for t in self.terms], dtype=sums.dtype, device=sums.device)
        return (sums * weights).sum()


def _at_every_position(sparse: SparseTargets, labels: torch.Tensor) -> SparseTargets:
    """Sparse targets of the unmasked targets spread over every position of ``labels`` (masked ones: uniform, never counted)."""
    n, k = labels.numel(), sparse.ids.shape[-1]
    mask = labels.reshape(-1) != IGNORE_INDEX
    uniform = -torch.log(torch.tensor(float(k + 1)))
    full = SparseTargets(torch.zeros(n, k, dtype=sparse.ids.dtype, device=labels.device).copy_(torch.arange(k, device=labels.device)),
                         torch.full((n, k), float(uniform), device=labels.device), torch.full((n,), float(uniform), device=labels.device),
                         sparse.tail_mode)
    full.ids[mask], full.logprobs[mask], full.tail[mask] = sparse.ids, sparse.logprobs.float(), sparse.tail.float()
    return full


def fused_path(setting: str, task, student) -> tuple[bool, str]:
    """(whether logit terms run fused, a line saying which path and why) for ``loss.fused``."""
    if setting == "never":
        return False, "full logits (loss.fused=never)"
    why = None
    if task is None or student is None or not task.fused_head:
        why = f"the task {getattr(task, 'kind', None)} has no vocabulary-sized output layer"
    elif not plain_linear(student.get_output_embeddings()):
        why = f"the student's output layer is a {type(student.get_output_embeddings()).__name__}, not a plain Linear"
    if why is None:
        return True, "fused output layer (plain PyTorch: no [tokens, vocab] logits are held)"
    if setting == "always":
        raise ConfigError(f"loss.fused=always: {why}; set loss.fused=auto or never")
    return False, f"full logits ({why})"


def build_objective(cfg: LossConfig, *, student=None, teacher=None, causal: bool = True, task=None, stored=None, pairing=None) -> Objective:
    """The objective of ``loss.terms`` (or its shorthand), as checked when the config loaded.

    ``student`` and ``teacher`` (their configs: depth, width, heads) are needed by feature terms,
    whose layer maps and projections are checked and built here, before training; ``stored`` (a
    store's features) stands in for a teacher that is not loaded. With ``task`` and ``student``,
    ``loss.fused`` decides whether logit terms run from the output layers' inputs. ``pairing``: the teacher
    tokenizes differently (:mod:`distill.pairing`); its terms compare groups of tokens, from full logits.
    """
    if pairing is not None:
        if cfg.fused == "always":
            raise ConfigError("loss.fused=always: the teacher tokenizes differently, and its terms compare full distributions group by group; "
                              "set loss.fused=auto or never")
        return Objective([_across(spec, f"loss.terms[{i}]", pairing) for i, spec in enumerate(parse_terms(cfg))], chunk_size=cfg.chunk_size,
                         path="full logits (the teacher tokenizes differently: its distributions are compared group by group)")
    terms = [kind_of(spec.kind).build(spec, f"loss.terms[{i}]", student=student, teacher=teacher, causal=causal, stored=stored)
             for i, spec in enumerate(parse_terms(cfg))]
    fused, path = fused_path(cfg.fused, task, student)
    return Objective(terms, chunk_size=cfg.chunk_size, fused=fused, path=path)


def _across(spec, key: str, pairing) -> nn.Module:
    kind = kind_of(spec.kind)
    if not kind.across:
        raise ConfigError(f"{key}: a {spec.kind} term compares the teacher and the student position by position, and they tokenize "
                          "differently; use logits, uld and ce terms, or a student with the teacher's tokenizer")
    return kind.build_across(spec, key, pairing=pairing)


class Distillee(nn.Module):
    """The student and the objective's own parameters (projections) as one module.

    Prepared (DDP, ZeRO), optimized and checkpointed together, so the projections are trained,
    sharded and restored exactly like the student, while the saved student is ``student`` alone
    (:func:`split_state_dict`). The whole differentiable part of a step runs in :meth:`forward`,
    so DDP and DeepSpeed see every parameter used inside their forward.
    """

    def __init__(self, student: nn.Module, objective: Objective, task, vocab: int):
        super().__init__()
        self.student, self.objective = student, objective
        self.task, self.vocab = task, vocab
        # accelerate sizes ZeRO-3's "auto" buckets from the model's config (hidden_size).
        self.config = student.config
        # accelerate places a bitsandbytes model by these attributes instead of moving it.
        for name in ("is_loaded_in_8bit", "is_loaded_in_4bit", "hf_device_map"):
            if getattr(student, name, None):
                setattr(self, name, getattr(student, name))

    def forward(self, batch: dict, teacher: Outputs | None, report: bool = True) -> torch.Tensor:
        """``[n_terms]`` sums of the objective's terms over the batch's targets (see :meth:`Objective.sums`)."""
        outputs = self.task.outputs(self.student, batch, self.objective.student_wants, self.vocab, self.objective.qkv_layers[0])
        return self.objective.sums(outputs, teacher, self.task.targets(batch), self.task.feature_weights(batch), batch["attention_mask"],
                                   vocab=self.vocab, report=report)


def split_state_dict(state_dict: dict) -> tuple[dict, dict]:
    """A :class:`Distillee` state dict as (the student's, the objective's), prefixes removed."""
    parts = ({}, {})
    for key, value in state_dict.items():
        prefix, _, rest = key.partition(".")
        parts[prefix == "objective"][rest] = value
    return parts


def save_objective(objective: Objective, state_dict: dict, path) -> None:
    """Writes the objective's parameters (``model.safetensors``) and what they belong to (``terms.json``) into ``path``."""

    path = Path(path)
    path.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(path / "model.safetensors"))
    terms = [{"name": t.name, "kind": type(t).__name__, "weight": t.weight, **({"pairs": t.pairs} if hasattr(t, "pairs") else {})}
             for t in objective.terms]
    (path / "terms.json").write_text(json.dumps(terms, indent=2) + "\n")


def check_sampled_targets(objective) -> None:
    """Sampled teacher targets (``distill cache-teacher --targets sampled`` or ``mixed``) estimate the teacher's
    distribution at temperature 1 without bias; only the forward KL's gradient is linear in it, and
    another temperature would need the probabilities of ids never drawn. Refuses the other terms."""
    for term in objective.terms:
        problem = None if term.features else term.sampled_targets_problem()  # a feature term reads no targets
        if problem:
            raise ConfigError(f"loss term {term.name!r} ({problem}): sampled teacher targets give "
                              "an unbiased forward KL at temperature 1 only; use divergence forward_kl at temperature 1, or a top-k store "
                              "(distill cache-teacher --targets top_k)")
