"""The teacher store: the teacher's top-k targets of a job's data, computed once (``distill cache-teacher``).

A store is a directory::

    identity.json            what decides the contents, in clear (written first; a resumed build must match it)
    manifest.json            identity, key and every shard's size and sha256 (written last: the store is complete)
    training/data/shard-00000000.safetensors   rows [0, shard_rows) of the tokenized training sequences
    validation/data/...

Each shard holds, for its rows' targets in order (the task's targets, row by row, position by
position): ``ids`` ``[T, k]`` (int16 when the vocabulary fits, else int32), ``logprobs`` ``[T, k]``
float16 (log-probabilities at temperature 1, descending), ``tail`` ``[T]`` float32 (the log of the
mass outside the top k) and ``offsets`` ``[rows + 1]`` (where each row's targets start). A store of
sampled targets (``--targets sampled``) holds in the same fields the ids drawn and the log of their
frequencies among k draws, with no tail (:func:`sample`); a mixed store (``--targets mixed``), the
top k/2 ids exactly and k/2 ids drawn from the rest (:func:`mixed`).

Shards are a fixed partition of the rows, written atomically (a temporary file renamed), each by
process ``shard % world_size``: a killed build resumes by skipping the shards that exist, any world
size writes the same files, and the finished store reads the same at any world size. The key is a
sha256 of the identity: the teacher's weights and quantization, the tokenizer's vocabulary, the
data (file contents and the tokenized sequences), seq_len, packing, text unit, masking, k and the
method (top-k or sampled).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.errors import ConfigError, first_line
from distill.losses import forward_kl_and_grad, log_probs
from distill.rundir import write_atomic

FORMAT = 1
TAIL_FLOOR = -1e4  # log-probability standing for 0: exp() is 0 and 0 * (floor - x) stays finite
LOGPROB_SLACK = 1e-2  # a stored log-probability may round above 0 by float16's step near 0, never more


@dataclass
class SparseTargets:
    """The teacher's top-k targets of some target rows: ``ids``/``logprobs`` ``[N, k]``, ``tail`` ``[N]``."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor
    tail_mode: str = "bucket"  # how the loss treats the mass outside the top k (teacher.cache_tail)

    def __getitem__(self, rows) -> "SparseTargets":
        return SparseTargets(self.ids[rows], self.logprobs[rows], self.tail[rows], self.tail_mode)

    def __len__(self) -> int:
        return self.ids.shape[0]

    @staticmethod
    def cat(parts: list["SparseTargets"], tail_mode: str = "bucket") -> "SparseTargets":
        return SparseTargets(*(torch.cat([getattr(p, f) for p in parts]) for f in ("ids", "logprobs", "tail")), tail_mode)

    def to(self, device) -> "SparseTargets":
        return SparseTargets(self.ids.to(device), self.logprobs.to(device), self.tail.to(device), self.tail_mode)


def top_k(logits: torch.Tensor, k: int) -> SparseTargets:
    """The top-k of ``logits`` ``[N, V]`` at temperature 1, with the log of the remaining mass."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = log_probs.topk(k, dim=-1)
    rest = log_probs.scatter(-1, ids, float("-inf")).logsumexp(-1) if k < logits.shape[-1] else log_probs.new_full(ids.shape[:1], float("-inf"))
    return SparseTargets(ids, values, rest)


def _drawn(weights: torch.Tensor, draws: int, generator: torch.Generator, excluded: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, ids) ``[N, draws]`` of ``draws`` ids drawn with replacement in proportion to
    ``weights`` ``[N, V]``: the distinct ids drawn first, then ids never drawn (count 0), never an
    ``excluded`` id."""
    drawn = torch.multinomial(weights, draws, replacement=True, generator=generator)
    counts = torch.zeros_like(weights).scatter_add_(-1, drawn, torch.ones_like(drawn, dtype=weights.dtype))
    if excluded is not None:
        counts.scatter_(-1, excluded, -1.0)
    return counts.topk(draws, dim=-1)


