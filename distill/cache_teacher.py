"""``distill cache-teacher``: the teacher runs over the job's training and validation sequences and writes
its sparse targets into a store (:mod:`distill.store`), shard by shard; many processes share the work.

Apart from the store's format and reading because building loads the teacher (:mod:`distill.setup`) and
runs it as a teacher source (:mod:`distill.teacher_source`), which itself reads stores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import torch

from distill import data
from distill.config import LOGITS, load_config
from distill.encodings.registry import DEFAULT as DEFAULT_ENCODING
from distill.encodings.registry import ENCODINGS
from distill.errors import ConfigError, main_guard
from distill.fused import HEAD_INPUTS, chunk_rows, teacher_chunks
from distill.losses import IGNORE_INDEX
from distill.setup import Setup, tune_cpu_allocator
from distill.sparse import METHODS, PICK, SparseTargets
from distill.store import _claim, _finish, _shard_name, cache_root, identity, key_of, shard_count, write_shard
from distill.teacher_source import ModelSource

DEFAULT_K = 64  # targets per token when --top-k is not given (a classifier with fewer classes keeps them all)


def _targets_of_rows(source, task, rows: list[dict], pad_id: int, vocab: int, k: int, device, method: str = "top_k", generator=None
                     ) -> tuple[SparseTargets, list[int]]:
    return batch_targets(source, task, {key: value.to(device) for key, value in data.collate(rows, pad_id).items()}, vocab, k, method, generator)


def batch_targets(source, task, batch: dict, vocab: int, k: int, method: str = "top_k", generator: torch.Generator | None = None
                  ) -> tuple[SparseTargets, list[int]]:
    """The targets (``method``: ``top_k``, or ``sampled`` or ``mixed``, drawn with ``generator``) of a
    collated batch's unmasked targets, row by row (on the CPU), and each row's count.

    ``source`` is the in-process teacher (``ModelSource``); its logits are taken chunk by chunk
    from the output layer's inputs, so no ``[tokens, vocab]`` tensor of the whole batch exists.
    """
    labels = task.targets(batch)
    counts = (labels != IGNORE_INDEX).reshape(len(labels), -1).sum(-1).tolist()  # a classifier's row is one target
    outputs = source.signal(batch, frozenset({HEAD_INPUTS if task.fused_head else LOGITS}))
    chunk = teacher_chunks(outputs, labels, vocab)
    total = sum(counts)
    rows = chunk_rows(vocab)
    parts = [PICK[method](chunk(start, min(start + rows, total)), k, generator) for start in range(0, total, rows)]
    if not parts:
        return SparseTargets.empty(k), counts
    return SparseTargets.cat(parts).to("cpu"), counts


def build(cfg, *, k: int | None = None, out: Path | None = None, shard_rows: int = 256, rank: int = 0, world_size: int = 1, device=None, log=print,
          method: str = "top_k", encoding: str = DEFAULT_ENCODING) -> Path:
    """Runs the teacher over the job's training and validation sequences and writes (or completes) the store.

    Returns its directory. Process ``rank`` of ``world_size`` writes the shards ``i`` with
    ``i % world_size == rank``; rank 0 writes the manifest once every shard exists. With
    ``method="sampled"`` or ``"mixed"`` each shard draws from its own generator, seeded by the store's key (its
    encoding left out) and the shard, so any process, world size, resumed build or encoding draws the same ids.
    ``encoding``: how the shards hold the targets (:mod:`distill.encodings`).
    """
    if method not in METHODS:  # before any model is loaded
        raise ConfigError(f"--targets {method}: use one of {', '.join(METHODS)}")
    if encoding not in ENCODINGS:
        raise ConfigError(f"--encoding {encoding}: use one of {', '.join(ENCODINGS)}")
    device = device or torch.device("cpu")
    tune_cpu_allocator(cfg.train.cpu_allocator, device)
    setup = Setup(cfg, device, load_teacher=True, load_student=False)
    vocab = setup.task.width(setup.teacher, setup.tokenizer)
    k = k or min(DEFAULT_K, vocab)
    if not 0 < k <= vocab:
        what = "number of classes" if setup.task.row_labels else "vocabulary size"
        raise ConfigError(f"--top-k {k} must be between 1 and the {what} ({vocab})")
    ident = identity(cfg, setup.tokenizer, setup.sources, k=k, vocab=vocab, method=method, encoding=encoding)
    writer = ENCODINGS[encoding](vocab=vocab, method=method, k=k)
    key = key_of(ident)
    # The draws depend on the targets, not on how they are written: one encoding's sampled store holds another's ids and counts
    # (and an fp16 store draws what it drew before encodings were recorded).
    draws_key = key_of({**ident, "targets": {name: value for name, value in ident["targets"].items() if name != "encoding"}})
    path = Path(os.path.expanduser(str(out or cfg.teacher.cache or cache_root() / key[:16])))
    _claim(path, ident, rank)
    source = ModelSource(setup.teacher, setup.task, vocab)
    pad_id = setup.tokenizer.pad_token_id
    batch = cfg.train.micro_batch_size
    plan = [(split, name, sequences) for name, _, train, validation in setup.sources for split, sequences in (("training", train), ("validation", validation))]
    for split, name, sequences in plan:
        folder = path / split / name
        folder.mkdir(parents=True, exist_ok=True)
        count = shard_count(len(sequences), shard_rows)
        start_time, done = time.perf_counter(), 0
        for index in range(rank, count, world_size):
            target = folder / _shard_name(index)
            if target.exists():
                continue
            for stale in folder.glob(f".tmp-{target.name}-*"):  # left by a killed build; this process owns the shard now
                stale.unlink(missing_ok=True)
            first, last = index * shard_rows, min((index + 1) * shard_rows, len(sequences))
            rows = [sequences[i] for i in range(first, last)]
            generator = None
            if method != "top_k":
                generator = torch.Generator(device).manual_seed(int(hashlib.sha256(f"{draws_key}/{split}/{name}/{index}".encode()).hexdigest()[:15], 16))
            parts = [_targets_of_rows(source, setup.task, rows[j : j + batch], pad_id, vocab, k, device, method, generator)
                     for j in range(0, len(rows), batch)]
            targets = SparseTargets.cat([p for p, _ in parts]) if parts else SparseTargets.empty(k)  # a split without rows (an unlabelled source's validation)
            write_shard(target, targets, [c for _, counts in parts for c in counts], writer)
            done += 1
        if done:
            log(f"cache-teacher: {split} ({name}): {done} shard(s) written in {time.perf_counter() - start_time:.1f} s")
    if rank == 0:
        _finish(path, ident, key, {(split, name): shard_count(len(seqs), shard_rows) for split, name, seqs in plan}, shard_rows)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m distill.cache_teacher CONFIG --top-k K [--set ...]``: one process of ``distill cache-teacher`` (RANK/WORLD_SIZE from the launcher)."""

    parser = argparse.ArgumentParser(prog="distill cache-teacher")
    parser.add_argument("config")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out")
    parser.add_argument("--shard-rows", type=int, default=256)
    parser.add_argument("--targets", choices=METHODS, default="top_k")
    parser.add_argument("--encoding", choices=list(ENCODINGS), default=DEFAULT_ENCODING)
    args = parser.parse_args(argv)
    if (args.top_k is not None and args.top_k < 1) or args.shard_rows < 1:
        parser.error("--top-k and --shard-rows must be >= 1")

    def go(args):
        cfg = load_config(args.config, args.overrides)
        env = os.environ  # torchrun's variables, else srun's
        rank, world = int(env.get("RANK", env.get("SLURM_PROCID", 0))), int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
        local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        path = build(cfg, k=args.top_k, out=Path(args.out) if args.out else None, shard_rows=args.shard_rows, rank=rank, world_size=world, method=args.targets,
                     encoding=args.encoding, device=device, log=lambda line: print(line, file=sys.stderr))
        if rank == 0:
            print(f"teacher store: {path}")
        return 0

    return main_guard(go, args)


if __name__ == "__main__":
    sys.exit(main())
