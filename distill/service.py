"""The teacher as a service: the protocol of ``distill serve-teacher`` (the pool) and its client (``teacher.source: remote``).

One teacher process serves the targets of many student processes (the ranks of a job, the runs
of a sweep), in the store's format (:mod:`distill.store`): per target token, the teacher's top-k
ids and log-probabilities at temperature 1 and the log of the mass outside them.

The protocol is HTTP/1.1 (uvicorn and Starlette on the server, httpx on the client):

- ``GET /healthz``: 200 while the process runs; ``GET /readyz``: 200 once the teacher is loaded,
  else 503. Neither needs the token nor says anything about the teacher.
- ``GET /v1/identity``: JSON ``{"key", "identity", "engine", "limits"}``. ``identity`` is the
  store's teacher identity (weights, quantization, tokenizer, task) plus ``targets`` (k, vocab);
  a student whose job differs is refused before step 0, naming the fields.
- ``POST /v1/targets``: body a safetensors file of the collated batch (``input_ids``,
  ``attention_mask``, ``labels``: ``[B, L]`` integers); answer a store shard's bytes (``ids``,
  ``logprobs``, ``tail``, ``offsets``) for the batch's targets, row by row.
- ``GET /metrics``: Prometheus text (requests, target tokens, batches and their rows, queue and
  compute seconds).

Every endpoint but the two probes needs ``Authorization: Bearer TOKEN`` when the server has a
token, compared in constant time. A server that binds anything but loopback must have one. The
token comes from ``--token-file`` or ``$DISTILL_TEACHER_TOKEN``, never the command line or the
config, and is never printed. Request bodies are bounded (``--max-request-mb``, ``--max-tokens``),
and a malformed request gets a 4xx reply with a one-line reason, never a crash.

The server (engines, dynamic batching) is :mod:`distill.serve`.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from distill.errors import ConfigError, TeacherUnavailable

PROTOCOL = 1
TOKEN_ENV = "DISTILL_TEACHER_TOKEN"
BATCH_FIELDS = ("input_ids", "attention_mask", "labels")


class BadRequest(Exception):
    """A request the server refuses: ``status`` and a one-line reason for the client."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


# ----- the token ------------------------------------------------------------------------------------------------------------------


