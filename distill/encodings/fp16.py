"""``fp16``: the store's first layout, the default. ``ids`` ``[T, k]`` (int16 when the vocabulary fits, else
int32), ``logprobs`` ``[T, k]`` float16, ``tail`` ``[T]`` float32: 4k + 4 bytes a target at V <= 32,767. The pool
answers in the same bytes (:func:`distill.sparse.encode`)."""

from __future__ import annotations

from distill.encodings.base import Encoding
from distill.sparse import SparseTargets, shard_tensors

FIELDS = ("ids", "logprobs", "tail")


class Fp16(Encoding):
    kind = "fp16"
    precision = 16

    def tensors(self, targets, counts):
        return shard_tensors(targets, counts, self.vocab)

    def read(self, handle, index, row, first, last):
        return SparseTargets(*(handle.get_slice(field)[first:last] for field in FIELDS))

    def decode(self, tensors):
        missing = [field for field in FIELDS if field not in tensors]
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
        return SparseTargets(*(tensors[field] for field in FIELDS))
