"""``distill serve-teacher``: the teacher pool's server (the protocol and the client are in :mod:`distill.service`).

The builtin engine batches concurrent requests dynamically: one worker thread takes every request
waiting (up to ``--max-batch-tokens``), pads them to one batch, runs the teacher once and splits
the targets. The vLLM engine asks vLLM for each prompt's ``prompt_logprobs`` (a GPU and
``pip install vllm``); its continuous batching serves the concurrent requests.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import math
import os
import queue
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from distill import extras
from distill.config import load_config
from distill.errors import ConfigError, main_guard
from distill.rundir import write_atomic
from distill.service import BATCH_FIELDS, PROTOCOL, TOKEN_ENV, BadRequest, Limits, decode_batch, is_loopback, read_token

# ----- engines --------------------------------------------------------------------------------------------------------------------


class BuiltinEngine:
    """The teacher in this process (transformers + torch), as the trainer's in-process source runs it."""

    name = "builtin"

    def __init__(self, cfg, k: int, device, hidden: dict | None = None, log=print):
        from distill import models  # loads torch: this module stays torch-free until it is needed
        from distill.tasks import build_task  # loads torch: this module stays torch-free until it is needed
        from distill.teacher_source import ModelSource  # loads torch: this module stays torch-free until it is needed

        self.task = build_task(cfg.task)
        if not self.task.token_targets:
            raise ConfigError(f"task.kind={self.task.kind}: the teacher service serves token targets of language models (causal_lm, masked_lm)")
        tokenizer, teacher_tokenizer, difference = models.job_tokenizers(cfg)
        tokenizer = teacher_tokenizer if difference else tokenizer  # a config of a student that tokenizes otherwise: the teacher's own tokens
        self.teacher = models.load_teacher(cfg.teacher, device, model_class=self.task.auto_class)
        self.vocab = min(models.output_vocab(self.teacher), len(tokenizer))
        self.identity = _served_identity(cfg, tokenizer, k, self.vocab)
        if self.task.kind == "causal_lm":  # each answer keeps its targets' own tokens' log-probabilities: students of any tokenizer read it
            self.identity["targets"]["actual"] = True
        self.k, self.device, self.pad_id = k, device, tokenizer.pad_token_id
        self.embedding_rows = self.teacher.get_input_embeddings().weight.shape[0]
        self.max_length = getattr(self.teacher.config, "max_position_embeddings", None) or 1 << 20
        self.source = ModelSource(self.teacher, self.task, self.vocab)
        self.features = None  # the hidden states it serves on request (--hidden-layers), fitted as cache-teacher fits a store's
        if hidden:
            from distill.cache_teacher import fitted_features  # loads torch: this module stays torch-free until it is needed
            from distill.setup import Setup  # loads torch: this module stays torch-free until it is needed

            sequences = Setup(cfg, device, load_teacher=False, load_student=False).sources[0][2]
            self.features = fitted_features(self.source, sequences, self.pad_id, hidden["layers"], hidden["dim"], hidden["dtype"],
                                            cfg.train.micro_batch_size, device, log)
            self.identity["features"] = self.features.identity()

    def targets(self, batch: dict):
        """(SparseTargets on the CPU, each row's target count) of a checked batch."""
        return self.signal(batch)[:2]

    def signal(self, batch: dict, hidden: bool = False):
        """:meth:`targets`, and with ``hidden`` the rows' hidden states' tensors as a store's shard holds them (``{}`` without)."""
        from distill.cache_teacher import batch_signal  # loads torch: this module stays torch-free until it is needed

        batch = {name: t.to(self.device) for name, t in batch.items()}
        return batch_signal(self.source, self.task, batch, self.vocab, self.k, features=self.features if hidden else None,
                            actual=self.task.kind == "causal_lm")


def _served_identity(cfg, tokenizer, k: int, vocab: int) -> dict:
    """What an engine serves (published at /v1/identity): the store's teacher identity and the targets."""
    from distill.store import teacher_identity  # loads torch: this module stays torch-free until it is needed

    if not 0 < k <= vocab:
        raise ConfigError(f"--top-k {k} must be between 1 and the vocabulary size ({vocab})")
    return {**teacher_identity(cfg, tokenizer), "targets": {"method": "top_k", "k": k, "vocab": vocab}}