def sample(logits: torch.Tensor, k: int, generator: torch.Generator) -> SparseTargets:
    """``k`` ids drawn with replacement from softmax(``logits``) ``[N, V]`` at temperature 1, kept as
    the distinct ids drawn with their frequencies (``log(count / k)``; slots beyond them hold other
    ids at probability 0) and no tail ("Sparse Logit Sampling", Anshumann et al., ACL 2025).

    The frequencies are an unbiased estimate of the teacher's distribution, so the forward KL's
    gradient against them is an unbiased estimate of the dense one, which top-k's is not.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    frequency, ids = _drawn(probs, k, generator)
    return SparseTargets(ids, torch.log(frequency / k), probs.new_full(ids.shape[:1], float("-inf")))


def mixed(logits: torch.Tensor, k: int, generator: torch.Generator) -> SparseTargets:
    """The teacher's top ``k // 2`` ids with their exact log-probabilities, then ``k - k // 2`` ids
    drawn with replacement from the rest of softmax(``logits``) ``[N, V]`` at temperature 1, kept as
    in :func:`sample` with their frequencies scaled by the rest's mass; no tail.

    Still an unbiased estimate of the teacher's distribution (exact where it is largest, sampled
    beyond), so the forward KL's gradient stays unbiased; only the mass outside the head is
    estimated, so its noise is that of the rest (mass ``r``: variance ``r^2`` times that of
    sampling the rest alone), well below :func:`sample`'s at the same bytes.
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    head_values, head_ids = log_p.topk(k // 2, dim=-1)
    draws = k - k // 2
    rest = log_p.exp().scatter_(-1, head_ids, 0.0)
    mass = rest.sum(-1, keepdim=True)
    weights = rest
    if not bool((mass > 0).all()):  # a row whose rest underflows to 0 draws from any other id; its frequencies are weighted by that 0 mass
        weights = torch.where(mass > 0, rest, torch.ones_like(rest).scatter_(-1, head_ids, 0.0))
    frequency, ids = _drawn(weights, draws, generator, excluded=head_ids)
    values = torch.log(mass) + torch.log(frequency / draws)
    return SparseTargets(torch.cat([head_ids, ids], -1), torch.cat([head_values, values], -1), log_p.new_full(ids.shape[:1], float("-inf")))


PREFERENCE = ("sampled", "mixed", "top_k")  # which store a job finds first: the last (top-k serves every divergence and temperature)
PICK = {"top_k": lambda logits, k, generator: top_k(logits, k), "sampled": sample, "mixed": mixed}
METHODS = tuple(PICK)


def _bucket_parts(log_s: torch.Tensor, teacher: SparseTargets, temperature: float) -> tuple[torch.Tensor, ...]:
    """(student buckets, teacher buckets, both before the floor; the student's stored-id
    log-probabilities; their mass) from the student's log-probabilities at ``temperature``."""
    s_top = log_s.gather(-1, teacher.ids.long())
    # The rest from the top's mass (k values, not another pass over the vocabulary); its float32
    # resolution ends where the student puts all but ~1e-6 of its mass on the stored ids.
    mass = s_top.exp().sum(-1, keepdim=True)
    s_rest = torch.log1p(-mass.clamp(max=1 - 1e-6))
    t_log = teacher.logprobs.float()
    tail = teacher.tail.float().unsqueeze(-1)
    if temperature != 1.0:
        kept = torch.log1p(-tail.clamp(max=0).exp().clamp(max=1 - 1e-7))
        t_log = kept + torch.log_softmax(t_log / temperature, dim=-1)
    return torch.cat([s_top, s_rest], dim=-1), torch.cat([t_log, tail], dim=-1), s_top, mass


def buckets(student_logits: torch.Tensor, teacher: SparseTargets, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probabilities ``[N, k + 1]`` over the stored ids and one bucket for the rest.

    The student's are exact at temperature T: log softmax(z / T) at each stored id, and the log of
    its remaining mass. The teacher's stored log-probabilities are at T = 1; at another T the stored
    ids are softened among themselves and keep their total mass: ``p_T(i) = (1 - tail) *
    softmax(logp / T)_i``, and the rest keeps ``tail``. At T = 1 both are the dense distributions
    restricted to the same k + 1 buckets, so every divergence of :mod:`distill.losses` applies.
    """
    student, teacher_buckets, _, _ = _bucket_parts(log_probs(student_logits, temperature), teacher, temperature)
    return student.clamp(min=TAIL_FLOOR), teacher_buckets.clamp(min=TAIL_FLOOR)


def bucket_forward_kl_and_grad(student_logits: torch.Tensor, teacher: SparseTargets, temperature: float,
                               log_s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward KL between :func:`buckets` (as ``forward_kl`` at T=1 computes it on them) and its
    gradient with respect to ``student_logits``, in closed form: the fused path's store and pool
    targets (:mod:`distill.fused`), without an autograd graph through the gather and the tail.

    ``log_s``: the student's log-probabilities at ``temperature``, when already computed.
    """
    log_s = log_probs(student_logits, temperature) if log_s is None else log_s
    student, teacher_buckets, s_top, mass = _bucket_parts(log_s, teacher, temperature)
    loss, g = forward_kl_and_grad(student.clamp(min=TAIL_FLOOR), teacher_buckets.clamp(min=TAIL_FLOOR))  # g: d loss / d bucket
    # Through the floor (zero where clamped), then the rest's bucket through its mass, to the stored ids.
    g.mul_(student >= TAIL_FLOOR)
    k = s_top.shape[-1]
    g_top = g[:, :k] + g[:, k:] * (mass <= 1 - 1e-6) * (-1 / (1 - mass.clamp(max=1 - 1e-6))) * s_top.exp()
    grad = log_s.exp().mul_(-g_top.sum(-1, keepdim=True)).scatter_add_(-1, teacher.ids.long(), g_top)
    return loss, grad if temperature == 1.0 else grad.div_(temperature)


def spread(teacher: SparseTargets, vocab: int) -> torch.Tensor:
    """``[N, vocab]`` teacher log-probabilities: the stored ones at their ids, the tail mass spread
    evenly over the other ``vocab - k`` ids (``teacher.cache_tail: uniform``). A dense distribution,
    so a divergence applies its temperature to it exactly as to full teacher logits."""
    ids, k = teacher.ids.long(), teacher.ids.shape[-1]
    each = teacher.tail.float() - math.log(max(vocab - k, 1))
    dense = each.clamp(min=TAIL_FLOOR).unsqueeze(-1).expand(-1, vocab).contiguous()
    return dense.scatter_(-1, ids, teacher.logprobs.float())


# ----- identity ---------------------------------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """Where stores are found and built by default: ``$DISTILL_CACHE_DIR/teacher``, else ``~/.cache/distill/teacher``."""
    return Path(os.environ.get("DISTILL_CACHE_DIR") or Path.home() / ".cache" / "distill") / "teacher"


def file_hash(path: Path) -> str:
    """sha256 of a file, remembered by (real path, size, mtime) so a 14 GB teacher is read once."""
    path = Path(path).resolve()
    stat = path.stat()
    memo = cache_root().parent / "file_hashes.json"
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = _sha256_file(path)
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".tmp-{memo.name}-{os.getpid()}")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, memo)
    return known[key]


