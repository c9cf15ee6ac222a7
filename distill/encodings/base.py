"""What every store encoding declares and does: a shard's targets to bytes and back, row by row.

An encoding is built for one store's targets (``vocab``, ``method``, ``k``: :mod:`distill.sparse`), so
it knows, per target, how many of the ``k`` ids are the teacher's exact log-probabilities (all of
top-k's, the head of mixed targets) and how many ids were drawn (sampled targets, the rest of mixed).
Every encoding shares the shard's ``offsets`` (``[rows + 1]``: where each row's targets start) and
reads back :class:`~distill.sparse.SparseTargets` of ``[N, k]``, whatever it stores.
"""

from __future__ import annotations

import numpy as np
from safetensors.torch import save

from distill.sparse import SparseTargets


class Encoding:
    """One way of writing a store's targets (``cache-teacher --encoding``)."""

    kind = ""
    precision = 0  # bits of an exact log-probability: of two stores of the same targets, a job takes the finer

    def __init__(self, *, vocab: int, method: str, k: int):
        self.vocab, self.method, self.k = vocab, method, k
        self.exact = {"top_k": k, "mixed": k // 2, "sampled": 0}[method]  # ids per target with the teacher's own log-probability
        self.draws = k - self.exact  # ids drawn per target (their frequencies are what is stored)

    def tensors(self, targets: SparseTargets, counts: list[int]) -> dict:
        """The targets of a shard's rows (``counts`` targets each, in order) as the shard's tensors."""
        raise NotImplementedError

    def encode(self, targets: SparseTargets, counts: list[int]) -> bytes:
        """:meth:`tensors` as the shard's bytes."""
        return save(self.tensors(targets, counts))

    def open(self, handle) -> object:
        """What reading rows of an open shard needs beyond its ``offsets``, read once per shard."""
        return None

    def read(self, handle, index: object, row: int, first: int, last: int) -> object:
        """What the shard holds of its ``row`` (targets ``[first, last)``; ``index``: :meth:`open`'s), for :meth:`join`."""
        raise NotImplementedError

    def join(self, pieces: list) -> SparseTargets:
        """The targets of rows :meth:`read` read (of any shards), in order."""
        return SparseTargets.cat(pieces)

    def decode(self, tensors: dict) -> SparseTargets:
        """Every target of a shard loaded whole (``tensors``: its safetensors), for the check before reading; raises
        ``ValueError`` naming what is malformed."""
        raise NotImplementedError


def pack(values: np.ndarray, width: int) -> bytes:
    """Non-negative integers below ``2**width`` as ``width`` bits each, little-endian, padded to a whole byte."""
    values = np.asarray(values, dtype=np.uint32).reshape(-1)
    bits = ((values[:, None] >> np.arange(width, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def unpack(data: bytes | np.ndarray, count: int, width: int) -> np.ndarray:
    """The ``count`` integers of ``width`` bits :func:`pack` wrote (int64)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if width in (8, 16):  # whole bytes, little-endian: read as they are
        return raw[: count * width // 8].view(np.uint8 if width == 8 else "<u2").astype(np.int64)
    bits = np.unpackbits(raw, count=count * width, bitorder="little").reshape(count, width)
    return (bits.astype(np.float64) @ (2.0 ** np.arange(width))).astype(np.int64)  # exact below 2**53


def packed_bytes(count: int, width: int) -> int:
    return -(-count * width // 8)


def width_of(largest: int) -> int:
    """Bits that hold every integer in ``[0, largest]``."""
    return max(1, int(largest).bit_length())
