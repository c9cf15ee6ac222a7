"""The teacher store: the teacher's top-k targets of a job's data, computed once (``distill cache-teacher``).

A store is a directory::

    identity.json            what decides the contents, in clear (written first; a resumed build must match it)
    manifest.json            identity, key and every shard's size and sha256 (written last: the store is complete)
    training/data/shard-00000000.safetensors   rows [0, shard_rows) of the tokenized training sequences
    validation/data/...

Each shard holds, for its rows' targets in order (the task's targets, row by row, position by
position), ``offsets`` ``[rows + 1]`` (where each row's targets start) and the targets in the store's
encoding (``--encoding``, :mod:`distill.encodings`; recorded in the identity, ``fp16`` where an older
store records none). ``fp16``: ``ids`` ``[T, k]`` (int16 when the vocabulary fits, else int32),
``logprobs`` ``[T, k]`` float16 (log-probabilities at temperature 1, descending), ``tail`` ``[T]``
float32 (the log of the mass outside the top k); ``q8``/``q4``: bit-packed ids, quantized
log-probabilities and the drawn ids' counts, one record per row. A store of sampled targets
(``--targets sampled``) holds the ids drawn and the log of their frequencies among k draws, with no
tail (:func:`sample`); a mixed store (``--targets mixed``), the top k/2 ids exactly and k/2 ids drawn
from the rest (:func:`mixed`). Every encoding reads back as the same ``[N, k]`` targets. A store built
with ``--hidden-layers`` also holds the teacher's hidden states of those layers (``features`` in its
identity, ``features.safetensors`` beside the manifest, ``hidden_*`` tensors in each shard:
:mod:`distill.stored_features`). A store built with ``--any-tokenizer`` (or from a config whose
student tokenizes otherwise) also holds ``actual`` ``[T]`` float16, each target's own token's
log-probability (``targets.actual`` in its identity): a student of any tokenizer reads it, its rows
being the teacher's own (:mod:`distill.pairing`).

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
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save

from distill.config.schema import data_sources
from distill.data import expand_files
from distill.encodings.registry import DEFAULT as DEFAULT_ENCODING
from distill.encodings.registry import ENCODINGS
from distill.errors import ConfigError, first_line
from distill.rundir import write_atomic
from distill.setup import Setup
from distill.stored_features import StoredFeatures

# The targets' format and math live in distill.sparse; re-exported for the store's readers.
from distill.sparse import METHODS, PICK, TAIL_FLOOR, SparseTargets, actual_tensor, bucket_forward_kl_and_grad, buckets, mixed, sample, spread, top_k  # noqa: F401

FORMAT = 1
LOGPROB_SLACK = 1e-2  # a stored log-probability may round above 0 by float16's step near 0, never more
PREFERENCE = ("sampled", "mixed", "top_k")  # which store a job finds first: the last (top-k serves every divergence and temperature)


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
        write_atomic(memo, json.dumps(known))
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


def sequences_hash(sequences, fields: tuple[str, str] = ("input_ids", "labels")) -> str:
    """sha256 of every row's input ids and targets (``fields``), in order: what the store's rows are."""

    digest = hashlib.sha256()
    for row in sequences:
        for field in fields:
            digest.update(np.asarray(row.get(field, []), dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _data_identity(source_cfg) -> dict:
    fields = {k: v for k, v in asdict(source_cfg).items() if k not in ("seed", "max_validation_sequences", "mixture", "train_files", "validation_files")}
    for key in ("train_files", "validation_files"):
        fields[key] = {name: file_hash(Path(os.path.expanduser(name))) for name in expand_files(getattr(source_cfg, key))}
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


TEACHER_ROWS = ("teacher_input_ids", "teacher_labels")  # a job of another tokenizer's rows, as the teacher's tokenizer cuts them (data.tokenize)


def identity(cfg, tokenizer, sources: list, *, k: int | None, vocab: int | None, method: str | None = "top_k", encoding: str | None = DEFAULT_ENCODING,
             fields: tuple[str, str] = ("input_ids", "labels")) -> dict:
    """What decides a store's contents, in clear. ``sources``: ``(name, weight, train, validation)`` as in ``setup.Setup``; ``fields``:
    the rows' ids and targets (:data:`TEACHER_ROWS` for a job whose student tokenizes otherwise: the teacher's rows, as a store holds them)."""
    configs = {source.name: source.data for source in data_sources(cfg.data)}
    return {
        **teacher_identity(cfg, tokenizer),
        "data": _data_identity(configs["data"]) if cfg.data.mixture == [] else {"mixture": {name: _data_identity(configs[name]) for name in configs}},
        "sequences": {name: {"training": sequences_hash(train, fields), "validation": sequences_hash(validation, fields)}
                      for name, _, train, validation in sources},
        "targets": {"method": method, "k": k, "vocab": vocab, "encoding": encoding},
    }


def as_stored(job: dict, stored: dict) -> dict:
    """A job's identity with what the store chose for itself (its targets, its features) taken from ``stored``: what must then match."""
    return {**job, "targets": stored.get("targets"), **({"features": stored["features"]} if "features" in stored else {})}


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