def read_token(token_file: str | None, *, what: str) -> str | None:
    """The token of ``token_file``, else of ``$DISTILL_TEACHER_TOKEN``, else None; ``what`` names the option."""
    if token_file:
        path = Path(os.path.expanduser(token_file))
        try:
            token = path.read_text().strip()
        except OSError as err:
            raise ConfigError(f"{what}: cannot read the token file {path} ({err.strerror})") from None
        if not token:
            raise ConfigError(f"{what}: the token file {path} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ----- the wire format ------------------------------------------------------------------------------------------------------------


def encode_batch(batch: dict) -> bytes:
    """A collated batch's fields the teacher needs, as safetensors bytes (int32: ids fit, and half of int64 on the wire)."""
    import torch  # this module stays free of torch until it is needed
    from safetensors.torch import save  # this module stays free of safetensors until it is needed

    return save({name: batch[name].to("cpu", torch.int32).contiguous() for name in BATCH_FIELDS})


def decode_targets(body: bytes):
    """The :class:`distill.sparse.SparseTargets` of an answer (the store's shard layout)."""
    return decode_answer(body)[0]


def decode_answer(body: bytes):
    """(the :class:`distill.sparse.SparseTargets` of an answer, and its tensors: a store's shard, hidden states included when asked)."""
    from safetensors.torch import load  # this module stays free of safetensors until it is needed

    from distill.sparse import SparseTargets  # loads torch: this module stays torch-free until it is needed

    tensors = load(body)
    actual = tensors["actual"].float() if "actual" in tensors else None  # each target's own token's log-probability (a builtin pool's)
    return SparseTargets(tensors["ids"], tensors["logprobs"], tensors["tail"], actual=actual), tensors


@dataclass
class Limits:
    max_request_bytes: int = 64 << 20
    max_tokens: int = 1 << 17  # rows x length of one request
    max_batch_tokens: int = 1 << 15  # rows x length of one forward of the builtin engine


def decode_batch(body: bytes, *, vocab_rows: int, max_length: int, limits: Limits) -> dict:
    """A request's batch, checked so that nothing in it can crash or exhaust the teacher; raises :class:`BadRequest`."""
    import torch  # this module stays free of torch until it is needed
    from safetensors import SafetensorError  # this module stays free of safetensors until it is needed
    from safetensors.torch import load  # this module stays free of safetensors until it is needed

    from distill.losses import IGNORE_INDEX  # loads torch: this module stays torch-free until it is needed

    try:
        tensors = load(body)
    except (SafetensorError, ValueError, RuntimeError, OSError) as err:
        raise BadRequest(400, f"the body is not a safetensors batch ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    missing = [name for name in BATCH_FIELDS if name not in tensors]
    if missing:
        raise BadRequest(400, f"the batch lacks {', '.join(missing)} (needs {', '.join(BATCH_FIELDS)})")
    shape = tensors["input_ids"].shape
    for name in BATCH_FIELDS:
        t = tensors[name]
        if t.dim() != 2 or t.shape != shape or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise BadRequest(400, f"{name} must be a [rows, length] integer tensor shaped like input_ids {list(shape)}, got {t.dtype} {list(t.shape)}")
    rows, length = shape
    if rows == 0 or length == 0:
        raise BadRequest(400, "the batch is empty")
    if rows * length > limits.max_tokens:
        raise BadRequest(413, f"the batch has {rows * length} tokens, more than the server's limit of {limits.max_tokens} per request")
    if length > max_length:
        raise BadRequest(400, f"sequences of {length} tokens are longer than the teacher's {max_length} positions")
    ids, mask, labels = (tensors[name].long() for name in ("input_ids", "attention_mask", "labels"))
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_rows:
        raise BadRequest(400, f"input_ids must be in [0, {vocab_rows}) (the teacher's embedding rows)")
    if not bool(((labels == IGNORE_INDEX) | ((labels >= 0) & (labels < vocab_rows))).all()):
        raise BadRequest(400, f"labels must be {IGNORE_INDEX} or in [0, {vocab_rows})")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise BadRequest(400, "attention_mask must hold 0 and 1")
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----- the client -----------------------------------------------------------------------------------------------------------------


class Client:
    """Asks the pool for targets; retries a pool that does not answer (restarting, overloaded)
    with backoff for up to ``timeout`` seconds, then raises :class:`TeacherUnavailable`.

    Several URLs are used in turn, one request each, skipping one that fails.
    """

    def __init__(self, urls: list[str], token: str | None, *, timeout: float, request_timeout: float = 600.0):
        import httpx  # start-up time: httpx loads only when this runs

        self.urls, self.timeout, self._next = [u.rstrip("/") for u in urls], timeout, 0
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(request_timeout, connect=10.0),
                                 limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))
        self._lock = threading.Lock()
        self.features = None  # the hidden states the pool serves (distill.stored_features.StoredFeatures), set by open_pool
        self.hidden = False  # whether each request asks for them (the job's objective needs them)
        self.vocab = None  # the ids the pool's targets are over (set by open_pool)

    def close(self) -> None:
        self.http.close()

    def _url(self) -> str:
        with self._lock:
            url = self.urls[self._next % len(self.urls)]
            self._next += 1
            return url

    def _call(self, method: str, path: str, *, member: str | None = None, **kwargs):
        """The answer of the first pool member that gives one (of ``member`` only, when given); retries until ``timeout``."""
        import httpx  # start-up time: httpx loads only when this runs

        deadline, delay, last = time.monotonic() + self.timeout, 0.25, ""
        while True:
            url = member.rstrip("/") if member else self._url()
            try:
                answer = self.http.request(method, url + path, **kwargs)
            except httpx.HTTPError as err:  # refused, reset, killed mid-request, timed out: the pool may be restarting
                last = f"{url}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
            else:
                if answer.status_code == 401:
                    raise ConfigError(f"teacher.url: {url} refused the token; set teacher.token_file (or ${TOKEN_ENV}) to the pool's token")
                if answer.status_code in (400, 404, 413):
                    raise ConfigError(f"teacher.url: {url} refused the request ({answer.status_code}): {_reason(answer)}")
                if answer.status_code < 300:
                    return answer
                last = f"{url}: {answer.status_code} {_reason(answer)}"  # 503 loading, 500 a failed batch: retried
            if time.monotonic() + delay > deadline:
                raise TeacherUnavailable(f"teacher.url: the teacher pool gave no answer for {self.timeout:g} s (last: {last}); "
                                         "restart it (distill serve-teacher) or raise teacher.remote_timeout")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def identity(self, member: str) -> dict:
        """``member``'s ``/v1/identity`` answer."""
        answer = self._call("GET", "/v1/identity", member=member)
        try:
            return answer.json()
        except ValueError:
            raise ConfigError(f"teacher.url: {answer.url} is not a distill teacher service (no identity)") from None

    def targets(self, batch: dict):
        answer = self._call("POST", "/v1/targets", content=encode_batch(batch), headers={"content-type": "application/octet-stream"})
        return decode_targets(answer.content), len(answer.content)

    def signal(self, batch: dict):
        """(targets, the answer's tensors, bytes on the wire) of ``batch``; the tensors hold its rows' hidden states when :attr:`hidden`."""
        answer = self._call("POST", "/v1/targets", content=encode_batch(batch), headers={"content-type": "application/octet-stream"},
                            params={"hidden": "1"} if self.hidden else None)
        targets, tensors = decode_answer(answer.content)
        return targets, tensors, len(answer.content)