def _teacher_weights(cfg) -> dict:
    path = Path(os.path.expanduser(cfg.path))
    if not path.is_dir():
        return {"hub_id": cfg.path, "revision": cfg.revision}
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") or p.name == "config.json")
    return {name.name: file_hash(name) for name in files}


def _tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


def sequences_hash(sequences) -> str:
    """sha256 of every row's input ids and targets, in order: what the store's rows are."""
    import numpy as np

    digest = hashlib.sha256()
    for row in sequences:
        for field in ("input_ids", "labels"):
            digest.update(np.asarray(row.get(field, []), dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _data_identity(source_cfg) -> dict:
    from dataclasses import asdict

    fields = {k: v for k, v in asdict(source_cfg).items() if k not in ("seed", "max_validation_sequences", "mixture", "train_files", "validation_files")}
    for key in ("train_files", "validation_files"):
        fields[key] = {name: file_hash(Path(os.path.expanduser(name))) for name in getattr(source_cfg, key)}
    return fields


def teacher_identity(cfg, tokenizer) -> dict:
    """What decides the teacher's targets of any given sequence, in clear: the teacher's weights and
    quantization, the tokenizer and the task. A store adds its data; a served teacher
    (:mod:`distill.service`) publishes this with its k."""
    t = cfg.teacher
    teacher = {"path": t.path, "weights": _teacher_weights(t), "dtype": t.dtype, "quantization": t.quantization}
    if t.quantization == "4bit":
        teacher.update(quant_type=t.quant_type, double_quant=t.double_quant)
    task = {"kind": cfg.task.kind, **({"mask_rate": cfg.task.mask_rate, "mask_seed": cfg.task.mask_seed} if cfg.task.kind == "masked_lm" else {})}
    return {"format": FORMAT, "teacher": teacher, "tokenizer": _tokenizer_hash(tokenizer), "task": task}


def identity(cfg, tokenizer, sources: list, *, k: int | None, vocab: int | None, method: str | None = "top_k") -> dict:
    """What decides a store's contents, in clear. ``sources``: ``(name, weight, train, validation)`` as in ``job.Setup``."""
    from distill import data

    configs = {name: source for name, _, source in data.sources(cfg.data)}
    return {
        **teacher_identity(cfg, tokenizer),
        "data": _data_identity(configs["data"]) if cfg.data.mixture == [] else {"mixture": {name: _data_identity(configs[name]) for name in configs}},
        "sequences": {name: {"training": sequences_hash(train), "validation": sequences_hash(validation)} for name, _, train, validation in sources},
        "targets": {"method": method, "k": k, "vocab": vocab},
    }


def key_of(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _flat(value, prefix="") -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def differences(store: dict, job: dict) -> list[str]:
    """The dotted fields in which two identities differ (the sequence hashes only when nothing in clear explains them)."""
    a, b = _flat(store), _flat(job)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    clear = [k for k in keys if not k.startswith("sequences.")]
    return clear or keys


def describe(keys: list[str], store: dict, job: dict, *, theirs: str = "store") -> str:
    """``keys`` (from :func:`differences`) with both values, the first three of them."""
    a, b = _flat(store), _flat(job)
    shown = [f"{k} ({theirs} {_short(a.get(k, '<absent>'))}, job {_short(b.get(k, '<absent>'))})" for k in keys[:3]]
    return "; ".join(shown) + (f"; and {len(keys) - 3} more" if len(keys) > 3 else "")


def _short(value) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


# ----- building ----------------------------------------------------------------------------------------------------------------------


def _shard_name(index: int) -> str:
    return f"shard-{index:08d}.safetensors"


def shard_count(rows: int, shard_rows: int) -> int:
    return max(1, -(-rows // shard_rows))


def _targets_of_rows(source, task, rows: list[dict], pad_id: int, vocab: int, k: int, device, method: str = "top_k", generator=None
                     ) -> tuple[SparseTargets, list[int]]:
    from distill import data

    return batch_targets(source, task, {key: value.to(device) for key, value in data.collate(rows, pad_id).items()}, vocab, k, method, generator)


def batch_targets(source, task, batch: dict, vocab: int, k: int, method: str = "top_k", generator: torch.Generator | None = None
                  ) -> tuple[SparseTargets, list[int]]:
    """The targets (``method``: ``top_k``, or ``sampled`` or ``mixed``, drawn with ``generator``) of a
    collated batch's unmasked targets, row by row (on the CPU), and each row's count.

    ``source`` is the in-process teacher (``ModelSource``); its logits are taken chunk by chunk
    from the output layer's inputs, so no ``[tokens, vocab]`` tensor of the whole batch exists.
    """
    from distill.fused import HEAD_INPUTS, chunk_rows, teacher_chunks
    from distill.losses import IGNORE_INDEX

    labels = task.targets(batch)
    counts = (labels != IGNORE_INDEX).sum(-1).tolist()
    outputs = source.signal(batch, frozenset({HEAD_INPUTS}))
    chunk = teacher_chunks(outputs, labels, vocab)
    total = sum(counts)
    rows = chunk_rows(vocab)
    parts = [PICK[method](chunk(start, min(start + rows, total)), k, generator) for start in range(0, total, rows)]
    if not parts:
        return SparseTargets(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0)), counts
    return SparseTargets.cat(parts).to("cpu"), counts


def encode(targets: SparseTargets, counts: list[int], vocab: int) -> bytes:
    """The targets of some rows as a shard's bytes (safetensors; the layout in the module's docstring).
    The teacher service (:mod:`distill.service`) answers in the same bytes."""
    from safetensors.torch import save

    offsets = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
    tensors = {"ids": targets.ids.to(torch.int16 if vocab <= 32767 else torch.int32), "logprobs": targets.logprobs.half(),
               "tail": targets.tail.float(), "offsets": offsets}
    return save({name: t.contiguous() for name, t in tensors.items()})


def write_shard(path: Path, targets: SparseTargets, counts: list[int], vocab: int) -> None:
    write_atomic(path, encode(targets, counts, vocab))


def build(cfg, *, k: int, out: Path | None = None, shard_rows: int = 256, rank: int = 0, world_size: int = 1, device=None, log=print,
          method: str = "top_k") -> Path:
    """Runs the teacher over the job's training and validation sequences and writes (or completes) the store.

    Returns its directory. Process ``rank`` of ``world_size`` writes the shards ``i`` with
    ``i % world_size == rank``; rank 0 writes the manifest once every shard exists. With
    ``method="sampled"`` or ``"mixed"`` each shard draws from its own generator, seeded by the store's key and the
    shard, so any process, world size or resumed build draws the same ids.
    """
    from distill import job, models
    from distill.teacher_source import ModelSource

    if method not in METHODS:  # before any model is loaded
        raise ConfigError(f"--targets {method}: use one of {', '.join(METHODS)}")
    device = device or torch.device("cpu")
    job.tune_cpu_allocator(cfg.train.cpu_allocator, device)
    setup = job.Setup(cfg, device, load_teacher=True, load_student=False)
    vocab = min(models.output_vocab(setup.teacher), len(setup.tokenizer))
    if not 0 < k <= vocab:
        raise ConfigError(f"--top-k {k} must be between 1 and the vocabulary size ({vocab})")
    if setup.task.kind not in ("causal_lm", "masked_lm"):
        raise ConfigError(f"task.kind={setup.task.kind}: the teacher store holds token targets of language models (causal_lm, masked_lm)")
    ident = identity(cfg, setup.tokenizer, setup.sources, k=k, vocab=vocab, method=method)
    key = key_of(ident)
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
                generator = torch.Generator(device).manual_seed(int(hashlib.sha256(f"{key}/{split}/{name}/{index}".encode()).hexdigest()[:15], 16))
            parts = [_targets_of_rows(source, setup.task, rows[j : j + batch], pad_id, vocab, k, device, method, generator)
                     for j in range(0, len(rows), batch)]
            targets = SparseTargets.cat([p for p, _ in parts])
            write_shard(target, targets, [c for _, counts in parts for c in counts], vocab)
            done += 1
        if done:
            log(f"cache-teacher: {split} ({name}): {done} shard(s) written in {time.perf_counter() - start_time:.1f} s")
    if rank == 0:
        _finish(path, ident, key, {(split, name): shard_count(len(seqs), shard_rows) for split, name, seqs in plan}, shard_rows)
    return path


def _claim(path: Path, ident: dict, rank: int) -> None:
    """Starts a store at ``path``, or checks that the one there was started for the same contents."""
    marker = path / "identity.json"
    if path.exists() and any(path.iterdir()) and not marker.is_file():
        raise ConfigError(f"{path} exists and is not a teacher store (no identity.json); choose another --out or teacher.cache")
    if marker.is_file():
        existing = json.loads(marker.read_text())
        if existing != ident:
            raise ConfigError(f"the store at {path} holds other targets: {describe(differences(existing, ident), existing, ident)}; "
                              "choose another --out or teacher.cache")
        return
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, (json.dumps(ident, indent=2, sort_keys=True) + "\n").encode())
    else:
        _wait_for(lambda: marker.is_file(), f"{marker} (written by rank 0)")


def _wait_for(condition, what: str, timeout: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise ConfigError(f"cache-teacher: gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.5)


def _finish(path: Path, ident: dict, key: str, counts: dict, shard_rows: int) -> None:
    files = [(split, name, path / split / name / _shard_name(i)) for (split, name), n in counts.items() for i in range(n)]
    _wait_for(lambda: all(f.exists() for _, _, f in files), "the other processes' shards")
    for stale in path.rglob(".tmp-*"):  # every shard exists, so nothing is being written: these are a killed build's
        stale.unlink(missing_ok=True)
    splits: dict = {}
    for split, name, f in files:
        entry = splits.setdefault(split, {}).setdefault(name, {"shards": []})
        entry["shards"].append({"file": f.name, "bytes": f.stat().st_size, "sha256": _sha256_file(f)})
    manifest = {"key": key, "identity": ident, "shard_rows": shard_rows, "splits": splits}
    write_atomic(path / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


# ----- reading ----------------------------------------------------------------------------------------------------------------------


class Store:
    """A complete store, checked against the job before step 0; reads the targets of any row."""

    def __init__(self, path: Path, job_identity: dict | None = None):
        self.path = path = Path(path)
        manifest = path / "manifest.json"
        if not path.is_dir():
            raise ConfigError(f"teacher.cache: {path} does not exist; build it with distill cache-teacher")
        if not manifest.is_file():
            if (path / "identity.json").is_file():
                raise ConfigError(f"teacher.cache: the store at {path} is incomplete (distill cache-teacher did not finish); run it again to complete it")
            raise ConfigError(f"teacher.cache: {path} is not a teacher store (no manifest.json); build one with distill cache-teacher")
        try:
            self.manifest = json.loads(manifest.read_text())
            self.identity, self.shard_rows = self.manifest["identity"], int(self.manifest["shard_rows"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"teacher.cache: {manifest} is not a readable manifest; rebuild the store with distill cache-teacher") from None
        self.k, self.vocab = int(self.identity["targets"]["k"]), int(self.identity["targets"]["vocab"])
        self.method = self.identity["targets"].get("method", "top_k")
        if job_identity is not None:
            job = {**job_identity, "targets": self.identity["targets"]}
            diff = differences(self.identity, job)
            if diff:
                raise ConfigError(f"teacher.cache: the store at {path} was built for another job: {describe(diff, self.identity, job)}; "
                                  "run distill cache-teacher with this config")
        self._expected: dict = {}  # (split, source, shard index) -> the manifest's sha256
        for split, sources in self.manifest["splits"].items():
            for name, entry in sources.items():
                for index, shard in enumerate(entry["shards"]):
                    f = path / split / name / shard["file"]
                    size = f.stat().st_size if f.is_file() else None
                    if size != shard["bytes"]:
                        state = "missing" if size is None else f"truncated ({size} of {shard['bytes']} bytes)"
                        raise ConfigError(f"teacher.cache: shard {f} is {state}; rebuild the store with distill cache-teacher")
                    self._expected[(split, name, index)] = shard.get("sha256")
        self._open: dict = {}
        self._checked: set = set()

    def _shard(self, split: str, name: str, index: int):
        """(an open, memory-mapped shard, its row offsets): rows are read by slice, never the whole shard."""
        from safetensors import SafetensorError, safe_open

        key = (split, name, index)
        if key not in self._open:
            f = self.path / split / name / _shard_name(index)
            try:
                if key not in self._checked:  # once per shard and process, before the shard is opened for reading
                    self._check_shard(f, self._expected.get(key))
                    self._checked.add(key)
                handle = safe_open(str(f), framework="pt")
                self._open[key] = (handle, handle.get_tensor("offsets").tolist())
            except (SafetensorError, OSError, KeyError) as err:
                raise ConfigError(f"teacher.cache: shard {f} cannot be read ({first_line(err)}); rebuild the store with distill cache-teacher") from None
            if len(self._open) > 256:
                self._open.pop(next(iter(self._open)))
        return self._open[key]

    def _check_shard(self, f: Path, expected: str | None) -> None:
        """The shard's bytes are the ones its manifest recorded, and its values fit the store: ids inside
        the vocabulary, log-probabilities and tails at most 0 and never NaN, row offsets in order. Read
        once, whole: the values checked are the bytes hashed (a manifest rewritten together with its
        shards still cannot feed the loss an index out of range or a NaN)."""
        from safetensors.torch import load

        if expected is None:
            raise ConfigError(f"teacher.cache: the manifest records no sha256 for shard {f}; rebuild the store with distill cache-teacher")
        data = f.read_bytes()
        if hashlib.sha256(data).hexdigest() != expected:
            raise ConfigError(f"teacher.cache: shard {f} does not match the sha256 in its manifest (changed or damaged since it was built); "
                              "rebuild the store with distill cache-teacher")
        # Copies: tensors straight from the bytes are unaligned, and reductions over them run 50x slower.
        tensors = {name: tensor.clone() for name, tensor in load(data).items()}
        ids, logprobs, tail, offsets = (tensors.get(field) for field in ("ids", "logprobs", "tail", "offsets"))
        problem = None
        if any(t is None for t in (ids, logprobs, tail, offsets)):
            problem = "it lacks one of ids, logprobs, tail, offsets"
        elif ids.ndim != 2 or ids.shape[1] != self.k or logprobs.shape != ids.shape or tail.shape != ids.shape[:1]:
            problem = f"its targets are not [tokens, {self.k}]"
        elif offsets.ndim != 1 or int(offsets[0]) != 0 or int(offsets[-1]) != ids.shape[0] or bool((offsets.diff() < 0).any()):
            problem = "its row offsets do not cover its targets in order"
        elif ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.vocab:
            problem = f"it holds ids outside the vocabulary [0, {self.vocab}) (from {int(ids.min())} to {int(ids.max())})"
        elif ids.numel() and not (float(logprobs.max()) <= LOGPROB_SLACK and float(tail.max()) <= LOGPROB_SLACK):
            # max() is NaN when any value is (-inf is a probability of 0: sampled ids never drawn, no tail)
            nan = bool(logprobs.isnan().any() or tail.isnan().any())
            problem = "it holds log-probabilities that are NaN" if nan else "it holds log-probabilities above 0"
        if problem:
            raise ConfigError(f"teacher.cache: shard {f} is not a valid teacher store shard: {problem}; rebuild the store with distill cache-teacher")

    def rows(self, split: str, name: str, rows: list[int]) -> SparseTargets:
        """The targets of ``rows`` of one source's split, concatenated in order."""
        parts = []
        for row in rows:
            handle, offsets = self._shard(split, name, row // self.shard_rows)
            i = row % self.shard_rows
            a, b = offsets[i], offsets[i + 1]
            parts.append(SparseTargets(*(handle.get_slice(field)[a:b] for field in ("ids", "logprobs", "tail"))))
        return SparseTargets.cat(parts)


def find(ident: dict) -> Path | None:
    """A complete store under :func:`cache_root` built for this job (any k): top-k before mixed before sampled targets, the largest k first."""
    root = cache_root()
    found = []
    for manifest in root.glob("*/manifest.json") if root.is_dir() else ():
        try:
            stored = json.loads(manifest.read_text())["identity"]
        except (OSError, ValueError, KeyError):
            continue
        if not differences(stored, {**ident, "targets": stored.get("targets")}):
            found.append((PREFERENCE.index(stored["targets"].get("method", "top_k")), stored["targets"]["k"], manifest.parent))
    return max(found)[-1] if found else None


def store_for(cfg) -> Path | None:
    """The complete store under :func:`cache_root` built for ``cfg``'s teacher and data, if any
    (the tokenizer and data are read to compute the identity; no model is loaded)."""
    from distill.job import Setup

    setup = Setup(cfg, torch.device("cpu"), load_teacher=False, load_student=False)
    return find(identity(cfg, setup.tokenizer, setup.sources, k=None, vocab=None))


def main(argv: list[str] | None = None) -> int:
    """``python -m distill.store CONFIG --top-k K [--set ...]``: one process of ``distill cache-teacher`` (RANK/WORLD_SIZE from the launcher)."""
    import argparse

    from distill.config import load_config
    from distill.errors import main_guard

    parser = argparse.ArgumentParser(prog="distill cache-teacher")
    parser.add_argument("config")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out")
    parser.add_argument("--shard-rows", type=int, default=256)
    parser.add_argument("--targets", choices=METHODS, default="top_k")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.shard_rows < 1:
        parser.error("--top-k and --shard-rows must be >= 1")

    def go(args):
        cfg = load_config(args.config, args.overrides)
        env = os.environ  # torchrun's variables, else srun's
        rank, world = int(env.get("RANK", env.get("SLURM_PROCID", 0))), int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
        local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        path = build(cfg, k=args.top_k, out=Path(args.out) if args.out else None, shard_rows=args.shard_rows, rank=rank, world_size=world, method=args.targets,
                     device=device, log=lambda line: print(line, file=sys.stderr))
        if rank == 0:
            print(f"teacher store: {path}")
        return 0

    return main_guard(go, args)


if __name__ == "__main__":
    sys.exit(main())