class VllmEngine:
    """The teacher in vLLM: each row a prompt whose ``prompt_logprobs`` (top k, raw model
    log-probabilities) are the targets; vLLM batches the rows and concurrent requests itself.

    vLLM refuses more log-probabilities per position than its ``max_logprobs`` (20 by default);
    the engine raises it to k. Its log-probabilities are the model's raw ones (``logprobs_mode``
    raw_logprobs, vLLM's default), at temperature 1 as the store's. It serves causal LMs, in full
    precision or quantized to 4 bits in flight (vLLM's bitsandbytes support has no 8-bit mode).
    """

    name = "vllm"

    features = None  # vLLM gives no hidden states

    def __init__(self, cfg, k: int, device, hidden: dict | None = None, log=print):
        import torch  # this module stays free of torch until it is needed

        try:
            from vllm import LLM  # optional dependency (distill[vllm])
        except ImportError:
            raise ConfigError("--engine vllm needs vLLM (pip install vllm) on a CUDA machine; use --engine builtin") from None
        if not torch.cuda.is_available():
            raise ConfigError("--engine vllm needs a CUDA GPU; use --engine builtin")
        if cfg.task.kind != "causal_lm":
            raise ConfigError(f"--engine vllm serves causal LMs; task.kind={cfg.task.kind} needs --engine builtin")
        if hidden:
            raise ConfigError("--hidden-layers: vLLM gives no hidden states; serve them with --engine builtin")
        from distill import models  # loads torch: this module stays torch-free until it is needed

        tokenizer = models.load_tokenizer(cfg.teacher.path, "teacher.path", cfg.teacher.revision)
        config = models.teacher_config(cfg.teacher)
        self.vocab = min(config.vocab_size, len(tokenizer))
        self.identity = _served_identity(cfg, tokenizer, k, self.vocab)
        self.k, self.pad_id = k, tokenizer.pad_token_id
        self.embedding_rows, self.max_length = config.vocab_size, getattr(config, "max_position_embeddings", None) or 1 << 20
        if cfg.teacher.quantization == "8bit":
            raise ConfigError("--engine vllm quantizes a teacher in flight to 4 bits only (bitsandbytes); set teacher.quantization to 4bit or none, "
                              "or use --engine builtin")
        quantization = "bitsandbytes" if cfg.teacher.quantization == "4bit" else None
        # Every GPU the pool member sees, through tensor parallelism (the builtin engine uses the first one).
        self.llm = LLM(model=os.path.expanduser(cfg.teacher.path), revision=cfg.teacher.revision, dtype=cfg.teacher.dtype,
                       quantization=quantization, max_logprobs=k, skip_tokenizer_init=True, enable_prefix_caching=False,
                       tensor_parallel_size=torch.cuda.device_count())

    def signal(self, batch: dict, hidden: bool = False):
        return (*self.targets(batch), {})

    def targets(self, batch: dict):
        import torch  # this module stays free of torch until it is needed
        from vllm import SamplingParams  # optional dependency (distill[vllm])

        from distill.losses import IGNORE_INDEX  # loads torch: this module stays torch-free until it is needed
        from distill.sparse import SparseTargets  # loads torch: this module stays torch-free until it is needed

        params = SamplingParams(max_tokens=1, prompt_logprobs=self.k, detokenize=False)
        lengths = batch["attention_mask"].sum(-1).tolist()
        prompts = [{"prompt_token_ids": batch["input_ids"][i, :n].tolist()} for i, n in enumerate(lengths)]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        ids, logprobs, tails, counts = [], [], [], []
        for i, out in enumerate(outputs):
            targets = batch["labels"][i, 1:].tolist()
            count = 0
            for t, label in enumerate(targets):
                if label == IGNORE_INDEX:
                    continue
                # prompt_logprobs[t + 1]: the distribution of the token at t + 1 given tokens 0..t, as the
                # top-k entries (ranks 1..k) and the prompt's own token (any rank), which is dropped when not in the top k.
                entries = sorted(((v.rank, token, v.logprob) for token, v in out.prompt_logprobs[t + 1].items() if v.rank <= self.k))[: self.k]
                top = [lp for _, _, lp in entries]
                ids.append([token for _, token, _ in entries])
                logprobs.append(top)
                kept = sum(math.exp(lp) for lp in top)
                tails.append(math.log(max(1.0 - kept, 0.0)) if kept < 1.0 else float("-inf"))
                count += 1
            counts.append(count)
        k = self.k
        if not ids:
            return SparseTargets(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0)), counts
        return SparseTargets(torch.tensor(ids), torch.tensor(logprobs), torch.tensor(tails)), counts


