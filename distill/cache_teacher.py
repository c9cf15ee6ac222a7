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
from distill.feature_terms import HIDDEN
from distill.fused import HEAD_INPUTS, chunk_rows, target_rows, teacher_chunks
from distill.losses import IGNORE_INDEX
from distill.rundir import write_atomic
from distill.setup import Setup, tune_cpu_allocator
from distill.sparse import METHODS, PICK, SparseTargets
from distill.stored_features import CALIBRATION_POSITIONS, DTYPES, FILE as FEATURES_FILE, StoredFeatures, check_request, fit, joined_features
from distill.store import _claim, _finish, _shard_name, cache_root, identity, key_of, shard_count, write_shard
from distill.teacher_source import ModelSource

DEFAULT_K = 64  # targets per token when --top-k is not given (a classifier with fewer classes keeps them all)


def _signal_of_rows(source, task, rows: list[dict], pad_id: int, vocab: int, k: int, device, method: str = "top_k", generator=None,
                    features: StoredFeatures | None = None, actual: bool = False) -> tuple[SparseTargets, list[int], dict]:
    return batch_signal(source, task, {key: value.to(device) for key, value in data.collate(rows, pad_id).items()}, vocab, k, method, generator,
                        features, actual)


def batch_targets(source, task, batch: dict, vocab: int, k: int, method: str = "top_k", generator: torch.Generator | None = None
                  ) -> tuple[SparseTargets, list[int]]:
    """The targets (``method``: ``top_k``, or ``sampled`` or ``mixed``, drawn with ``generator``) of a
    collated batch's unmasked targets, row by row (on the CPU), and each row's count.

    ``source`` is the in-process teacher (``ModelSource``); its logits are taken chunk by chunk
    from the output layer's inputs, so no ``[tokens, vocab]`` tensor of the whole batch exists.
    """
    sparse, counts, _ = batch_signal(source, task, batch, vocab, k, method, generator)
    return sparse, counts


def batch_signal(source, task, batch: dict, vocab: int, k: int, method: str = "top_k", generator: torch.Generator | None = None,
                 features: StoredFeatures | None = None, actual: bool = False) -> tuple[SparseTargets, list[int], dict]:
    """:func:`batch_targets`, and with ``features`` the shard tensors of the rows' hidden states (``{}`` without). ``actual``: the
    targets also keep each one's own token's log-probability (what a student of another tokenizer needs, :mod:`distill.pairing`)."""
    labels = task.targets(batch)
    counts = (labels != IGNORE_INDEX).reshape(len(labels), -1).sum(-1).tolist()  # a classifier's row is one target
    outputs = source.signal(batch, frozenset({HEAD_INPUTS if task.fused_head else LOGITS, *([HIDDEN] if features else [])}))
    hidden = features.encode(outputs.hidden_states, batch["attention_mask"].sum(-1).tolist()) if features else {}
    chunk = teacher_chunks(outputs, labels, vocab)
    total = sum(counts)
    own = labels.reshape(-1)[target_rows(labels)]  # each target's own token, in the targets' order

    def pick(start: int, stop: int) -> SparseTargets:
        logits = chunk(start, stop)
        picked = PICK[method](logits, k, generator)
        if actual:
            picked.actual = torch.log_softmax(logits.float(), dim=-1).gather(-1, own[start:stop, None]).squeeze(-1)
        return picked

    rows = chunk_rows(vocab)
    parts = [pick(start, min(start + rows, total)) for start in range(0, total, rows)]
    if not parts:
        return SparseTargets.empty(k, actual), counts, hidden
    return SparseTargets.cat(parts).to("cpu"), counts, hidden


def fitted_features(source, sequences, pad_id: int, layers: list[int], dim: int | None, dtype: str, batch: int, device, log) -> StoredFeatures:
    """The features of ``layers`` a store holds or a pool serves (the request checked against the teacher first): a PCA to ``dim`` fitted
    on the first rows of ``sequences`` (``source``: the in-process teacher), or the raw states when ``dim`` is the teacher's width."""
    config = source.model.config
    dim = check_request(layers, dim, dtype, teacher_layers=config.num_hidden_layers, width=config.hidden_size)
    features = StoredFeatures(layers=layers, teacher_layers=config.num_hidden_layers, width=config.hidden_size, dim=dim, dtype=dtype)
    if not features.reduced:
        return features
    samples: dict = {layer: [] for layer in layers}
    taken = 0
    for start in range(0, len(sequences), batch):
        if taken >= CALIBRATION_POSITIONS:
            break
        rows = [sequences[i] for i in range(start, min(start + batch, len(sequences)))]
        collated = {key: value.to(device) for key, value in data.collate(rows, pad_id).items()}
        states = source.signal(collated, frozenset({HIDDEN})).hidden_states
        held = collated["attention_mask"].bool()
        for layer in layers:
            samples[layer].append(states[layer][held].to("cpu", torch.float32))
        taken += int(held.sum())
    stacked = {layer: torch.cat(parts)[:CALIBRATION_POSITIONS] for layer, parts in samples.items()}
    positions = min(taken, CALIBRATION_POSITIONS)
    if positions < dim:
        raise ConfigError(f"--hidden-dim {dim}: the training data has only {positions} positions to fit the projection on; use a smaller --hidden-dim")
    features.projection, kept = fit(stacked, dim)
    log(f"cache-teacher: hidden states of layer(s) {', '.join(map(str, layers))} reduced from {features.width} to {dim} dimensions "
        f"(variance kept: {', '.join(f'{kept[layer]:.1%}' for layer in layers)}; fitted on {positions} positions)")
    return features