def write_shard(path: Path, targets: SparseTargets, counts: list[int], encoding, features: dict | None = None) -> None:
    """A shard's targets (``counts`` per row) in ``encoding`` (a :class:`distill.encodings.base.Encoding`), and the rows' hidden
    states' tensors when the store holds them (:func:`distill.stored_features.joined_features`), written atomically."""
    write_atomic(path, save({**encoding.tensors(targets, counts), **actual_tensor(targets), **(features or {})}))


def _claim(path: Path, ident: dict, rank: int) -> None:
    """Starts a store at ``path``, or checks that the one there was started for the same contents."""
    marker = path / "identity.json"
    if rank != 0:  # rank 0 starts the store (its directory may hold rank 0's temporary identity file for a moment): wait for it
        _wait_for(lambda: marker.is_file(), f"{marker} (written by rank 0)")
    elif path.exists() and any(path.iterdir()) and not marker.is_file():
        raise ConfigError(f"{path} exists and is not a teacher store (no identity.json); choose another --out or teacher.cache")
    if marker.is_file():
        existing = json.loads(marker.read_text())
        if existing != ident:
            raise ConfigError(f"the store at {path} holds other targets: {describe(differences(existing, ident), existing, ident)}; "
                              "choose another --out or teacher.cache")
        return
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(marker, (json.dumps(ident, indent=2, sort_keys=True) + "\n").encode())


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
        self.actual = bool(self.identity["targets"].get("actual"))  # each target's own token's log-probability (cache-teacher --any-tokenizer)
        self.encoding_name = self.identity["targets"].get("encoding") or DEFAULT_ENCODING  # a store from before encodings: fp16
        if self.encoding_name not in ENCODINGS:
            raise ConfigError(f"teacher.cache: the store at {path} is in encoding {self.encoding_name!r}, which this version of distill cannot read "
                              f"(it reads {', '.join(ENCODINGS)}); upgrade distill or rebuild the store with distill cache-teacher")
        self.encoding = ENCODINGS[self.encoding_name](vocab=self.vocab, method=self.method, k=self.k)
        self.features = StoredFeatures.load(path, self.identity["features"]) if "features" in self.identity else None
        if job_identity is not None:
            job = as_stored(job_identity, self.identity)
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
        """(an open, memory-mapped shard, its row offsets, what its encoding reads rows by, its rows' hidden-state offsets when the store
        holds hidden states): rows are read by slice, never the whole shard."""

        key = (split, name, index)
        if key not in self._open:
            f = self.path / split / name / _shard_name(index)
            try:
                if key not in self._checked:  # once per shard and process, before the shard is opened for reading
                    self._check_shard(f, self._expected.get(key))
                    self._checked.add(key)
                handle = safe_open(str(f), framework="pt")
                hidden = handle.get_tensor("hidden_offsets").tolist() if self.features is not None else None
                self._open[key] = (handle, handle.get_tensor("offsets").tolist(), self.encoding.open(handle), hidden)
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

        if expected is None:
            raise ConfigError(f"teacher.cache: the manifest records no sha256 for shard {f}; rebuild the store with distill cache-teacher")
        data = f.read_bytes()
        if hashlib.sha256(data).hexdigest() != expected:
            raise ConfigError(f"teacher.cache: shard {f} does not match the sha256 in its manifest (changed or damaged since it was built); "
                              "rebuild the store with distill cache-teacher")
        # Copies: tensors straight from the bytes are unaligned, and reductions over them run 50x slower.
        problem = self._problem({name: tensor.clone() for name, tensor in load(data).items()})
        if problem:
            raise ConfigError(f"teacher.cache: shard {f} is not a valid teacher store shard: {problem}; rebuild the store with distill cache-teacher")

    def _problem(self, tensors: dict) -> str | None:
        """What makes a shard's loaded tensors unfit for the loss, read back through the store's encoding; None when nothing."""
        offsets = tensors.get("offsets")
        if offsets is None:
            return "it lacks offsets"
        try:
            targets = self.encoding.decode(tensors)
        except (ValueError, IndexError, RuntimeError) as err:
            return f"its {self.encoding_name} targets do not read back: {first_line(err)}"
        ids, logprobs, tail = targets.ids, targets.logprobs, targets.tail
        if ids.ndim != 2 or ids.shape[1] != self.k or logprobs.shape != ids.shape or tail.shape != ids.shape[:1]:
            return f"its targets are not [tokens, {self.k}]"
        if offsets.ndim != 1 or int(offsets[0]) != 0 or int(offsets[-1]) != ids.shape[0] or bool((offsets.diff() < 0).any()):
            return "its row offsets do not cover its targets in order"
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.vocab:
            return f"it holds ids outside the vocabulary [0, {self.vocab}) (from {int(ids.min())} to {int(ids.max())})"
        if ids.numel() and not (float(logprobs.max()) <= LOGPROB_SLACK and float(tail.max()) <= LOGPROB_SLACK):
            # max() is NaN when any value is (-inf is a probability of 0: sampled ids never drawn, no tail)
            nan = bool(logprobs.isnan().any() or tail.isnan().any())
            return "it holds log-probabilities that are NaN" if nan else "it holds log-probabilities above 0"
        actual = tensors.get("actual")
        if self.actual and (actual is None or actual.shape != ids.shape[:1]):
            return "it lacks the log-probability of each target's own token (actual), which its identity records"
        if self.actual and actual.numel() and not float(actual.max()) <= LOGPROB_SLACK:
            return "its actual tokens' log-probabilities are NaN or above 0"
        return self.features.problem(tensors, rows=len(offsets) - 1) if self.features is not None else None

    def rows(self, split: str, name: str, rows: list[int]) -> SparseTargets:
        """The targets of ``rows`` of one source's split, concatenated in order."""
        pieces, actual = [], []
        for row in rows:
            handle, offsets, index, _ = self._shard(split, name, row // self.shard_rows)
            i = row % self.shard_rows
            pieces.append(self.encoding.read(handle, index, i, offsets[i], offsets[i + 1]))
            if self.actual:  # each target's own token's log-probability (cache-teacher --any-tokenizer)
                actual.append(handle.get_slice("actual")[offsets[i] : offsets[i + 1]])
        joined = self.encoding.join(pieces)
        if self.actual:
            joined.actual = torch.cat(actual).float() if actual else torch.zeros(0)
        return joined

    def hidden(self, split: str, name: str, row: int) -> dict:
        """``{layer: [positions, dim]}`` float32: the teacher's stored hidden states of one row (:mod:`distill.stored_features`)."""
        handle, _, _, offsets = self._shard(split, name, row // self.shard_rows)
        i = row % self.shard_rows
        return self.features.read(handle, offsets[i], offsets[i + 1])


def open_store(cfg, setup, *, quiet: bool = False) -> "Store":
    """The teacher store of ``teacher.cache`` (or the one built for this job), checked against the job before step 0."""

    pairing = setup.pairing  # a student of another tokenizer reads the store of the teacher's own rows (data.tokenize by_teacher)
    ident = (identity(cfg, pairing.teacher, setup.sources, k=None, vocab=None, fields=TEACHER_ROWS) if pairing is not None
             else identity(cfg, setup.tokenizer, setup.sources, k=None, vocab=None))
    path = cfg.teacher.cache or find(ident, actual=pairing is not None)
    if not path:
        raise ConfigError(f"teacher.source=cache: no teacher store for this job's teacher and data under {cache_root()}; "
                          "build one with distill cache-teacher CONFIG, or set teacher.cache")
    store = Store(Path(os.path.expanduser(str(path))), ident)
    if pairing is not None:
        if not store.actual:
            raise ConfigError(f"teacher.cache: the store at {store.path} holds only the top-{store.k} of each position, and a student of another "
                              "tokenizer also needs the teacher's probability of each actual token; rebuild it with distill cache-teacher --any-tokenizer")
        if store.vocab != pairing.teacher_width:
            raise ConfigError(f"teacher.cache: the store holds {store.vocab} ids, the teacher's tokenizer {pairing.teacher_width}; rebuild it with this teacher")
    elif setup.task.width(setup.student) < store.vocab:
        raise ConfigError(f"the student's vocabulary ({setup.task.width(setup.student)}) is smaller than the store's ({store.vocab}); use a matching student")
    else:
        setup.vocab = store.vocab
    if not quiet:
        held = {"top_k": f"top-{store.k}", "sampled": f"{store.k} sampled", "mixed": f"top-{store.k // 2} and {store.k - store.k // 2} sampled"}[store.method]
        print(f"teacher: store {store.path} ({held} of {store.vocab} ids, {store.encoding_name}); the teacher model is not loaded for training", file=sys.stderr)
    return store


def find(ident: dict, *, actual: bool = False) -> Path | None:
    """A complete store under :func:`cache_root` built for this job (any k): top-k before mixed before sampled targets, the largest k first,
    the finest encoding first, then one with the teacher's hidden states. ``actual``: only a store holding each target's own token's
    log-probability (what a student of another tokenizer needs)."""
    root = cache_root()
    found = []
    for manifest in root.glob("*/manifest.json") if root.is_dir() else ():
        try:
            stored = json.loads(manifest.read_text())["identity"]
        except (OSError, ValueError, KeyError):
            continue
        if not differences(stored, as_stored(ident, stored)) and (stored["targets"].get("actual") or not actual):
            targets = stored["targets"]
            encoding = targets.get("encoding") or DEFAULT_ENCODING
            precision = ENCODINGS[encoding].precision if encoding in ENCODINGS else -1  # then the finer encoding; one this version cannot read, last
            found.append((PREFERENCE.index(targets.get("method", "top_k")), targets["k"], precision, "features" in stored, manifest.parent))
    return max(found)[-1] if found else None


def store_for(cfg) -> Path | None:
    """The complete store under :func:`cache_root` built for ``cfg``'s teacher and data, if any
    (the tokenizer and data are read to compute the identity; no model is loaded)."""

    setup = Setup(cfg, torch.device("cpu"), load_teacher=False, load_student=False)
    return find(identity(cfg, setup.tokenizer, setup.sources, k=None, vocab=None))
