"""The teacher's hidden states in a store (``distill cache-teacher --hidden-layers L,.. --hidden-dim R``).

Each chosen layer's states (numbered as in ``output_hidden_states``: 0 the embeddings, 1..L the layers)
are kept at every position of every row, reduced to ``R`` dimensions by a projection fitted on the
teacher: a PCA of the layer's states over a calibration sample (the first training rows, up to
:data:`CALIBRATION_POSITIONS` positions), so the ``R`` stored coordinates are ``(h - mean) @ components.T``.
``R`` equal to the teacher's width keeps the raw states, unprojected. Stored as int8 with a float16
scale per position (``--hidden-dtype int8``, the default: ``R + 2`` bytes a position and layer) or as
float16 (``2 R`` bytes).

The projection is ``features.safetensors`` beside the manifest, and its sha256 is part of the store's
identity. It is fitted in float64 on the CPU from the same rows by every process, and each component's
sign is fixed (its largest entry positive), so every process and world size writes the same bytes.

A shard then also holds ``hidden_offsets`` (``[rows + 1]``: where each row's positions start) and, per
layer, ``hidden.{layer}`` (``[positions, R]``) and, in int8, ``hidden_scale.{layer}`` (``[positions]``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load, save

from distill.errors import ConfigError

FILE = "features.safetensors"
DTYPES = ("int8", "fp16")
CALIBRATION_POSITIONS = 16384  # positions per layer the projection is fitted on


@dataclass
class StoredFeatures:
    """Which of the teacher's hidden states a store holds, and how (its identity's ``features``)."""

    layers: list[int]
    teacher_layers: int  # the teacher's depth (layer pairs are checked against it)
    width: int  # the teacher's hidden size
    dim: int  # R, the coordinates stored per position and layer
    dtype: str = "int8"
    projection: dict = field(default_factory=dict)  # {layer: (mean [width], components [dim, width])} float32; empty when dim == width

    @property
    def reduced(self) -> bool:
        return self.dim < self.width

    def bytes_per_position(self) -> int:
        """Stored bytes of one position, every layer."""
        return len(self.layers) * (self.dim + 2 if self.dtype == "int8" else 2 * self.dim)

    def projection_bytes(self) -> bytes:
        return save({f"{part}.{layer}": tensor.contiguous() for layer, pair in sorted(self.projection.items())
                     for part, tensor in zip(("mean", "components"), pair)})

    def identity(self) -> dict:
        projection = hashlib.sha256(self.projection_bytes()).hexdigest() if self.reduced else None
        return {"layers": list(self.layers), "teacher_layers": self.teacher_layers, "width": self.width, "dim": self.dim, "dtype": self.dtype,
                "projection": projection, "calibration_positions": CALIBRATION_POSITIONS if self.reduced else None}

    @classmethod
    def described(cls, ident: dict, projection: bytes | None) -> "StoredFeatures | None":
        """The features an identity's ``features`` describes, with their projection (``projection``: its bytes); None when those
        bytes are not the ones the identity's sha256 names."""
        stored = cls(layers=[int(layer) for layer in ident["layers"]], teacher_layers=int(ident["teacher_layers"]), width=int(ident["width"]),
                     dim=int(ident["dim"]), dtype=ident["dtype"])
        if stored.reduced:
            if projection is None or hashlib.sha256(projection).hexdigest() != ident["projection"]:
                return None
            tensors = load(projection)
            stored.projection = {layer: (tensors[f"mean.{layer}"], tensors[f"components.{layer}"]) for layer in stored.layers}
        return stored

    @classmethod
    def load(cls, path: Path, ident: dict) -> "StoredFeatures":
        """The features a store at ``path`` records in its identity (``ident``: its ``features``), the projection checked against its sha256."""
        f = Path(path) / FILE
        stored = cls.described(ident, f.read_bytes() if f.is_file() else None)
        if stored is None:
            raise ConfigError(f"teacher.cache: {f} is missing or does not match the sha256 in the store's identity; rebuild the store with distill cache-teacher")
        return stored

    def reduce(self, layer: int, states: torch.Tensor) -> torch.Tensor:
        """``[..., width]`` states of ``layer`` as the ``[..., dim]`` coordinates the store holds (float32, unquantized)."""
        if not self.reduced:
            return states.float()
        mean, components = self.projection[layer]
        return (states.float() - mean.to(states.device)) @ components.to(states.device).T

    def encode(self, hidden_states, lengths: list[int]) -> dict[str, torch.Tensor]:
        """A batch's tensors for a shard: each row's first ``lengths[i]`` positions of every layer (``hidden_states``: the model's)."""
        tensors = {}
        for layer in self.layers:
            states = hidden_states[layer]
            values = self.reduce(layer, torch.cat([states[i, :n] for i, n in enumerate(lengths)]).to("cpu")) if lengths else torch.empty(0, self.dim)
            if self.dtype == "fp16":
                tensors[f"hidden.{layer}"] = values.half()
                continue
            scale = (values.abs().amax(-1) / 127).clamp_min(1e-8).half()  # the scale as stored, so codes and scale agree
            tensors[f"hidden.{layer}"] = (values / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
            tensors[f"hidden_scale.{layer}"] = scale
        return tensors

    def read(self, handle, first: int, last: int) -> dict[int, torch.Tensor]:
        """``{layer: [last - first, dim]}`` float32 coordinates of positions ``[first, last)`` of an open shard (or of a dict of its tensors)."""
        get = handle.__getitem__ if isinstance(handle, dict) else handle.get_slice
        out = {}
        for layer in self.layers:
            values = get(f"hidden.{layer}")[first:last].float()
            if self.dtype == "int8":
                values = values * get(f"hidden_scale.{layer}")[first:last].float()[:, None]
            out[layer] = values
        return out

    def laid_out(self, rows: list[dict], lengths: list[int], shape: tuple[int, int], device) -> dict[int, torch.Tensor]:
        """``{layer: [B, S, dim]}``: each row's positions (``rows``: :meth:`read`'s, in batch order) where a right-padded batch of
        ``shape`` has them, zero at padding. Raises ``ValueError`` when a row holds another number of positions than its length."""
        out = {layer: torch.zeros(*shape, self.dim) for layer in self.layers}
        for i, held in enumerate(rows):
            for layer, values in held.items():
                if len(values) != lengths[i]:
                    raise ValueError(f"hidden states of {len(values)} positions for a row of {lengths[i]}")
                out[layer][i, : len(values)] = values
        return {layer: values.to(device) for layer, values in out.items()}

    def problem(self, tensors: dict, rows: int) -> str | None:
        """What makes a shard's feature tensors (of ``rows`` rows) unreadable; None when nothing."""
        offsets = tensors.get("hidden_offsets")
        if offsets is None:
            return "it lacks the hidden states its store records (hidden_offsets)"
        if offsets.ndim != 1 or len(offsets) != rows + 1 or int(offsets[0]) != 0 or bool((offsets.diff() < 0).any()):
            return "its hidden-state offsets do not match its rows"
        for layer in self.layers:
            values = tensors.get(f"hidden.{layer}")
            if values is None or values.ndim != 2 or values.shape[1] != self.dim or values.shape[0] != int(offsets[-1]):
                return f"its hidden states of layer {layer} are not [{int(offsets[-1])}, {self.dim}]"
            scale = tensors.get(f"hidden_scale.{layer}", values)
            if not bool(torch.isfinite(values.float()).all() and torch.isfinite(scale.float()).all()):
                return f"its hidden states of layer {layer} are not finite"
        return None


def joined_features(features: StoredFeatures, parts: list[dict], lengths: list[int]) -> dict[str, torch.Tensor]:
    """A shard's feature tensors: the batches' (:meth:`StoredFeatures.encode`) in order, and ``hidden_offsets`` of rows of ``lengths`` positions."""
    names = [f"{part}.{layer}" for layer in features.layers for part in ("hidden", *(["hidden_scale"] if features.dtype == "int8" else []))]
    empty = {"hidden": torch.empty(0, features.dim, dtype=torch.int8 if features.dtype == "int8" else torch.float16),
             "hidden_scale": torch.empty(0, dtype=torch.float16)}
    tensors = {name: torch.cat([part[name] for part in parts]) if parts else empty[name.split(".")[0]] for name in names}
    tensors["hidden_offsets"] = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    return tensors


def check_request(layers: list[int], dim: int | None, dtype: str, *, teacher_layers: int, width: int) -> int:
    """The ``--hidden-*`` options checked against the teacher (one-line errors); returns R (the teacher's width when not given)."""
    if dtype not in DTYPES:
        raise ConfigError(f"--hidden-dtype {dtype}: use one of {', '.join(DTYPES)}")
    bad = [layer for layer in layers if not 0 <= layer <= teacher_layers]
    if bad:
        raise ConfigError(f"--hidden-layers: layer {bad[0]} is out of range; the teacher has layers 0..{teacher_layers} (0 = embeddings)")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"--hidden-layers: a layer is listed twice ({','.join(map(str, layers))})")
    dim = width if dim is None else dim
    if not 0 < dim <= width:
        raise ConfigError(f"--hidden-dim {dim} must be between 1 and the teacher's hidden size ({width})")
    return dim


def fit(samples: dict[int, torch.Tensor], dim: int) -> tuple[dict, dict]:
    """``{layer: (mean, components)}`` of ``samples`` (``{layer: [P, width]}``), a PCA to ``dim`` components per layer,
    and ``{layer: share of the variance kept}``. Float64 on the CPU; each component's largest entry is positive."""
    projection, kept = {}, {}
    for layer, states in samples.items():
        x = states.to("cpu", torch.float64)
        mean = x.mean(0)
        centred = x - mean
        values, vectors = torch.linalg.eigh(centred.T @ centred / max(1, len(x) - 1))
        order = values.argsort(descending=True)[:dim]
        components = vectors[:, order].T  # [dim, width]
        signs = components.gather(1, components.abs().argmax(1, keepdim=True)).sign()
        components = components * torch.where(signs == 0, 1.0, signs)
        projection[layer] = (mean.float(), components.float().contiguous())
        kept[layer] = float(values[order].clamp_min(0).sum() / values.clamp_min(0).sum().clamp_min(1e-30))
    return projection, kept
