"""Feature-based objective terms: hidden states and attention of mapped layers.

Each term returns a *sum* over the task's feature positions, weighted by the task's
``feature_weights`` (``[B, S]``, summing to the batch's target count), so that dividing by the
global target count makes it a weighted mean that does not depend on chunking, accumulation or
world size, like every other term.

Layers are numbered as in ``output_hidden_states``: 0 is the embeddings, 1..L the transformer
layers. ``layers: uniform`` maps student layer i (1..Ls) to teacher layer round(i * Lt / Ls)
(the last to the last), the embeddings too when ``embeddings: true``; an explicit list of
``[student, teacher]`` pairs overrides it.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import ConfigError

HIDDEN, ATTENTIONS, QKV = "hidden_states", "attentions", "qkv"


def uniform_pairs(student_layers: int, teacher_layers: int, *, embeddings: bool) -> list[tuple[int, int]]:
    """``[(student, teacher)]`` layer pairs, each student layer to the teacher layer at the same relative depth."""
    pairs = [(i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)]
    return [(0, 0), *pairs] if embeddings else pairs


def layer_pairs(spec, student_layers: int, teacher_layers: int, *, embeddings: bool, key: str, first: int) -> list[tuple[int, int]]:
    """The term's layer pairs, checked against the models' depths; errors name ``key``."""
    if spec == "uniform":
        pairs = uniform_pairs(student_layers, teacher_layers, embeddings=embeddings)
        return [p for p in pairs if p[0] >= first]
    if not isinstance(spec, list) or not spec or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in spec):
        raise ConfigError(f"{key}: expected 'uniform' or a list of [student_layer, teacher_layer] pairs (got {spec!r})")
    for s, t in spec:
        for layer, who, depth in ((s, "student", student_layers), (t, "teacher", teacher_layers)):
            if isinstance(layer, bool) or not isinstance(layer, int) or not first <= layer <= depth:
                raise ConfigError(f"{key}: {who} layer {layer!r} is out of range; the {who} has layers {first}..{depth}"
                                  + (" (0 = embeddings)" if first == 0 else ""))
    return [(int(s), int(t)) for s, t in spec]


def _weighted_sum(per_position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (per_position.float() * weights.to(per_position.device, torch.float32)).sum()


class HiddenTerm(nn.Module):
    """Distance between mapped hidden states, averaged over the layer pairs.

    ``mse``: mean squared error over the hidden dimension (TinyBERT); ``cosine``: 1 - cosine
    similarity (DistilBERT). When the widths differ (or ``projection: true``) each pair gets a
    learned linear map from the student's width to the teacher's, trained with the student.
    """

    wants = frozenset({HIDDEN})
    features = True  # sums over the task's feature positions itself (distill.objective)

    def __init__(self, name: str, weight: float, *, pairs: list[tuple[int, int]], distance: str, student_width: int, teacher_width: int,
                 projection: bool | None = None, reduce: list | None = None):
        super().__init__()
        self.name, self.weight, self.scale = name, weight, 1.0
        self.pairs, self.distance = pairs, distance
        # reduce: per pair, the (mean, components) a teacher store reduced the teacher's layer with (distill.stored_features),
        # applied to the student's states too: a student as wide as the teacher is compared in the store's coordinates, unprojected.
        self.reduced = reduce is not None
        for i, (mean, components) in enumerate(reduce or []):
            self.register_buffer(f"reduce_mean_{i}", mean.float(), persistent=False)
            self.register_buffer(f"reduce_components_{i}", components.float(), persistent=False)
        compared = reduce[0][1].shape[0] if reduce else student_width
        projected = projection if projection is not None else compared != teacher_width
        if not projected and compared != teacher_width:
            raise ConfigError(f"loss.terms: the {name} term has projection: false but the student's width {student_width} "
                              f"differs from the teacher's {teacher_width}; remove projection: false")
        self.projections = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in pairs) if projected else None

    def forward(self, student, teacher, weights: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        total = 0.0
        for i, (s, t) in enumerate(self.pairs):
            h_s, h_t = student.hidden_states[s], teacher.hidden_states[t]
            if self.reduced:
                h_s = (h_s.float() - getattr(self, f"reduce_mean_{i}").float()) @ getattr(self, f"reduce_components_{i}").float().T
            if self.projections is not None:
                h_s = self.projections[i](h_s.to(self.projections[i].weight.dtype))
            h_s, h_t = h_s.float(), h_t.float()
            if self.distance == "mse":
                per_position = (h_s - h_t).pow(2).mean(-1)
            else:
                per_position = 1.0 - F.cosine_similarity(h_s, h_t, dim=-1, eps=1e-8)
            total = total + _weighted_sum(per_position, weights)
        return total / len(self.pairs)


def _attention_kl(teacher_probs: torch.Tensor, student_probs: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` KL(teacher || student) per query position, averaged over heads.

    Inputs are ``[B, heads, S, S]`` probabilities; keys a distribution gives no mass (masked,
    future) contribute 0, and the student's log is floored so that 0 * log 0 stays 0.
    """
    p, q = teacher_probs.float(), student_probs.float()
    kl = (torch.xlogy(p, p) - p * q.clamp_min(1e-30).log()).sum(-1)
    return kl.mean(1)


