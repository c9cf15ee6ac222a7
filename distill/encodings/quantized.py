"""``q8`` and ``q4``: the teacher's exact log-probabilities quantized to 8 or 4 bits, the drawn ids as counts, every
id bit-packed to the vocabulary's width.

Per target (one position), with E exact ids (top-k: k; mixed: k/2; sampled: 0) and D draws (k - E):

- the exact log-probabilities, descending, as ``bits``-bit steps below the target's largest: ``top`` and
  ``step`` (float16 each) per target, ``l_i = top - code_i * step`` (the range cut at 30 nats below the
  top: e^-30 of it), then scaled so that their mass is what the stored rest leaves;
- ``rest`` (float16): the log of the mass outside the exact ids (top-k's tail, the mass mixed targets drew
  from); sampled targets have none (their draws cover everything);
- the drawn ids actually drawn, most drawn first, each with its count (1..D; ``log(count / D)`` plus the
  rest, exactly what :func:`distill.sparse.sample` and :func:`~distill.sparse.mixed` keep), and how many
  there are; ids never drawn (probability 0) are not stored: the reader fills a target's remaining slots
  with the smallest ids it does not hold, at probability 0.

A shard holds ``offsets`` (targets per row, as every encoding), ``blob`` (uint8: one record per row, each
section bit-packed and padded to a whole byte) and ``blob_offsets`` (``[rows + 1]``: where each row's record
starts), so a row is read by one slice.
"""

from __future__ import annotations

import numpy as np
import torch
from distill.encodings.base import Encoding, pack, packed_bytes, unpack, width_of
from distill.sparse import SparseTargets

SPAN = 30.0  # nats below a target's largest log-probability that the steps cover