def probe(urls: str, timeout: float = 5.0) -> int:
    """0 when every member of ``urls`` (comma-separated) answers ``/readyz`` with 200, else 1; for
    scripts that wait for a pool (slurm/teacher_pool.sbatch). Standard library only: it starts fast."""

    for url in urls.split(","):
        try:
            with urllib.request.urlopen(url.strip().rstrip("/") + "/readyz", timeout=timeout) as answer:
                if answer.status != 200:
                    return 1
        except (OSError, ValueError):  # refused, unreachable, 503 while loading (HTTPError is an OSError)
            return 1
    return 0


def _reason(answer) -> str:
    try:
        return str(answer.json().get("error", ""))[:300]
    except ValueError:
        return answer.text[:300].strip()


def open_pool(cfg, setup, *, quiet: bool = False) -> "Client":
    """A client of the teacher pool at ``teacher.url``, after checking (before step 0) that every
    member serves this job's teacher, tokenizer and task."""
    from distill import models, store as stores  # load torch: this module stays torch-free until it is needed

    urls = [url.strip() for url in cfg.teacher.url.split(",") if url.strip()]
    client = Client(urls, read_token(cfg.teacher.token_file, what="teacher.token_file"), timeout=cfg.teacher.remote_timeout)
    pairing = setup.pairing  # a student of another tokenizer: the pool scores the teacher's own tokens of the same text
    job = stores.teacher_identity(cfg, setup.tokenizer if pairing is None else pairing.teacher)
    served = first = None
    for url in urls:
        answer = client.identity(url)
        served = answer.get("identity") if isinstance(answer, dict) else None
        if not isinstance(served, dict) or "targets" not in served:
            raise ConfigError(f"teacher.url: {url} is not a distill teacher service (its /v1/identity has no identity)")
        diff = stores.differences(served, stores.as_stored(job, served))
        if diff:
            raise ConfigError(f"teacher.url: the pool at {url} serves another teacher: {stores.describe(diff, served, stores.as_stored(job, served), theirs='pool')}; "
                              "start it with this job's config (distill serve-teacher CONFIG)")
        first = first or served
        if served.get("features") != first.get("features"):
            raise ConfigError(f"teacher.url: the pool's members serve different hidden states ({urls[0]} and {url}); start them with the same --hidden-* options")
    if "features" in served:
        from distill.stored_features import StoredFeatures  # loads torch: this module stays torch-free until it is needed

        projection = client._call("GET", "/v1/features").content if served["features"]["projection"] else None
        client.features = StoredFeatures.described(served["features"], projection)
        if client.features is None:
            raise ConfigError("teacher.url: the pool's projection of its hidden states does not match the sha256 it publishes; restart the pool")
    client.vocab = vocab = int(served["targets"]["vocab"])
    if pairing is not None:
        if not served["targets"].get("actual"):
            raise ConfigError(f"teacher.url: the pool answers only the top-{served['targets']['k']} of each position, and a student of another "
                              "tokenizer also needs the teacher's probability of each actual token; serve it with distill serve-teacher --engine builtin")
        if vocab != pairing.teacher_width:
            raise ConfigError(f"teacher.url: the pool's targets are over {vocab} ids, the teacher's tokenizer has {pairing.teacher_width}; "
                              "start it with this job's teacher")
    elif models.output_vocab(setup.student) < vocab:
        raise ConfigError(f"the student's vocabulary ({models.output_vocab(setup.student)}) is smaller than the pool's ({vocab}); use a matching student")
    else:
        setup.vocab = vocab
    if not quiet:
        print(f"teacher: pool {', '.join(urls)} ({answer.get('engine')} engine, top-{served['targets']['k']} of {vocab} ids, key "
              f"{str(answer.get('key'))[:16]}); the teacher model is not loaded for training", file=sys.stderr)
    return client