ENGINES = {BuiltinEngine.name: BuiltinEngine, VllmEngine.name: VllmEngine}


# ----- dynamic batching -----------------------------------------------------------------------------------------------------------


@dataclass
class Stats:
    """What /metrics reports; updated under ``lock``."""

    requests: int = 0
    refused: dict = field(default_factory=dict)  # status -> count
    rows: int = 0
    tokens: int = 0  # target tokens answered
    batches: int = 0
    batch_rows_max: int = 0
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    started: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def prometheus(self) -> str:
        with self.lock:
            rate = self.tokens / self.compute_seconds if self.compute_seconds else 0.0
            lines = [
                ("distill_teacher_requests_total", "counter", "target requests answered", self.requests),
                ("distill_teacher_rows_total", "counter", "sequences answered", self.rows),
                ("distill_teacher_target_tokens_total", "counter", "target tokens answered", self.tokens),
                ("distill_teacher_batches_total", "counter", "teacher forwards (each serves one or more requests)", self.batches),
                ("distill_teacher_batch_rows_max", "gauge", "most sequences in one forward", self.batch_rows_max),
                ("distill_teacher_queue_seconds_total", "counter", "seconds requests waited for the teacher", self.queue_seconds),
                ("distill_teacher_compute_seconds_total", "counter", "seconds the teacher computed", self.compute_seconds),
                ("distill_teacher_tokens_per_second", "gauge", "target tokens per second of compute", rate),
                ("distill_teacher_uptime_seconds", "gauge", "seconds since the server started", time.time() - self.started),
            ]
            text = "".join(f"# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value:g}\n" for name, kind, help, value in lines)
            text += "# HELP distill_teacher_refused_total requests refused, by HTTP status\n# TYPE distill_teacher_refused_total counter\n"
            text += "".join(f'distill_teacher_refused_total{{status="{status}"}} {n}\n' for status, n in sorted(self.refused.items()))
            return text

    def refuse(self, status: int) -> None:
        with self.lock:
            self.refused[status] = self.refused.get(status, 0) + 1


