"""Teacher sources (``teacher.source``): ``signal(batch, wants) -> TeacherOutputs``.

The training loop never knows where the teacher's signal comes from. ``model`` runs the frozen
teacher in this process; ``cache`` reads its precomputed top-k targets from a store
(:mod:`distill.store`); ``remote`` asks a teacher pool for them (:mod:`distill.service`).

Each kind declares what it needs and can do (``runs_teacher``, ``prefetches``, ``scores_new_text``),
opens what it reads before step 0 (:meth:`TeacherSource.open`: a store, a pool's client) and refuses an
objective it cannot serve. A source that answers late (``remote``) also has ``prefetch(batches)``, called
by the loop as soon as it knows the micro-batches of a coming step, and ``wait(batches)``, which blocks
until their targets are here (or returns why they cannot come).
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from distill import service, store as stores
from distill.aligned_terms import Paired, densified
from distill.errors import ConfigError, TeacherUnavailable
from distill.feature_terms import HIDDEN
from distill.losses import IGNORE_INDEX
from distill.objective import TeacherOutputs, check_sampled_targets
from distill.sparse import SparseTargets


class TeacherSource:
    """Where the teacher's signal for a batch comes from (``teacher.source``). A kind declares what it
    can do: ``prefetches`` (asked ahead of the step, so the loop waits for it apart), ``scores_new_text``
    (it can answer text it has not seen before, which a store cannot)."""

    kind = ""
    runs_teacher = True  # the teacher model runs in the training processes (which then load it)
    prefetches = False
    scores_new_text = True

    @classmethod
    def open(cls, cfg, setup, *, quiet: bool = False):
        """What the signal is read from (a store, a pool's client), opened and checked against the job before step 0; None when nothing is."""
        return None

    @classmethod
    def check_objective(cls, opened, objective) -> None:
        """Refuses, in one line, an objective that what was opened cannot serve."""

    @classmethod
    def build(cls, *, model, task, vocab: int, qkv_layers: set[int], opened, source_names, tail: str) -> "TeacherSource":
        raise NotImplementedError

    def signal(self, batch: dict, wants: frozenset) -> TeacherOutputs:
        raise NotImplementedError

    def prefetch(self, batches: list[dict]) -> None:
        """Asks for the signal of ``batches`` ahead of time (``prefetches`` sources)."""

    def wait(self, batches: list[dict]) -> Exception | None:
        """Blocks until the signal of ``batches`` is here; the source's failure is returned, not raised."""
        return None

    def transfer_summary(self) -> str:
        """What the signal cost to fetch, for the line a late source prints after training ("" when nothing)."""
        return ""

    def close(self) -> None:
        """Releases what the source holds (threads, connections)."""


class ModelSource(TeacherSource):
    """The frozen teacher model, forwarded in this process without autograd."""

    kind = "model"

    @classmethod
    def build(cls, *, model, task, vocab, qkv_layers, opened, source_names, tail):
        return cls(model, task, vocab, qkv_layers)

    def __init__(self, model, task, vocab: int, qkv_layers: set[int] = frozenset()):
        self.model, self.task, self.vocab, self.qkv_layers = model, task, vocab, qkv_layers

    def signal(self, batch: dict, wants: frozenset) -> TeacherOutputs:
        if not wants:
            return TeacherOutputs()
        if "teacher_input_ids" in batch:  # it tokenizes differently (distill.pairing): its logits on its own tokens
            with torch.no_grad():
                logits = self.model(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
            return TeacherOutputs(paired=Paired(logits[:, :-1], batch["teacher_input_ids"], batch["teacher_groups"], batch["input_ids"], batch["groups"],
                                                batch.get("inside")))
        # no_grad rather than inference_mode: autograd may save these tensors for the student's
        # backward, which inference tensors forbid (and cloning them would copy the logits).
        with torch.no_grad():
            return self.task.outputs(self.model, batch, wants, self.vocab, self.qkv_layers)


class CacheSource(TeacherSource):
    """A teacher store (:mod:`distill.store`): the top-k targets of each batch row, read by the row's
    (source, index), so any stream order, resume point or world size reads the right ones."""

    kind = "cache"
    runs_teacher = False
    scores_new_text = False

    @classmethod
    def open(cls, cfg, setup, *, quiet=False):
        return stores.open_store(cfg, setup, quiet=quiet)

    @classmethod
    def check_objective(cls, opened, objective):
        if opened.method != "top_k":
            check_sampled_targets(objective)

    @classmethod
    def build(cls, *, model, task, vocab, qkv_layers, opened, source_names, tail):
        return cls(opened, task, list(source_names), tail=tail)

    def __init__(self, store, task, source_names: list[str], split: str = "training", tail: str = "bucket"):
        self.store, self.task, self.names, self.split, self.tail = store, task, source_names, split, tail

    def signal(self, batch: dict, wants: frozenset) -> TeacherOutputs:
        if not wants:
            return TeacherOutputs()
        rows = batch["rows"].tolist()
        device = batch["input_ids"].device
        if "teacher_input_ids" in batch:  # a student of another tokenizer (distill.pairing): the rows are the teacher's, as stored
            return TeacherOutputs(paired=paired_from(batch, self._targets(rows).to(device), self.store.vocab, "teacher.cache: the store holds",
                                                     "it was built for other sequences: run distill cache-teacher with this config"))
        hidden = self._hidden(batch, rows) if HIDDEN in wants else None
        if not wants - {HIDDEN}:
            return TeacherOutputs(hidden_states=hidden)
        sparse = self._targets(rows)
        expected = self.task.target_count(batch)
        if len(sparse) != expected:
            raise ConfigError(f"teacher.cache: the store holds {len(sparse)} targets for a batch that has {expected}; "
                              "it was built for other sequences: run distill cache-teacher with this config")
        return TeacherOutputs(sparse=sparse.to(device), hidden_states=hidden)

    def _targets(self, rows: list) -> SparseTargets:
        """The stored targets of the batch's rows ((source, index) each), in order."""
        return SparseTargets.cat([self.store.rows(self.split, self.names[source], [index]) for source, index in rows], self.tail)

    def _hidden(self, batch: dict, rows: list) -> dict:
        """``{layer: [B, S, dim]}``: the stored hidden states of the batch's rows, at their positions (zero at padding)."""
        held = [self.store.hidden(self.split, self.names[source], index) for source, index in rows]
        try:
            return self.store.features.laid_out(held, batch["attention_mask"].sum(-1).tolist(), tuple(batch["input_ids"].shape), batch["input_ids"].device)
        except ValueError as err:
            raise ConfigError(f"teacher.cache: the store holds {err}; it was built for other sequences: run distill cache-teacher with this config") from None


class RemoteSource(TeacherSource):
    """A teacher pool (``distill serve-teacher``): each micro-batch's targets are requested over HTTP,
    ahead of time when the loop calls :meth:`prefetch`, and matched to the batch by its contents."""

    kind = "remote"
    runs_teacher = False
    prefetches = True

    @classmethod
    def open(cls, cfg, setup, *, quiet=False):
        return service.open_pool(cfg, setup, quiet=quiet)

    @classmethod
    def check_objective(cls, opened, objective):
        opened.hidden = HIDDEN in objective.wants  # each request then asks for the rows' hidden states (the objective was built from them)

    @classmethod
    def build(cls, *, model, task, vocab, qkv_layers, opened, source_names, tail):
        return cls(opened, task, tail=tail)

    def __init__(self, client, task, tail: str = "bucket", workers: int = 4):
        self.client, self.task, self.tail = client, task, tail
        self.requests = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="teacher-request")
        self.pending: dict = {}  # batch digest -> Future of (SparseTargets, the answer's tensors, bytes on the wire)
        self.lock = threading.Lock()
        self.wire_bytes = self.targets = 0

    @staticmethod
    def _digest(batch: dict) -> str:
        digest = hashlib.sha1()
        for name in ("input_ids", "labels"):
            digest.update(batch[name].detach().to("cpu").numpy().tobytes())
        return digest.hexdigest()

    def _future(self, batch: dict, *, take: bool):
        key = self._digest(batch)
        # A student of another tokenizer (distill.pairing): the pool scores the teacher's rows of the same text.
        fields = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels") if "teacher_input_ids" in batch else ("input_ids", "attention_mask", "labels")
        with self.lock:
            future = self.pending.pop(key, None) if take else self.pending.get(key)
            if future is None:
                future = self.requests.submit(self.client.signal, {name: batch[field].to("cpu") for name, field in
                                                                    zip(("input_ids", "attention_mask", "labels"), fields)})
                if not take:
                    self.pending[key] = future
        return future

    def prefetch(self, batches: list[dict]) -> None:
        for batch in batches:
            self._future(batch, take=False)

    def wait(self, batches: list[dict]) -> Exception | None:
        """Blocks until the targets of ``batches`` are here; returns the pool's failure instead of raising it
        (the loop first agrees with the other processes, then saves a checkpoint)."""
        for batch in batches:
            try:
                self._future(batch, take=False).result()
            except TeacherUnavailable as err:
                return err
        return None

    def signal(self, batch: dict, wants: frozenset) -> TeacherOutputs:
        if not wants:
            return TeacherOutputs()
        sparse, tensors, size = self._future(batch, take=True).result()
        if "teacher_input_ids" in batch:
            paired = paired_from(batch, sparse.to(batch["input_ids"].device), self.client.vocab, "teacher.url: the pool answered",
                                 "start it with this job's teacher")
            self.wire_bytes, self.targets = self.wire_bytes + size, self.targets + len(sparse)
            return TeacherOutputs(paired=paired)
        expected = self.task.target_count(batch)
        if len(sparse) != expected:
            raise ConfigError(f"teacher.url: the pool answered {len(sparse)} targets for a batch that has {expected}; "
                              "it serves another task or masking: start it with this job's config")
        self.wire_bytes, self.targets = self.wire_bytes + size, self.targets + expected
        sparse.tail_mode = self.tail
        hidden = self._hidden(batch, tensors) if HIDDEN in wants else None
        return TeacherOutputs(sparse=sparse.to(batch["input_ids"].device), hidden_states=hidden)

    def _hidden(self, batch: dict, tensors: dict) -> dict:
        """``{layer: [B, S, dim]}``: the hidden states the pool answered for the batch's rows, at their positions."""
        features, offsets = self.client.features, tensors["hidden_offsets"].tolist()
        rows = [features.read(tensors, offsets[i], offsets[i + 1]) for i in range(len(offsets) - 1)]
        try:
            return features.laid_out(rows, batch["attention_mask"].sum(-1).tolist(), tuple(batch["input_ids"].shape), batch["input_ids"].device)
        except ValueError as err:
            raise ConfigError(f"teacher.url: the pool answered {err}; start it with this job's config") from None

    def transfer_summary(self) -> str:
        return f", {self.wire_bytes / self.targets:.0f} bytes per target token on the wire" if self.targets else ""

    def close(self) -> None:
        self.requests.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def paired_from(batch: dict, sparse: SparseTargets, width: int, holder: str, remedy: str) -> Paired:
    """The teacher's signal of a batch tokenized by both (:mod:`distill.pairing`) from its sparse targets of the teacher's rows (a
    store's, a pool's), laid out as the in-process teacher gives it (:func:`distill.aligned_terms.densified`)."""
    labels = batch["teacher_labels"][:, 1:]
    expected = int((labels != IGNORE_INDEX).sum())
    if len(sparse) != expected:
        raise ConfigError(f"{holder} {len(sparse)} targets for a batch whose teacher rows have {expected}; {remedy}")
    log_p, known = densified(sparse, labels, width)
    return Paired(log_p, batch["teacher_input_ids"], batch["teacher_groups"], batch["input_ids"], batch["groups"], batch.get("inside"), known)


SOURCES = {ModelSource.kind: ModelSource, CacheSource.kind: CacheSource, RemoteSource.kind: RemoteSource}


def build_source(kind: str, model, task, vocab: int, qkv_layers: set[int] = frozenset(), *, opened=None, source_names=(),
                 tail: str = "bucket") -> TeacherSource:
    """The ``teacher.source`` kind's source: the in-process model, or what :meth:`TeacherSource.open` opened (a store, a pool's client)."""
    return SOURCES[kind].build(model=model, task=task, vocab=vocab, qkv_layers=qkv_layers, opened=opened, source_names=source_names, tail=tail)
