"""``hidden``: hidden states of mapped layers, mse (TinyBERT) or cosine (DistilBERT), projected when the widths differ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from distill.terms.base import TermKind, TermSpec, check


def check_layers(spec, key: str) -> None:
    check(spec.layers == "uniform" or isinstance(spec.layers, list),
          f"{key}.layers: expected 'uniform' or a list of [student_layer, teacher_layer] pairs (got {spec.layers!r})")


def dims(model) -> dict:
    config = model.config
    return {"layers": config.num_hidden_layers, "width": config.hidden_size, "heads": config.num_attention_heads}


def both_models(spec, key: str, student, teacher) -> tuple[dict, dict]:
    check(student is not None and teacher is not None, f"{key}: a {spec.kind} term needs both the student and the teacher model")
    return dims(student), dims(teacher)


@dataclass
class HiddenSpec(TermSpec):
    layers: Any = "uniform"  # 'uniform' or [[student_layer, teacher_layer], ...]
    embeddings: bool = False
    distance: str = "mse"
    projection: Optional[bool] = None  # None: a projection exactly when the widths differ


class Hidden(TermKind):
    kind = "hidden"
    Spec = HiddenSpec
    features = True
    stored = True

    @classmethod
    def check(cls, spec, key):
        check(spec.distance in ("mse", "cosine"), f"{key}.distance: must be mse or cosine (got {spec.distance!r})")
        for flag in ("embeddings", "projection"):
            value = getattr(spec, flag)
            check(isinstance(value, bool) or (flag == "projection" and value is None), f"{key}.{flag} must be true or false (got {value!r})")
        check_layers(spec, key)

    @classmethod
    def build(cls, spec, key, *, student, teacher, causal, stored=None):
        from distill.feature_terms import HiddenTerm, layer_pairs  # torch: the config reads the kinds without it

        if teacher is None and stored is not None:
            return cls.build_stored(spec, key, student=student, stored=stored)
        check(teacher is not None or student is None,
              f"{key}: a hidden term needs the teacher's hidden states, and its store or pool gives none; build the store with "
              "distill cache-teacher --hidden-layers L,.., or start the pool with distill serve-teacher --hidden-layers L,..")
        s, t = both_models(spec, key, student, teacher)
        pairs = layer_pairs(spec.layers, s["layers"], t["layers"], embeddings=spec.embeddings, key=f"{key}.layers", first=0)
        return HiddenTerm(spec.name, spec.weight, pairs=pairs, distance=spec.distance, student_width=s["width"], teacher_width=t["width"],
                          projection=spec.projection)

    @classmethod
    def build_stored(cls, spec, key, *, student, stored):
        """The term compared with a store's hidden states: its teacher layers must be stored ones; a student as wide as the teacher
        is reduced by the store's own projection (unless ``projection: true``), a narrower or wider one projected into its R dimensions."""
        from distill.feature_terms import HiddenTerm, layer_pairs  # torch: the config reads the kinds without it

        check(student is not None, f"{key}: a {spec.kind} term needs the student model")
        s = dims(student)
        pairs = layer_pairs(spec.layers, s["layers"], stored.teacher_layers, embeddings=spec.embeddings, key=f"{key}.layers", first=0)
        missing = sorted({t for _, t in pairs} - set(stored.layers))
        check(not missing, f"{key}.layers: teacher layer {missing[0] if missing else ''} is not in the store, which holds the hidden states of layer(s) "
                           f"{', '.join(map(str, stored.layers))}; list [student, teacher] pairs of those, or rebuild the store with that layer in --hidden-layers")
        reduce = None
        if stored.reduced and s["width"] == stored.width and spec.projection is not True:
            reduce = [stored.projection[t] for _, t in pairs]
        return HiddenTerm(spec.name, spec.weight, pairs=pairs, distance=spec.distance, student_width=s["width"], teacher_width=stored.dim,
                          projection=spec.projection if reduce is None else False, reduce=reduce)