class Batcher:
    """One worker thread in front of the engine: takes every request waiting (up to
    ``max_batch_tokens`` after padding), runs them as one batch, answers each its own rows."""

    def __init__(self, engine, stats: Stats, max_batch_tokens: int, *, start: bool = True):
        self.engine, self.stats, self.max_batch_tokens = engine, stats, max_batch_tokens
        self.waiting: queue.Queue = queue.Queue()
        self.held = None  # a request that did not fit the last batch: first in the next one
        if start:
            self.start()

    def start(self) -> None:
        threading.Thread(target=self._loop, name="teacher-batcher", daemon=True).start()

    def submit(self, batch: dict, hidden: bool = False):
        """A concurrent.futures.Future of the request's answer bytes (with ``hidden``, its rows' hidden states too)."""

        future = Future()
        self.waiting.put((batch, future, time.perf_counter(), hidden))
        return future

    def _take(self) -> list:
        taken = [self.held if self.held is not None else self.waiting.get()]
        self.held = None
        rows, width = taken[0][0]["input_ids"].shape
        while True:
            try:
                item = self.waiting.get_nowait()
            except queue.Empty:
                return taken
            r, w = item[0]["input_ids"].shape
            if (rows + r) * max(width, w) > self.max_batch_tokens:
                self.held = item
                return taken
            taken.append(item)
            rows, width = rows + r, max(width, w)

    def _loop(self) -> None:
        import torch  # this module stays free of torch until it is needed

        from safetensors.torch import save  # this module stays free of safetensors until it is needed

        from distill.sparse import shard_tensors  # loads torch: this module stays torch-free until it is needed
        from distill.stored_features import joined_features  # loads torch: this module stays torch-free until it is needed

        while True:
            taken = self._take()
            start = time.perf_counter()
            try:
                batch = _pad_cat([item[0] for item in taken], self.engine.pad_id)
                with torch.no_grad():
                    targets, counts, hidden = self.engine.signal(batch, hidden=any(item[3] for item in taken))
            except Exception as err:  # answered as a 500; the server keeps serving
                for _, future, _, _ in taken:
                    future.set_exception(err)
                continue
            seconds = time.perf_counter() - start
            first_row = first_target = first_position = 0
            lengths = batch["attention_mask"].sum(-1).tolist()
            for request, future, _, wants_hidden in taken:
                rows = request["input_ids"].shape[0]
                mine = counts[first_row : first_row + rows]
                n, positions = sum(mine), sum(lengths[first_row : first_row + rows])
                answer = shard_tensors(targets[first_target : first_target + n], mine, self.engine.vocab)
                if wants_hidden:  # the rows' positions of each layer, as a store's shard holds them
                    held = {name: values[first_position : first_position + positions] for name, values in hidden.items()}
                    answer.update(joined_features(self.engine.features, [held], lengths[first_row : first_row + rows]))
                future.set_result(save(answer))
                first_row, first_target, first_position = first_row + rows, first_target + n, first_position + positions
            with self.stats.lock:
                self.stats.queue_seconds += sum(start - queued for _, _, queued, _ in taken)
                self.stats.requests += len(taken)
                self.stats.rows += first_row
                self.stats.tokens += first_target
                self.stats.batches += 1
                self.stats.batch_rows_max = max(self.stats.batch_rows_max, first_row)
                self.stats.compute_seconds += seconds


def _pad_cat(batches: list[dict], pad_id: int) -> dict:
    """Requests right-padded to the longest and stacked (padding is masked, as data.collate pads)."""
    import torch  # this module stays free of torch until it is needed

    from distill.losses import IGNORE_INDEX  # loads torch: this module stays torch-free until it is needed

    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id if pad_id is not None else 0, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {name: torch.cat([torch.nn.functional.pad(b[name], (0, width - b[name].shape[1]), value=fill[name]) for b in batches])
            for name in BATCH_FIELDS}


# ----- the server -----------------------------------------------------------------------------------------------------------------


