"""``attention``: attention maps (equal head counts) or MiniLMv2's q/k/v relations (any head counts) of mapped layers."""

from __future__ import annotations

from distill.errors import ConfigError
from distill.terms.base import TermKind, check
from distill.terms.hidden import both_models, check_layers


class Attention(TermKind):
    kind = "attention"
    keys = frozenset({"kind", "name", "weight", "layers", "mode", "relation_heads"})
    features = True

    @classmethod
    def check(cls, spec, key, loss):
        check(spec.get("mode", "auto") in ("auto", "maps", "relations"), f"{key}.mode: must be auto, maps or relations (got {spec.get('mode')!r})")
        heads = spec.get("relation_heads", 1)
        check(not isinstance(heads, bool) and isinstance(heads, int) and heads > 0, f"{key}.relation_heads must be an integer > 0 (got {heads!r})")
        check_layers(spec, key)

    @classmethod
    def build(cls, spec, key, *, loss, student, teacher, causal):
        from distill.feature_terms import AttentionTerm, check_relations, layer_pairs, qkv_modules

        s, t = both_models(spec, key, student, teacher)
        pairs = layer_pairs(spec.get("layers", "uniform"), s["layers"], t["layers"], embeddings=False, key=f"{key}.layers", first=1)
        mode = spec.get("mode", "auto")
        if mode == "auto":
            mode = "maps" if s["heads"] == t["heads"] else "relations"
        if mode == "maps" and s["heads"] != t["heads"]:
            raise ConfigError(f"{key}.mode: maps needs equal head counts (student {s['heads']}, teacher {t['heads']}); use mode: relations")
        heads = int(spec.get("relation_heads", t["heads"]))
        if mode == "relations":
            for model, who, layers in ((student, "student", {p[0] for p in pairs}), (teacher, "teacher", {p[1] for p in pairs})):
                check_relations(model, layers, who, f"{key}.mode")
                for layer, modules in qkv_modules(model).items():
                    widths = {m.out_features for m in modules if hasattr(m, "out_features")}
                    if layer in layers and any(w % heads for w in widths):
                        raise ConfigError(f"{key}.relation_heads: {heads} does not divide the {who}'s q/k/v widths {sorted(widths)}; choose a common divisor")
        return AttentionTerm(spec["name"], float(spec.get("weight", 1.0)), pairs=pairs, mode=mode, relation_heads=heads, causal=causal)