class Quantized(Encoding):
    bits = precision = 8

    def __init__(self, *, vocab, method, k):
        super().__init__(vocab=vocab, method=method, k=k)
        self.id_bits, self.count_bits, self.drawn_bits = width_of(vocab - 1), width_of(max(self.draws - 1, 0)), width_of(self.draws)
        self.has_rest = method != "sampled"

    # ----- writing ----------------------------------------------------------------------------------------------------------------------

    def tensors(self, targets, counts):
        ids, values, tail = targets.ids.long().numpy(), targets.logprobs.double().numpy(), targets.tail.double().numpy()
        E, D, levels = self.exact, self.draws, (1 << self.bits) - 1
        n = ids.shape[0]
        top = step = codes = None
        if E:
            head = values[:, :E]
            top = head[:, 0].astype(np.float16)
            low = np.maximum(head[:, -1], top.astype(np.float64) - SPAN)
            with np.errstate(invalid="ignore"):
                step = ((top.astype(np.float64) - low) / levels).astype(np.float16)
                scaled = (top.astype(np.float64)[:, None] - np.maximum(head, low[:, None])) / np.where(step > 0, step, 1).astype(np.float64)[:, None]
            codes = np.clip(np.rint(np.nan_to_num(scaled, nan=0.0)), 0, levels).astype(np.int64)
        if self.method == "top_k":
            rest = tail
        elif self.method == "mixed":
            rest = torch.from_numpy(values[:, E:]).logsumexp(1).numpy()  # -inf where nothing was drawn
        else:
            rest = np.zeros(n)
        drawn_ids, drawn_counts, drawn = np.zeros((n, 0), np.int64), np.zeros((n, 0), np.int64), np.zeros(n, np.int64)
        if D:
            with np.errstate(invalid="ignore", over="ignore"):
                share = np.exp(values[:, E:] - rest[:, None])  # count / D, exactly as drawn (up to float rounding)
            frequency = np.where(np.isfinite(rest)[:, None], np.rint(np.nan_to_num(share, nan=0.0) * D), 0).astype(np.int64)
            order = np.argsort(-frequency, axis=1, kind="stable")
            drawn_ids, drawn_counts = np.take_along_axis(ids[:, E:], order, 1), np.take_along_axis(frequency, order, 1)
            drawn = (drawn_counts > 0).sum(1)
        blob, starts, first = [], [0], 0
        for count in counts:
            last = first + count
            blob.append(self._record(slice(first, last), ids, top, step, codes, rest, drawn_ids, drawn_counts, drawn))
            starts.append(starts[-1] + len(blob[-1]))
            first = last
        return {"offsets": torch.tensor([0, *counts], dtype=torch.int64).cumsum(0),
                "blob": torch.frombuffer(bytearray(b"".join(blob)), dtype=torch.uint8) if starts[-1] else torch.zeros(0, dtype=torch.uint8),
                "blob_offsets": torch.tensor(starts, dtype=torch.int64)}

    def _record(self, rows, ids, top, step, codes, rest, drawn_ids, drawn_counts, drawn) -> bytes:
        E, parts = self.exact, []
        if E:
            parts += [top[rows].tobytes(), step[rows].tobytes()]
        if self.has_rest:
            parts.append(rest[rows].astype(np.float16).tobytes())
        kept = np.arange(drawn_ids.shape[1])[None, :] < drawn[rows][:, None]
        if self.draws:
            parts.append(pack(drawn[rows], self.drawn_bits))
        parts.append(pack(np.concatenate([ids[rows, :E].reshape(-1), drawn_ids[rows][kept]]), self.id_bits))  # every exact id, then every drawn one
        if E:
            parts.append(pack(codes[rows], self.bits))
        if self.draws:
            parts.append(pack(drawn_counts[rows][kept] - 1, self.count_bits))
        return b"".join(parts)

    # ----- reading ----------------------------------------------------------------------------------------------------------------------

    def open(self, handle):
        return handle.get_tensor("blob_offsets").tolist()

    def read(self, handle, index, row, first, last):
        record = handle.get_slice("blob")[index[row] : index[row + 1]]
        return self._parse(record.numpy().tobytes(), last - first)

    def join(self, pieces):
        """The rows' parsed records, decoded together: the arithmetic once over all their targets."""
        pieces = [piece for piece in pieces if piece["n"] > 0]
        if not pieces:
            return self._empty()
        return self._decode({name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0] if name != "n"})

    def decode(self, tensors):
        missing = [field for field in ("offsets", "blob", "blob_offsets") if field not in tensors]
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
        offsets, starts, blob = tensors["offsets"].tolist(), tensors["blob_offsets"].tolist(), tensors["blob"].numpy().tobytes()
        if len(starts) != len(offsets) or starts[0] != 0 or starts[-1] != len(blob) or any(b < a for a, b in zip(starts, starts[1:])):
            raise ValueError("its row records do not cover its bytes in order")
        return self.join([self._parse(blob[a:b], max(last - first, 0)) for a, b, first, last in zip(starts, starts[1:], offsets, offsets[1:])])

    def _empty(self) -> SparseTargets:
        return SparseTargets(torch.zeros(0, self.k, dtype=torch.int32), torch.zeros(0, self.k), torch.zeros(0))

    def _parse(self, record: bytes, n: int) -> dict:
        """One row's record as arrays over its ``n`` targets (numpy: a row is small, and a torch call on it costs more than its arithmetic)."""
        if n == 0:
            if record:
                raise ValueError("a row without targets has a record")
            return {"n": 0}
        E, D, at = self.exact, self.draws, 0

        def take(size: int) -> bytes:
            nonlocal at
            if at + size > len(record):
                raise ValueError("a row's record is shorter than its targets need")
            at += size
            return record[at - size : at]

        piece = {"n": n}
        if E:
            piece["top"] = np.frombuffer(take(2 * n), dtype=np.float16).astype(np.float32)
            piece["step"] = np.frombuffer(take(2 * n), dtype=np.float16).astype(np.float32)
        piece["rest"] = np.frombuffer(take(2 * n), dtype=np.float16).astype(np.float32) if self.has_rest else np.zeros(n, np.float32)
        drawn = unpack(take(packed_bytes(n, self.drawn_bits)), n, self.drawn_bits) if D else np.zeros(n, np.int64)
        if (drawn > D).any():
            raise ValueError(f"a target holds more than its {D} draws")
        total = n * E + int(drawn.sum())
        every_id = unpack(take(packed_bytes(total, self.id_bits)), total, self.id_bits)
        piece.update(drawn=drawn, exact_ids=every_id[: n * E], drawn_ids=every_id[n * E :])
        if E:
            piece["codes"] = unpack(take(packed_bytes(n * E, self.bits)), n * E, self.bits)
        if D:
            piece["frequency"] = unpack(take(packed_bytes(total - n * E, self.count_bits)), total - n * E, self.count_bits) + 1
        if at != len(record):
            raise ValueError("a row's record is longer than its targets need")
        return piece

    def _decode(self, parts: dict) -> SparseTargets:
        """Targets ``[N, k]`` from the parsed records of one or more rows (their arrays concatenated)."""
        E, D = self.exact, self.draws
        rest, drawn = parts["rest"], parts["drawn"]
        n = len(rest)
        ids = np.full((n, self.k), -1, dtype=np.int64)
        values = np.full((n, self.k), -np.inf, dtype=np.float32)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if E:
                ids[:, :E] = parts["exact_ids"].reshape(n, E)
                head = parts["top"][:, None] - parts["codes"].reshape(n, E).astype(np.float32) * parts["step"][:, None]
                # The stored rest fixes the exact ids' mass; the steps' rounding would move it.
                mass = np.log(-np.expm1(rest.astype(np.float64))) if self.has_rest else np.zeros(n)
                peak = head.max(1)
                shift = mass - (peak + np.log(np.exp(head - peak[:, None]).sum(1)))
                values[:, :E] = head + np.where(np.isfinite(shift), shift, 0.0)[:, None]
            if D:
                target = np.repeat(np.arange(n), drawn)
                column = E + np.arange(len(target)) - np.repeat(np.cumsum(drawn) - drawn, drawn)
                ids[target, column] = parts["drawn_ids"]
                values[target, column] = np.log(parts["frequency"] / D) + rest[target]
                ids = self._fill(ids)
        tail = rest if self.method == "top_k" else np.full(n, -np.inf, dtype=np.float32)
        return SparseTargets(torch.from_numpy(ids.astype(np.int32)), torch.from_numpy(values), torch.from_numpy(tail.astype(np.float32)))

    def _fill(self, ids: np.ndarray) -> np.ndarray:
        """Each target's empty slots (-1) given the smallest ids it does not hold, in order (probability 0)."""
        empty = ids < 0
        if not empty.any():
            return ids
        size = min(self.vocab, 2 * self.k)  # the ids 0..size-1 hold at least k the target does not
        used = np.zeros((len(ids), size + 1), dtype=np.int8)
        used[np.arange(len(ids))[:, None], np.where((ids >= 0) & (ids < size), ids, size)] = 1
        free = np.argsort(used[:, :size], axis=1, kind="stable")  # unused ids first, smallest first
        rank = np.maximum(np.cumsum(empty, 1) - 1, 0)
        return np.where(empty, np.take_along_axis(free, rank, 1), ids)


class Q8(Quantized):
    kind, bits, precision = "q8", 8, 8


class Q4(Quantized):
    kind, bits, precision = "q4", 4, 4

