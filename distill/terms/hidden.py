"""``hidden``: hidden states of mapped layers, mse (TinyBERT) or cosine (DistilBERT), projected when the widths differ."""

from __future__ import annotations

from distill.terms.base import TermKind, check


def check_layers(spec: dict, key: str) -> None:
    layers = spec.get("layers", "uniform")
    check(layers == "uniform" or isinstance(layers, list), f"{key}.layers: expected 'uniform' or a list of [student_layer, teacher_layer] pairs (got {layers!r})")


def dims(model) -> dict:
    config = model.config
    return {"layers": config.num_hidden_layers, "width": config.hidden_size, "heads": config.num_attention_heads}


def both_models(spec: dict, key: str, student, teacher) -> tuple[dict, dict]:
    check(student is not None and teacher is not None, f"{key}: a {spec['kind']} term needs both the student and the teacher model")
    return dims(student), dims(teacher)


class Hidden(TermKind):
    kind = "hidden"
    keys = frozenset({"kind", "name", "weight", "layers", "embeddings", "distance", "projection"})
    features = True

    @classmethod
    def check(cls, spec, key, loss):
        check(spec.get("distance", "mse") in ("mse", "cosine"), f"{key}.distance: must be mse or cosine (got {spec.get('distance')!r})")
        for flag in ("embeddings", "projection"):
            check(isinstance(spec.get(flag, False), bool), f"{key}.{flag} must be true or false (got {spec.get(flag)!r})")
        check_layers(spec, key)

    @classmethod
    def build(cls, spec, key, *, loss, student, teacher, causal):
        from distill.feature_terms import HiddenTerm, layer_pairs

        s, t = both_models(spec, key, student, teacher)
        pairs = layer_pairs(spec.get("layers", "uniform"), s["layers"], t["layers"], embeddings=bool(spec.get("embeddings", False)),
                            key=f"{key}.layers", first=0)
        return HiddenTerm(spec["name"], float(spec.get("weight", 1.0)), pairs=pairs, distance=spec.get("distance", "mse"),
                          student_width=s["width"], teacher_width=t["width"], projection=spec.get("projection"))
