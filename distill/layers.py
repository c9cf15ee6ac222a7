"""A model's stack of transformer layers, found by name, and cut down to chosen layers in place.

Used by pruning (:mod:`distill.prune`, which ranks layers) and by a student made of teacher layers
(``student.init: teacher_layers`` in :mod:`distill.models`).
"""

from __future__ import annotations

from torch import nn

from distill.errors import ConfigError

LAYER_STACKS = ("layers", "layer", "h", "blocks")  # Llama/Mistral/Qwen, BERT, GPT-2/GPT-J, MPT


def layer_stack(model) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of ``model``'s ModuleList of transformer layers."""
    depth = model.config.num_hidden_layers
    for name, module in model.named_modules():
        parent_name, _, attr = name.rpartition(".")
        if isinstance(module, nn.ModuleList) and len(module) == depth and attr in LAYER_STACKS:
            return model.get_submodule(parent_name) if parent_name else model, attr
    raise ConfigError(f"no stack of {depth} transformer layers (a ModuleList named {', '.join(LAYER_STACKS)}) in {type(model).__name__}")


def keep_layers(model, indices: list[int]) -> None:
    """Keeps only the layers ``indices`` (0-based, in this order) of ``model``, in place, config included."""
    parent, attr = layer_stack(model)
    layers = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(layers[i] for i in indices))
    for new_index, layer in enumerate(getattr(parent, attr)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index  # the KV cache is indexed by position in the stack
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in indices]
    config.num_hidden_layers = len(indices)
