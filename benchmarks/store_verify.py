"""What checking a teacher store costs the reader: each shard's sha256 against the manifest and its
values (ids inside the vocabulary, no NaN, log-probabilities at most 0), once per shard and process.

Synthetic shards in the store's real format (``distill.sparse.encode``: top-k ids, float16
log-probabilities, tail, offsets) of 256 rows x 128 targets, at k=64, for a small vocabulary (int16
ids) and a 128k one (int32 ids). Each row is set against the targets a training step reads: the
tiny default's store step reads 2,048 targets (16 x 128) in about 50 ms (README, step time), so
the check's cost per step is its time per target times 2,048.

    python benchmarks/store_verify.py [--repeats 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

STEP_TARGETS, STEP_MS = 2048, 50.0  # the tiny default's store step (README: step time)


def shard(vocab: int, k: int = 64, rows: int = 256, targets_per_row: int = 128) -> tuple[bytes, int]:
    import torch

    from distill.sparse import encode, top_k

    torch.manual_seed(0)
    logits = torch.randn(rows * targets_per_row, vocab) * 3 if vocab <= 32768 else None
    if logits is None:  # a 128k vocabulary: build the top-k directly instead of a [32768, 128256] logits tensor
        ids = torch.randint(0, vocab, (rows * targets_per_row, k))
        values = torch.log_softmax(torch.randn(rows * targets_per_row, k + 1), -1)
        from distill.sparse import SparseTargets

        targets = SparseTargets(ids, values[:, :k].sort(-1, descending=True).values, values[:, k])
    else:
        targets = top_k(logits, k)
    return encode(targets, [targets_per_row] * rows, vocab), rows * targets_per_row


def measure(vocab: int, repeats: int) -> dict:
    from distill import store as stores

    data, count = shard(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard-00000000.safetensors"
        path.write_bytes(data)
        digest = stores._sha256_file(path)
        reader = stores.Store.__new__(stores.Store)  # only the check, not a whole store directory
        reader.k, reader.vocab = 64, vocab
        hash_s, check_s = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            stores._sha256_file(path)
            hash_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            reader._check_shard(path, digest)
            check_s.append(time.perf_counter() - start)
    hashing, whole = min(hash_s), min(check_s)
    per_target_us = whole / count * 1e6
    return {"vocab": vocab, "shard_mb": len(data) / 2**20, "targets": count, "bytes_per_target": len(data) / count,
            "sha256_ms": hashing * 1e3, "sha256_mb_per_s": len(data) / 2**20 / hashing, "check_ms": whole * 1e3,
            "per_target_us": per_target_us, "per_step_ms": per_target_us * STEP_TARGETS / 1e3,
            "share_of_step": per_target_us * STEP_TARGETS / 1e3 / STEP_MS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results")))
    args = parser.parse_args()
    rows = [measure(vocab, args.repeats) for vocab in (1024, 128256)]
    print("| vocab | shard MB | bytes/target | sha256 alone ms | sha256 MB/s | whole check ms | us/target | ms per 2,048-target step | share of a 50 ms step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['vocab']:,} | {r['shard_mb']:.1f} | {r['bytes_per_target']:.0f} | {r['sha256_ms']:.1f} | {r['sha256_mb_per_s']:,.0f} | "
              f"{r['check_ms']:.1f} | {r['per_target_us']:.3f} | {r['per_step_ms']:.2f} | {r['share_of_step']:.1%} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "store_verify.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {out / 'store_verify.json'}")


if __name__ == "__main__":
    main()
