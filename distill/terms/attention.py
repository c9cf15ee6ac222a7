"""``attention``: attention maps (equal head counts) or MiniLMv2's q/k/v relations (any head counts) of mapped layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from distill.errors import ConfigError
from distill.terms.base import TermKind, TermSpec, check
from distill.terms.hidden import both_models, check_layers


@dataclass
class AttentionSpec(TermSpec):
    layers: Any = "uniform"  # 'uniform' or [[student_layer, teacher_layer], ...]
    mode: str = "auto"  # auto: maps when the head counts agree, else relations
    relation_heads: Optional[int] = None  # None: the teacher's head count


class Attention(TermKind):
    kind = "attention"
    Spec = AttentionSpec
    features = True

    @classmethod
    def check(cls, spec, key):
        check(spec.mode in ("auto", "maps", "relations"), f"{key}.mode: must be auto, maps or relations (got {spec.mode!r})")
        heads = spec.relation_heads
        check(heads is None or (not isinstance(heads, bool) and isinstance(heads, int) and heads > 0),
              f"{key}.relation_heads must be an integer > 0 (got {heads!r})")
        check_layers(spec, key)

    @classmethod
    def build(cls, spec, key, *, student, teacher, causal, stored=None):
        from distill.feature_terms import AttentionTerm, check_relations, layer_pairs, qkv_modules  # torch: the config reads the kinds without it

        s, t = both_models(spec, key, student, teacher)
        pairs = layer_pairs(spec.layers, s["layers"], t["layers"], embeddings=False, key=f"{key}.layers", first=1)
        mode = spec.mode
        if mode == "auto":
            mode = "maps" if s["heads"] == t["heads"] else "relations"
        if mode == "maps" and s["heads"] != t["heads"]:
            raise ConfigError(f"{key}.mode: maps needs equal head counts (student {s['heads']}, teacher {t['heads']}); use mode: relations")
        heads = int(spec.relation_heads or t["heads"])
        if mode == "relations":
            for model, who, layers in ((student, "student", {p[0] for p in pairs}), (teacher, "teacher", {p[1] for p in pairs})):
                check_relations(model, layers, who, f"{key}.mode")
                for layer, modules in qkv_modules(model).items():
                    widths = {m.out_features for m in modules if hasattr(m, "out_features")}
                    if layer in layers and any(w % heads for w in widths):
                        raise ConfigError(f"{key}.relation_heads: {heads} does not divide the {who}'s q/k/v widths {sorted(widths)}; choose a common divisor")
        return AttentionTerm(spec.name, spec.weight, pairs=pairs, mode=mode, relation_heads=heads, causal=causal)