class Service:
    """The state the HTTP handlers share: the engine once loaded, the token, the limits, the stats."""

    def __init__(self, token: str | None, limits: Limits):
        self.token, self.limits, self.stats = token, limits, Stats()
        self.engine = self.batcher = None
        self.failed: BaseException | None = None

    def load(self, make_engine) -> None:
        from distill.store import key_of  # loads torch: this module stays torch-free until it is needed

        try:
            engine = make_engine()
            self.key = key_of(engine.identity)
            self.batcher = Batcher(engine, self.stats, self.limits.max_batch_tokens)
            self.engine = engine  # last: the handlers take a set engine for "ready"
        except BaseException as err:  # reported by the main thread, which stops the server
            self.failed = err

    def authorized(self, request) -> bool:
        if self.token is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        # Both sides as bytes of the same kind, compared in constant time (hmac.compare_digest).
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())

    def app(self):
        from starlette.applications import Starlette  # start-up time: starlette loads only when this runs
        from starlette.responses import JSONResponse, PlainTextResponse, Response  # start-up time: starlette loads only when this runs
        from starlette.routing import Route  # start-up time: starlette loads only when this runs

        def refuse(status: int, reason: str):
            self.stats.refuse(status)
            return JSONResponse({"error": reason}, status_code=status)

        def guarded(handler, *, needs_engine: bool = True):
            async def endpoint(request):
                if not self.authorized(request):
                    return refuse(401, "missing or wrong token (Authorization: Bearer ...)")
                if needs_engine and self.engine is None:
                    return refuse(503, "the teacher is loading")
                try:
                    return await handler(request)
                except BadRequest as err:
                    return refuse(err.status, str(err))
                except Exception as err:  # the engine failed on this batch; the server keeps serving
                    return refuse(500, f"the teacher failed on this batch: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            return endpoint

        async def healthz(request):
            return JSONResponse({"status": "alive"})

        async def readyz(request):
            if self.engine is None:
                return JSONResponse({"status": "loading"}, status_code=503)
            return JSONResponse({"status": "ready"})

        async def identity(request):
            return JSONResponse({"protocol": PROTOCOL, "key": self.key, "identity": self.engine.identity, "engine": self.engine.name,
                                 "limits": {"max_request_bytes": self.limits.max_request_bytes, "max_tokens": self.limits.max_tokens}})

        async def features(request):
            if self.engine.features is None or not self.engine.features.reduced:
                raise BadRequest(404, "this pool serves no projected hidden states")
            return Response(self.engine.features.projection_bytes(), media_type="application/octet-stream")

        async def metrics(request):
            return PlainTextResponse(self.stats.prometheus(), media_type="text/plain; version=0.0.4")

        async def targets(request):
            hidden = request.query_params.get("hidden") == "1"
            if hidden and self.engine.features is None:
                raise BadRequest(400, "this pool serves no hidden states; start it with distill serve-teacher --hidden-layers L,..")
            body = await _bounded_body(request, self.limits.max_request_bytes)
            batch = decode_batch(body, vocab_rows=self.engine.embedding_rows, max_length=self.engine.max_length, limits=self.limits)
            answer = await asyncio.wrap_future(self.batcher.submit(batch, hidden))
            return Response(answer, media_type="application/octet-stream", headers={"x-distill-key": self.key})

        return Starlette(routes=[
            Route("/healthz", healthz), Route("/readyz", readyz),
            Route("/v1/identity", guarded(identity)), Route("/metrics", guarded(metrics, needs_engine=False)),
            Route("/v1/targets", guarded(targets), methods=["POST"]), Route("/v1/features", guarded(features)),
        ])


async def _bounded_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadRequest(413, f"the request body ({declared} bytes) is larger than the server's limit of {limit} bytes")
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"the request body is larger than the server's limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def serve(cfg, *, host: str, port: int, token: str | None, engine: str = "builtin", k: int = 64, limits: Limits = Limits(),
          address_file: str | None = None, device=None, log=print, hidden: dict | None = None) -> int:
    """Binds, loads the teacher in the background (``/readyz`` turns 200), serves until SIGINT/SIGTERM."""

    import torch  # this module stays free of torch until it is needed
    import uvicorn  # start-up time: uvicorn loads only when this runs

    if not is_loopback(host) and token is None:
        raise ConfigError(f"--host {host} is not loopback: serving it needs a token; pass --token-file FILE or set {TOKEN_ENV}")
    from distill.setup import tune_cpu_allocator  # loads torch: this module stays torch-free until it is needed

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tune_cpu_allocator(cfg.train.cpu_allocator, device)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        raise ConfigError(f"--host {host} --port {port}: cannot bind ({err.strerror}); choose another --port") from None
    bound = sock.getsockname()[1]
    url = f"http://{'[' + host + ']' if family == socket.AF_INET6 else host}:{bound}"
    service = Service(token, limits)
    server = uvicorn.Server(uvicorn.Config(service.app(), log_level="warning", access_log=False, timeout_keep_alive=60,
                                           h11_max_incomplete_event_size=64 << 10))

    def load():
        service.load(lambda: ENGINES[engine](cfg, k, device, hidden, log))
        if service.failed is not None:
            server.should_exit = True
        else:
            log(f"serve-teacher: ready: {url} (engine {engine}, top-{k} of {service.engine.vocab} ids, key {service.key[:16]}, "
                f"{'token required' if token else 'no token: loopback only'})")

    if address_file:  # written once bound (before the teacher is loaded): readiness is /readyz's

        write_atomic(Path(address_file), (url + "\n").encode())
    log(f"serve-teacher: listening on {url}; loading the teacher ({cfg.teacher.path})")
    threading.Thread(target=load, name="teacher-loader", daemon=True).start()
    # uvicorn stops gracefully on SIGINT/SIGTERM, then raises the signal again under the handlers it
    # found: these make that a normal end (the log's last line, exit 0) rather than death by signal.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, frame: None)
    server.run(sockets=[sock])
    if service.failed is not None:
        raise service.failed
    log(f"serve-teacher: stopped ({service.stats.requests} requests, {service.stats.tokens} target tokens answered)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``distill serve-teacher CONFIG [--host H] [--port P] [--token-file F] [--engine builtin|vllm] [--top-k K]``."""

    parser = build_parser(argparse.ArgumentParser(prog="distill serve-teacher"))
    args = parser.parse_args(argv)
    return main_guard(run_from_args, args)


def build_parser(parser):
    parser.add_argument("config", help="the job's config (its teacher, tokenizer and task are served)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config option (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs a token)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port, printed and written to --address-file)")
    parser.add_argument("--token-file", help=f"file holding the token students must send (else ${TOKEN_ENV}); required off loopback")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="builtin", help="builtin (transformers, CPU or GPU) or vllm (GPU)")
    parser.add_argument("--top-k", type=int, default=64, help="targets per token (default 64)")
    parser.add_argument("--address-file", help="write the server's URL here once bound (for scripts)")
    parser.add_argument("--hidden-layers", help="also serve these teacher layers' hidden states on request (0 = embeddings), as "
                                                "distill cache-teacher --hidden-layers stores them (builtin engine)")
    parser.add_argument("--hidden-dim", type=int, metavar="R", help="with --hidden-layers: coordinates per position, by a PCA fitted on the "
                                                                   "config's first training rows (default: the teacher's width, raw)")
    parser.add_argument("--hidden-dtype", choices=["int8", "fp16"], default="int8", help="with --hidden-layers: int8 with a scale per position, or fp16")
    parser.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body in MiB (default 64)")
    parser.add_argument("--max-tokens", type=int, default=Limits.max_tokens, help=f"most tokens (rows x length) in one request (default {Limits.max_tokens})")
    parser.add_argument("--max-batch-tokens", type=int, default=Limits.max_batch_tokens,
                        help=f"most tokens in one teacher forward when requests are batched together (default {Limits.max_batch_tokens})")
    return parser