def _relations(states: torch.Tensor, heads: int, key_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """``[B, heads, S, S]`` MiniLMv2 self-attention relations: softmax(A A^T / sqrt(d)) of ``states`` split into ``heads``."""
    b, s, width = states.shape
    a = states.float().view(b, s, heads, width // heads).transpose(1, 2)
    scores = a @ a.transpose(-1, -2) / math.sqrt(width // heads)
    allowed = key_mask[:, None, None, :].bool()
    if causal:
        allowed = allowed & torch.ones(s, s, dtype=torch.bool, device=states.device).tril()
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)


class AttentionTerm(nn.Module):
    """Attention transfer over mapped layers, averaged over the layer pairs.

    ``mode: maps`` is the KL between the teacher's and the student's attention distributions
    (TinyBERT, MiniLM); it needs equal head counts. ``mode: relations`` is MiniLMv2's: KL between
    query-query, key-key and value-value self-attention relations, each split into
    ``relation_heads`` heads, which works whatever the head counts and widths. ``auto`` picks maps
    when the head counts agree and relations otherwise.
    """

    features = True

    def __init__(self, name: str, weight: float, *, pairs: list[tuple[int, int]], mode: str, relation_heads: int, causal: bool):
        super().__init__()
        self.name, self.weight, self.scale = name, weight, 1.0
        self.pairs, self.mode, self.relation_heads, self.causal = pairs, mode, relation_heads, causal
        self.wants = frozenset({ATTENTIONS}) if mode == "maps" else frozenset({QKV})

    def forward(self, student, teacher, weights: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for s, t in self.pairs:
            if self.mode == "maps":
                per_position = _attention_kl(teacher.attentions[t - 1], student.attentions[s - 1])
            else:
                per_position = sum(_attention_kl(_relations(teacher.qkv[t][j], self.relation_heads, key_mask, self.causal),
                                                 _relations(student.qkv[s][j], self.relation_heads, key_mask, self.causal))
                                   for j in range(3)) / 3
            total = total + _weighted_sum(per_position, weights)
        return total / len(self.pairs)


# ----------------------------------------------------------------------------- q, k, v of layers

_PROJECTION = re.compile(r"\.(\d+)\.(?:[\w.]*\.)?(q_proj|query|k_proj|key|v_proj|value)$")
_SLOT = {"q_proj": 0, "query": 0, "k_proj": 1, "key": 1, "v_proj": 2, "value": 2}


def qkv_modules(model) -> dict[int, list]:
    """``{layer (1-based): [q, k, v] modules}``: the separate query/key/value projections of each layer."""
    found: dict[int, list] = {}
    for name, module in model.named_modules():
        match = _PROJECTION.search(name)
        if match and isinstance(module, nn.Module):
            found.setdefault(int(match.group(1)) + 1, [None, None, None])[_SLOT[match.group(2)]] = module
    return {layer: slots for layer, slots in found.items() if all(m is not None for m in slots)}


def check_relations(model, layers: set[int], who: str, key: str) -> None:
    """Fails, naming ``key``, when ``model`` has no separate q/k/v projections for ``layers``."""
    found = qkv_modules(model)
    missing = sorted(layers - set(found))
    if missing:
        raise ConfigError(f"{key}: mode relations needs separate query/key/value projections (q_proj/k_proj/v_proj or query/key/value); "
                          f"the {who} ({type(model).__name__}) has none in layer(s) {', '.join(map(str, missing))}; use mode: maps")


@contextmanager
def captured_qkv(model, layers: set[int]):
    """Records the q, k, v projection outputs of ``layers`` during the forwards inside the block.

    Yields ``{layer: [q, k, v]}`` (``[B, S, width]`` each), filled as the model runs.
    """
    captured: dict[int, list] = {layer: [None, None, None] for layer in layers}
    handles = []
    modules = qkv_modules(model)
    for layer in layers:
        for slot, module in enumerate(modules[layer]):
            def hook(_module, _args, output, layer=layer, slot=slot):
                captured[layer][slot] = output
            handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
