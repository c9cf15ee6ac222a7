"""Structured pruning of Llama-family models that really shrinks them (Minitron-style).

Importance is measured on calibration batches from activations (Muralidharan et al. 2024):

- layers (depth): block importance 1 - cos(hidden in, hidden out), averaged over tokens;
- attention heads: mean L2 norm of each head's output (the input of ``o_proj``); with grouped
  query attention whole key/value groups are kept or removed;
- MLP neurons: mean |activation| at the input of ``down_proj``;
- hidden channels: mean |output| of every RMSNorm, summed over layers.

The least important units are removed and a smaller model is built whose config matches its new
shapes, so ``save_pretrained`` / ``from_pretrained`` round-trip it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distill import data
from distill.config import ConfigError, DataConfig

# The layer stack and its surgery are shared with the student built from teacher layers (distill.models).
from distill.layers import LAYER_STACKS, keep_layers, layer_stack  # noqa: F401
from distill.models import load_tokenizer, resolve
from distill.progress import phase


@dataclass
class PruneTarget:
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    hidden_size: int | None = None


def _decoder(model):
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        raise ConfigError(f"pruning supports Llama-style decoder models (model.model.layers, lm_head); got {type(model).__name__}")
    return inner


def check_target(config, target: PruneTarget) -> None:
    """Fails before any work on targets the model cannot take."""
    checks = [("num_hidden_layers", config.num_hidden_layers), ("num_attention_heads", config.num_attention_heads),
              ("intermediate_size", config.intermediate_size), ("hidden_size", config.hidden_size)]
    for name, current in checks:
        value = getattr(target, name)
        if value is None:
            continue
        if value < 1:
            raise ConfigError(f"prune {name}={value}: must keep at least 1")
        if value > current:
            raise ConfigError(f"prune {name}={value}: the model has only {current}")
    if target.num_attention_heads is not None:
        group = config.num_attention_heads // config.num_key_value_heads
        if target.num_attention_heads % group:
            raise ConfigError(f"prune num_attention_heads={target.num_attention_heads}: must be a multiple of the query group size {group} "
                              f"(num_attention_heads {config.num_attention_heads} / num_key_value_heads {config.num_key_value_heads})")
        hidden = target.hidden_size or config.hidden_size
        if hidden % target.num_attention_heads:
            # transformers validates that the hidden size divides evenly among the heads.
            choices = [n for n in range(group, config.num_attention_heads + 1, group) if hidden % n == 0]
            raise ConfigError(f"prune num_attention_heads={target.num_attention_heads}: hidden_size {hidden} is not a multiple of it, which "
                              f"transformers requires; choose one of {', '.join(map(str, choices))}")


@torch.inference_mode()
def importance(model, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Activation-based importance of layers, heads, neurons and hidden channels.

    Returns:
        ``layers`` [L], ``heads`` [L, H], ``neurons`` [L, I], ``channels`` [D]; larger is more important.
    """
    decoder, config = _decoder(model), model.config
    heads, head_dim = config.num_attention_heads, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = list(decoder.layers)
    scores = {"layers": torch.zeros(len(layers)), "heads": torch.zeros(len(layers), heads),
              "neurons": torch.zeros(len(layers), config.intermediate_size), "channels": torch.zeros(config.hidden_size)}
    tokens = [0]
    handles = []

    def on_layer(i):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            scores["layers"][i] += (1 - cos).sum().cpu()
        return hook

    def on_o_proj(i):
        def hook(module, args):
            x = args[0].float()
            scores["heads"][i] += x.reshape(*x.shape[:-1], heads, head_dim).norm(dim=-1).sum(dim=(0, 1)).cpu()
        return hook

    def on_down_proj(i):
        def hook(module, args):
            scores["neurons"][i] += args[0].float().abs().sum(dim=(0, 1)).cpu()
        return hook

    def on_norm(module, args, output):
        scores["channels"] += output.float().abs().sum(dim=(0, 1)).cpu()

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down_proj(i)))
        handles.append(layer.input_layernorm.register_forward_hook(on_norm))
        handles.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
    try:
        device = next(model.parameters()).device
        for batch in batches:
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            tokens[0] += batch["input_ids"].numel()
    finally:
        for handle in handles:
            handle.remove()
    return {name: value / max(tokens[0], 1) for name, value in scores.items()}