def run_from_args(args) -> int:
    if args.top_k < 1 or args.max_tokens < 1 or args.max_batch_tokens < 1 or args.max_request_mb <= 0:
        raise ConfigError("--top-k, --max-tokens, --max-batch-tokens and --max-request-mb must be > 0")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be in [0, 65535] (got {args.port})")
    for module in ("uvicorn", "starlette"):
        extras.require(module, "distill serve-teacher")
    cfg = load_config(args.config, args.overrides)
    token = read_token(args.token_file, what="--token-file")
    limits = Limits(max_request_bytes=int(args.max_request_mb * (1 << 20)), max_tokens=args.max_tokens, max_batch_tokens=args.max_batch_tokens)
    hidden = None
    if args.hidden_layers:
        try:
            hidden = {"layers": [int(part) for part in args.hidden_layers.split(",") if part.strip()], "dim": args.hidden_dim, "dtype": args.hidden_dtype}
        except ValueError:
            raise ConfigError(f"--hidden-layers: expected layer numbers separated by commas, such as 2,4 (got {args.hidden_layers!r})") from None
    return serve(cfg, host=args.host, port=args.port, token=token, engine=args.engine, k=args.top_k, limits=limits,
                 address_file=args.address_file, log=lambda line: print(line, file=sys.stderr, flush=True), hidden=hidden)


if __name__ == "__main__":
    sys.exit(main())