def build(cfg, *, k: int | None = None, out: Path | None = None, shard_rows: int = 256, rank: int = 0, world_size: int = 1, device=None, log=print,
          method: str = "top_k", encoding: str = DEFAULT_ENCODING, hidden_layers: list[int] = (), hidden_dim: int | None = None,
          hidden_dtype: str = "int8", any_tokenizer: bool = False) -> Path:
    """Runs the teacher over the job's training and validation sequences and writes (or completes) the store.

    Returns its directory. Process ``rank`` of ``world_size`` writes the shards ``i`` with
    ``i % world_size == rank``; rank 0 writes the manifest once every shard exists. With
    ``method="sampled"`` or ``"mixed"`` each shard draws from its own generator, seeded by the store's key (its
    encoding left out) and the shard, so any process, world size, resumed build or encoding draws the same ids.
    ``encoding``: how the shards hold the targets (:mod:`distill.encodings`). ``hidden_layers``: teacher layers whose
    states the store also holds, reduced to ``hidden_dim`` dimensions (:mod:`distill.stored_features`). ``any_tokenizer`` (implied by a
    config whose student tokenizes otherwise): each target's own token's log-probability too, so that students of any tokenizer can
    read the store (:mod:`distill.pairing`; the store's rows are the teacher's own either way).
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
    any_tokenizer = any_tokenizer or bool(setup.student_differs)  # built from a config of another student tokenizer
    ident = identity(cfg, setup.tokenizer, setup.sources, k=k, vocab=vocab, method=method, encoding=encoding)
    if any_tokenizer:
        if setup.task.kind != "causal_lm":
            raise ConfigError(f"--any-tokenizer: task.kind={setup.task.kind} has no text to match across tokenizers; leave it out")
        ident["targets"]["actual"] = True
    source = ModelSource(setup.teacher, setup.task, vocab)
    features = None
    if hidden_layers:
        features = fitted_features(source, setup.sources[0][2], setup.tokenizer.pad_token_id, list(hidden_layers), hidden_dim, hidden_dtype,
                                   cfg.train.micro_batch_size, device, log)
        ident["features"] = features.identity()
    writer = ENCODINGS[encoding](vocab=vocab, method=method, k=k)
    key = key_of(ident)
    # The draws depend on the targets, not on how they are written: one encoding's sampled store holds another's ids and counts
    # (and an fp16 store draws what it drew before encodings were recorded).
    draws_key = key_of({**ident, "targets": {name: value for name, value in ident["targets"].items() if name not in ("encoding", "actual")}})
    path = Path(os.path.expanduser(str(out or cfg.teacher.cache or cache_root() / key[:16])))
    _claim(path, ident, rank)
    if features is not None and features.reduced and rank == 0:
        write_atomic(path / FEATURES_FILE, features.projection_bytes())
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
            parts = [_signal_of_rows(source, setup.task, rows[j : j + batch], pad_id, vocab, k, device, method, generator, features, any_tokenizer)
                     for j in range(0, len(rows), batch)]
            # A split without rows: an unlabelled source's validation.
            targets = SparseTargets.cat([p for p, _, _ in parts]) if parts else SparseTargets.empty(k, any_tokenizer)
            hidden = joined_features(features, [h for _, _, h in parts], [len(r["input_ids"]) for r in rows]) if features else None
            write_shard(target, targets, [c for _, counts, _ in parts for c in counts], writer, hidden)
            done += 1
        if done:
            log(f"cache-teacher: {split} ({name}): {done} shard(s) written in {time.perf_counter() - start_time:.1f} s")
    if rank == 0:
        _finish(path, ident, key, {(split, name): shard_count(len(seqs), shard_rows) for split, name, seqs in plan}, shard_rows)
    return path


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers separated by commas, such as 2,4 (got {text!r})") from None


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
    parser.add_argument("--hidden-layers", type=_layers, default=[])
    parser.add_argument("--hidden-dim", type=int)
    parser.add_argument("--hidden-dtype", choices=DTYPES, default="int8")
    parser.add_argument("--any-tokenizer", action="store_true")
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
                     encoding=args.encoding, hidden_layers=args.hidden_layers, hidden_dim=args.hidden_dim, hidden_dtype=args.hidden_dtype, any_tokenizer=args.any_tokenizer, device=device, log=lambda line: print(line, file=sys.stderr))
        if rank == 0:
            print(f"teacher store: {path}")
        return 0

    return main_guard(go, args)


if __name__ == "__main__":
    sys.exit(main())