def _keep(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores, in their original order."""
    return scores.topk(count).indices.sort().values


def _linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = old.weight.data
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = None if old.bias is None else (old.bias.data[rows] if rows is not None else old.bias.data)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def prune(model, scores: dict[str, torch.Tensor], target: PruneTarget):
    """A new, smaller model keeping the most important units; ``model`` is not modified."""
    check_target(model.config, target)
    model = copy.deepcopy(model)
    decoder, config = _decoder(model), model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.head_dim = head_dim  # explicit, so a new hidden_size does not change it
    kept_layers = list(range(config.num_hidden_layers))
    if target.num_hidden_layers is not None:
        kept_layers = _keep(scores["layers"], target.num_hidden_layers).tolist()
    group = config.num_attention_heads // config.num_key_value_heads
    for i in kept_layers:
        layer = decoder.layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        if target.num_attention_heads is not None:
            group_scores = scores["heads"][i].reshape(-1, group).sum(-1)
            groups = _keep(group_scores, target.num_attention_heads // group)
            kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
            q_heads = (groups[:, None] * group + torch.arange(group)).reshape(-1)
            q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
            attn.q_proj, attn.k_proj, attn.v_proj = _linear(attn.q_proj, rows=q_rows), _linear(attn.k_proj, rows=kv_rows), _linear(attn.v_proj, rows=kv_rows)
            attn.o_proj = _linear(attn.o_proj, cols=q_rows)
        if target.intermediate_size is not None:
            neurons = _keep(scores["neurons"][i], target.intermediate_size)
            mlp.gate_proj, mlp.up_proj = _linear(mlp.gate_proj, rows=neurons), _linear(mlp.up_proj, rows=neurons)
            mlp.down_proj = _linear(mlp.down_proj, cols=neurons)
    keep_layers(model, kept_layers)
    if target.num_attention_heads is not None:
        config.num_attention_heads = target.num_attention_heads
        config.num_key_value_heads = target.num_attention_heads // group
    if target.intermediate_size is not None:
        config.intermediate_size = target.intermediate_size
    if target.hidden_size is not None:
        _prune_channels(model, _keep(scores["channels"], target.hidden_size))
        config.hidden_size = target.hidden_size
    return model


def _prune_channels(model, channels: torch.Tensor) -> None:
    decoder = _decoder(model)
    embed = decoder.embed_tokens
    new_embed = nn.Embedding(embed.num_embeddings, len(channels), padding_idx=embed.padding_idx, dtype=embed.weight.dtype)
    new_embed.weight.data.copy_(embed.weight.data[:, channels])
    decoder.embed_tokens = new_embed
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj, attn.k_proj, attn.v_proj = (_linear(p, cols=channels) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        attn.o_proj = _linear(attn.o_proj, rows=channels)
        mlp.gate_proj, mlp.up_proj = _linear(mlp.gate_proj, cols=channels), _linear(mlp.up_proj, cols=channels)
        mlp.down_proj = _linear(mlp.down_proj, rows=channels)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = nn.Parameter(norm.weight.data[channels].clone())
    decoder.norm.weight = nn.Parameter(decoder.norm.weight.data[channels].clone())
    if model.config.tie_word_embeddings:
        model.lm_head.weight = decoder.embed_tokens.weight
    else:
        model.lm_head = _linear(model.lm_head, cols=channels)


@torch.no_grad()
def magnitude_prune(model, sparsity: float, *, scope: str = "global") -> dict:
    """Zeroes the smallest-magnitude weights of every Linear in the decoder layers.

    This reduces non-zeros, not dense latency or size: the tensors keep their shapes.

    Returns:
        ``{"sparsity": achieved fraction of zeros over the pruned weights, "pruned_weights": n}``.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1) (got {sparsity})")
    weights = [m.weight for layer in _decoder(model).layers for m in layer.modules() if isinstance(m, nn.Linear)]
    if scope == "global":
        magnitudes = torch.cat([w.abs().flatten().float() for w in weights])
        k = int(sparsity * magnitudes.numel())
        threshold = magnitudes.kthvalue(k).values if k > 0 else magnitudes.new_tensor(-1.0)
        for w in weights:
            w.mul_(w.abs() > threshold)
    elif scope == "per_layer":
        for w in weights:
            k = int(sparsity * w.numel())
            if k > 0:
                w.mul_(w.abs() > w.abs().flatten().float().kthvalue(k).values)
    else:
        raise ConfigError(f"scope must be global or per_layer (got {scope!r})")
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    return {"sparsity": zeros / total, "pruned_weights": total}


def prune_directory(model_path: str, output: str, target: PruneTarget, calibration_files: list[str], *, seq_len: int = 128,
                    batches: int = 8, batch_size: int = 4, sparsity: float | None = None, sparsity_scope: str = "global") -> dict:
    """``distill prune``: loads a model, ranks its units on calibration text, saves the pruned model.

    With ``sparsity``, magnitude pruning follows the structured pruning (if any).
    """

    from transformers import AutoModelForCausalLM  # start-up time: transformers loads only when this runs

    tokenizer = load_tokenizer(model_path, "model")
    model = AutoModelForCausalLM.from_pretrained(resolve(model_path, "model"), dtype=torch.float32)
    check_target(model.config, target)
    structured = any(v is not None for v in vars(target).values())
    if not structured and sparsity is None:
        raise ConfigError("nothing to prune: give --layers, --heads, --intermediate, --hidden and/or --sparsity")
    if structured and not calibration_files:
        raise ConfigError("structured pruning ranks units on data: give --calibration FILES")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"--sparsity must be in [0, 1) (got {sparsity})")
    pruned = model
    if structured:
        calibration = calibration_batches(calibration_files, tokenizer, seq_len=seq_len, batches=batches, batch_size=batch_size)

        with phase(f"ranking {len(calibration)} calibration batches and pruning"):
            pruned = prune(model, importance(model, calibration), target)
    result = {"params_before": model.num_parameters(), "params_after": pruned.num_parameters()}
    if sparsity is not None:
        result.update(magnitude_prune(pruned, sparsity, scope=sparsity_scope))
    Path(output).mkdir(parents=True, exist_ok=True)
    pruned.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    return result


def calibration_batches(files: list[str], tokenizer, *, seq_len: int, batches: int, batch_size: int) -> list[dict]:
    """The first ``batches * batch_size`` packed sequences of ``files``, in order."""

    cfg = DataConfig(train_files=list(files), seq_len=seq_len, validation_split=0.0)
    raw = data._load_files(cfg.train_files, "calibration data", cfg.text_unit)
    sequences = data.tokenize(raw, tokenizer, cfg, "calibration")
    return data.validation_batches(sequences, batch_size=batch_size, limit=batches * batch_size, pad_id=tokenizer.pad_token_id)
