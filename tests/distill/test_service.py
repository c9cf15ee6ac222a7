"""The teacher as a service (distill serve-teacher, teacher.source=remote), with real server
processes: the pool's targets are the store's, concurrent requests are batched, the token and the
limits are enforced, a student for another teacher is refused, and students ride out a restart
(no step lost or repeated) or stop with a checkpoint when the pool stays down."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, job_overrides, read_metrics, reset_accelerate, run_job
from distill.config import ConfigError, load_config
from distill.errors import TeacherUnavailable
from distill.losses import IGNORE_INDEX
from distill.store import top_k

K = 8
TOKEN = "s3cret-pool-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str | None = None, **kwargs):
    import httpx

    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.request(kwargs.pop("method", "GET"), url, headers=headers, timeout=60, **kwargs)


class Pool:
    """A real `distill serve-teacher` process on the tests' tiny teacher."""

    def __init__(self, tiny, corpus, folder: Path, *extra: str, port: int = 0, token: str | None = TOKEN, host: str = "127.0.0.1"):
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "pool.yaml"
        config.write_text("{}\n")
        self.address, self.log = folder / f"address-{time.monotonic_ns()}", folder / f"pool-{time.monotonic_ns()}.log"
        sets = [a for o in job_overrides(tiny, corpus, folder / "unused") for a in ("--set", o)]
        env = dict(os.environ)
        env.pop("DISTILL_TEACHER_TOKEN", None)
        if token:
            (folder / "token").write_text(token + "\n")
            extra = ("--token-file", str(folder / "token"), *extra)
        self.proc = subprocess.Popen([sys.executable, "-m", "distill_launcher.cli", "serve-teacher", str(config), *sets, "--host", host,
                                      "--port", str(port), "--address-file", str(self.address), "--top-k", str(K), *extra],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def ready(self, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the pool exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
            if self.address.is_file():
                url = self.address.read_text().strip()
                try:
                    if _get(url + "/readyz").status_code == 200:
                        return url
                except Exception:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"the pool was not ready in {timeout} s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def pool(tiny, corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    server = Pool(tiny, corpus, folder, "--max-tokens", "4096", "--max-request-mb", "1")
    url = server.ready()
    yield server, url
    server.stop()


def _batch(tiny, corpus, tmp_path, rows):
    from distill import data
    from distill.job import Setup

    cfg = load_config(None, job_overrides(tiny, corpus, tmp_path / "x"))
    setup = Setup(cfg, torch.device("cpu"))
    batch = data.collate([setup.sources[0][2][i] for i in rows], setup.tokenizer.pad_token_id)
    return setup, batch


def test_the_pool_answers_the_teachers_top_k_as_the_store_holds_it(pool, tiny, corpus, tmp_path):
    from distill.service import Client
    from distill.teacher_source import ModelSource

    _, url = pool
    setup, batch = _batch(tiny, corpus, tmp_path, [3, 11, 29, 30])
    labels = setup.task.targets(batch)
    with torch.no_grad():
        logits = ModelSource(setup.teacher, setup.task, 320).signal(batch, frozenset({"logits"})).logits
    expected = top_k(logits[labels != IGNORE_INDEX], K)
    client = Client([url], TOKEN, timeout=30)
    got, size = client.targets(batch)
    assert torch.equal(got.ids.long(), expected.ids)
    torch.testing.assert_close(got.logprobs.float(), expected.logprobs, rtol=2e-3, atol=2e-3)  # float16 on the wire, as in the store
    torch.testing.assert_close(got.tail, expected.tail, rtol=1e-5, atol=1e-5)
    own = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)[labels != IGNORE_INDEX]
    torch.testing.assert_close(got.actual, own, rtol=2e-3, atol=2e-3)  # each target's own token's (a student of another tokenizer needs it)
    # The wire carries the store's compact shard: int16 ids, float16 values, a float32 tail and a float16 own token's value per target token.
    assert size < len(got) * (K * 4 + 6) + 1024
    answer = client.identity(url)
    assert answer["identity"]["targets"] == {"method": "top_k", "k": K, "vocab": 320, "actual": True} and answer["engine"] == "builtin"
    from distill.store import key_of, teacher_identity

    assert answer["identity"] == {**teacher_identity(setup_cfg(tiny, corpus, tmp_path), setup.tokenizer), "targets": answer["identity"]["targets"]}
    assert answer["key"] == key_of(answer["identity"])
    metrics = _get(url + "/metrics", TOKEN).text
    assert "distill_teacher_requests_total" in metrics and "distill_teacher_tokens_per_second" in metrics
    client.close()


def setup_cfg(tiny, corpus, tmp_path):
    return load_config(None, job_overrides(tiny, corpus, tmp_path / "x"))


def test_concurrent_requests_are_answered_as_one_batch_each_its_own_rows(tiny, corpus, tmp_path):
    from distill.serve import Batcher, BuiltinEngine, Stats
    from distill.service import decode_targets

    setup, _ = _batch(tiny, corpus, tmp_path, [0])
    engine = BuiltinEngine(setup_cfg(tiny, corpus, tmp_path), K, torch.device("cpu"))
    from distill import data

    # Four requests of different lengths and sizes, queued before the worker starts: it takes them all at once.
    requests = [data.collate([setup.sources[0][2][i] for i in rows], setup.tokenizer.pad_token_id) for rows in ([1], [2, 3], [4, 5, 6], [7])]
    requests[0] = {name: t[:, :40] for name, t in requests[0].items()}
    stats = Stats()
    batcher = Batcher(engine, stats, max_batch_tokens=1 << 15, start=False)
    futures = [batcher.submit({name: r[name] for name in ("input_ids", "attention_mask", "labels")}) for r in requests]
    batcher.start()
    for request, future in zip(requests, futures):
        got = decode_targets(future.result(timeout=300))
        alone, _ = engine.targets({name: request[name] for name in ("input_ids", "attention_mask", "labels")})
        assert torch.equal(got.ids.long(), alone.ids)
        torch.testing.assert_close(got.logprobs.float(), alone.logprobs, rtol=2e-3, atol=2e-3)
    assert stats.batches == 1 and stats.requests == 4 and stats.batch_rows_max == 7


def test_the_token_limits_and_malformed_requests_are_refused_and_the_pool_keeps_serving(pool, tiny, corpus, tmp_path):
    from distill.service import Client, encode_batch

    server, url = pool
    _, batch = _batch(tiny, corpus, tmp_path, [1, 2])
    body = encode_batch(batch)
    assert _get(url + "/healthz").status_code == 200 and _get(url + "/readyz").status_code == 200  # probes need no token
    for token in (None, "wrong", TOKEN[:-1]):
        for path, method in (("/v1/targets", "POST"), ("/v1/identity", "GET"), ("/metrics", "GET")):
            answer = _get(url + path, token, method=method, content=body if method == "POST" else None)
            assert answer.status_code == 401 and "token" in answer.json()["error"]
    bad = [
        (b"not a safetensors file", 400, "not a safetensors batch"),
        (b"\xff" * (2 << 20), 413, "larger than the server's limit"),
        (encode_batch({**batch, "labels": batch["labels"][:, :5]}), 400, "shaped like input_ids"),
        (encode_batch({**batch, "input_ids": batch["input_ids"] + 10_000}), 400, "input_ids must be in [0, 320)"),
        (encode_batch({name: t.repeat(40, 1) for name, t in batch.items()}), 413, "more than the server's limit of 4096"),
    ]
    from safetensors.torch import save

    bad.append((save({"input_ids": batch["input_ids"].int()}), 400, "lacks attention_mask, labels"))
    for content, status, reason in bad:
        answer = _get(url + "/v1/targets", TOKEN, method="POST", content=content)
        assert answer.status_code == status and reason in answer.json()["error"], answer.text
    assert server.proc.poll() is None and _get(url + "/v1/identity", TOKEN).status_code == 200
    # The student side: each a one-line error naming the option.
    with pytest.raises(ConfigError, match="refused the token; set teacher.token_file"):
        Client([url], "wrong", timeout=5).targets(batch)
    with pytest.raises(ConfigError, match=r"refused the request \(413\): the batch has 10240 tokens"):
        Client([url], TOKEN, timeout=5).targets({name: t.repeat(80, 1) for name, t in batch.items()})
    assert TOKEN not in server.log.read_text()


def test_a_non_loopback_bind_needs_a_token(tiny, corpus, tmp_path):
    server = Pool(tiny, corpus, tmp_path, host="0.0.0.0", token=None)
    server.proc.wait(timeout=300)
    lines = server.log.read_text().strip().splitlines()
    assert server.proc.returncode == 2
    assert lines[-1] == "distill: error: --host 0.0.0.0 is not loopback: serving it needs a token; pass --token-file FILE or set DISTILL_TEACHER_TOKEN"


def _remote(tiny, corpus, out, url, *extra, token_file=None, resume=False):
    token = token_file or (out.parent / "student-token")
    if token_file is None:
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text(TOKEN)
    reset_accelerate()
    return run_job(tiny, corpus, out, "teacher.source=remote", f"teacher.url={url}", f"teacher.token_file={token}", "eval.at_end=false",
                   "train.max_steps=12", *extra, resume=resume)


def test_a_student_trains_from_the_pool_as_from_the_store(pool, tiny, corpus, tmp_path, capfd):
    _, url = pool
    whole, _ = _remote(tiny, corpus, tmp_path / "remote", url, "loss.alpha=0.2")
    err = capfd.readouterr().err
    assert f"teacher: pool {url} (builtin engine, top-{K} of 320 ids, key " in err and "the teacher model is not loaded for training" in err
    assert "teacher: this process waited " in err and " bytes per target token on the wire" in err
    from distill.cache_teacher import build

    store = tmp_path / "store"
    build(load_config(None, job_overrides(tiny, corpus, tmp_path / "unused")), k=K, out=store)
    reset_accelerate()
    cached, _ = run_job(tiny, corpus, tmp_path / "cached", "teacher.source=cache", f"teacher.cache={store}", "eval.at_end=false",
                        "train.max_steps=12", "loss.alpha=0.2")
    remote = [m for m in read_metrics(whole) if "train/loss" in m]
    stored = [m for m in read_metrics(cached) if "train/loss" in m]
    assert [m["step"] for m in remote] == list(range(1, 13))
    for a, b in zip(remote, stored):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert 0 < a["train/teacher_time_share"] < 1


def test_the_pool_scores_the_students_own_completions(pool, tiny, corpus, tmp_path, capfd):
    """rollout.on_policy=1: each step's completions are written, then sent to the pool (nothing can be asked ahead), and train."""
    _, url = pool
    out, _ = _remote(tiny, corpus, tmp_path / "remote", url, "data.packing=false", "rollout.on_policy=1", "rollout.max_new_tokens=16",
                     "rollout.prompt_tokens=8", "train.max_steps=10")
    records = [m for m in read_metrics(out) if "train/loss" in m]
    kd = [m["train/loss"] for m in records]
    assert sum(kd[-3:]) < 0.95 * sum(kd[:3]), kd
    assert all(0 < m["train/completion_length"] <= 16 and 0 < m["train/teacher_time_share"] < 1 for m in records)
    assert " bytes per target token on the wire" in capfd.readouterr().err


def test_a_student_for_another_teacher_or_with_a_wrong_token_is_refused_before_step_0(pool, tiny, corpus, tmp_path):
    _, url = pool
    with pytest.raises(ConfigError, match=r"the pool at .* serves another teacher: teacher\.path .*teacher\.weights"):
        _remote(tiny, corpus, tmp_path / "a", url, f"teacher.path={tiny['student']}", "student.architecture={}", f"student.path={tiny['student']}")
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    with pytest.raises(ConfigError, match="refused the token; set teacher.token_file"):
        _remote(tiny, corpus, tmp_path / "b", url, token_file=wrong)
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()
    with pytest.raises(TeacherUnavailable, match=r"gave no answer for 2 s \(last: http://127.0.0.1:\d+: ConnectError"):
        _remote(tiny, corpus, tmp_path / "c", f"http://127.0.0.1:{free_port()}", "teacher.remote_timeout=2")


def _student(tiny, corpus, out, url, *extra):
    """`distill run` in a subprocess against the pool at ``url``."""
    config = out.parent / "student.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("{}\n")
    sets = job_overrides(tiny, corpus, out, "teacher.source=remote", f"teacher.url={url}", "eval.at_end=false", "train.max_steps=40", *extra)
    env = {**os.environ, "DISTILL_TEACHER_TOKEN": TOKEN}
    return subprocess.Popen([sys.executable, "-m", "distill_launcher.cli", "run", str(config), *[a for o in sets for a in ("--set", o)]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _wait_for_step(run_dir: Path, step: int, proc) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        steps = [json.loads(line).get("step", 0) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
            if (run_dir / "metrics.jsonl").is_file() else []
        if steps and max(steps) >= step:
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no step {step} in {run_dir}")


def _same_run(run_dir: Path, reference: Path) -> None:
    """Every step once, with the reference run's losses: none lost, none repeated."""
    got, expected = ([m for m in read_metrics(d) if "train/loss" in m] for d in (run_dir, reference))
    assert [m["step"] for m in got] == list(range(1, 41)) == [m["step"] for m in expected]
    assert [m["train/loss"] for m in got] == pytest.approx([m["train/loss"] for m in expected], rel=1e-6)


def test_students_ride_out_a_pool_restart_and_stop_with_a_checkpoint_when_it_stays_down(tiny, corpus, tmp_path):
    port = free_port()
    server = Pool(tiny, corpus, tmp_path / "pool", port=port)
    url = server.ready()
    try:
        _remote(tiny, corpus, tmp_path / "plain", url, "train.max_steps=40")  # undisturbed, in this process
        # Killed at step 2 and back a few seconds later: the student waits, then goes on where it was.
        restarted = _student(tiny, corpus, tmp_path / "restarted", url, "teacher.remote_timeout=300")
        _wait_for_step(tmp_path / "restarted", 2, restarted)
        server.kill()
        time.sleep(2)
        server = Pool(tiny, corpus, tmp_path / "pool", port=port)
        server.ready()
        assert restarted.wait(timeout=900) == 0, restarted.stderr.read()[-3000:]
        served = _get(url + "/metrics", TOKEN).text
        requests = int(next(line.split()[-1] for line in served.splitlines() if line.startswith("distill_teacher_requests_total")))
        assert 0 < requests < 40  # the second server answered only the rest of the run
        _same_run(tmp_path / "restarted", tmp_path / "plain")
        # Killed for good: after teacher.remote_timeout the student saves a checkpoint and exits 7; resumed, it finishes the same run.
        down = _student(tiny, corpus, tmp_path / "down", url, "teacher.remote_timeout=3")
        _wait_for_step(tmp_path / "down", 2, down)
        server.kill()
        assert down.wait(timeout=900) == 7
        last = down.stderr.read().strip().splitlines()[-1]
        assert last.startswith("distill: error: teacher.url: the teacher pool gave no answer for 3 s (last: ") and "checkpoint of step " in last
        saved = int(last.split("checkpoint of step ")[1].split()[0])
        assert (tmp_path / "down" / "checkpoints" / f"step_{saved:08d}").is_dir()
        server = Pool(tiny, corpus, tmp_path / "pool", port=port)
        server.ready()
        _remote(tiny, corpus, tmp_path / "down", url, "train.max_steps=40", resume=True)
        _same_run(tmp_path / "down", tmp_path / "plain")
    finally:
        server.stop()


def test_many_students_share_one_pool(pool, tiny, corpus, tmp_path):
    """Two students at once (threads of requests, as two processes would send them) get their own rows."""
    from distill.service import Client

    _, url = pool
    setup, first = _batch(tiny, corpus, tmp_path, [1, 2, 3, 4])
    from distill import data

    second = data.collate([setup.sources[0][2][i] for i in (9, 8)], setup.tokenizer.pad_token_id)
    client = Client([url], TOKEN, timeout=30)
    alone = [client.targets(b)[0] for b in (first, second)]
    results = {}

    def ask(name, batch):
        results[name] = [client.targets(batch)[0] for _ in range(5)]

    threads = [threading.Thread(target=ask, args=(name, b)) for name, b in (("first", first), ("second", second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, expected in zip(("first", "second"), alone):
        for got in results[name]:
            assert torch.equal(got.ids, expected.ids)
            torch.testing.assert_close(got.logprobs.float(), expected.logprobs.float(), rtol=2e-3, atol=2e-3)
    client.close()


@pytest.mark.parametrize("sets, message", [
    ([], "teacher.source=remote needs teacher.url (the URL distill serve-teacher prints)"),
    (["teacher.url=node1:8765"], "teacher.url: 'node1:8765' is not an http:// or https:// URL"),
    (["teacher.url=http://a:1", "teacher.remote_timeout=0"], "teacher.remote_timeout must be > 0 (got 0.0)"),
    (["teacher.url=http://a:1", "teacher.prefetch=-1"], "teacher.prefetch must be >= 0 (got -1)"),
    (["teacher.url=http://a:1", "loss.terms=[{kind: attention, weight: 1}]"], "which the teacher pool does not give (only hidden states: distill serve-teacher --hidden-layers); use teacher.source=model"),
])
def test_what_a_pool_cannot_serve_fails_when_the_config_loads(sets, message):
    base = ["teacher.path=t", "student.architecture={num_hidden_layers: 1}", "data.train_files=[a.txt]", "teacher.source=remote"]
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base, *sets])
    assert message in str(err.value)


def test_a_pool_serves_the_teachers_hidden_states_as_a_store_holds_them(pool, tiny, corpus, tmp_path, capfd):
    """serve-teacher --hidden-layers fits the projection cache-teacher fits; a hidden term trains from the pool as from the store."""
    from distill.cache_teacher import build
    from distill.service import Client

    terms = "loss.terms=[{kind: logits, name: kd, weight: 1.0}, {kind: hidden, name: feat, weight: 1.0}]"
    server = Pool(tiny, corpus, tmp_path / "pool", "--hidden-layers", "2", "--hidden-dim", "16")
    try:
        url = server.ready()
        store = build(load_config(None, job_overrides(tiny, corpus, tmp_path / "unused")), k=K, out=tmp_path / "store", hidden_layers=[2], hidden_dim=16)
        client = Client([url], TOKEN, timeout=30)
        served = client.identity(url)["identity"]["features"]
        assert served == json.loads((store / "manifest.json").read_text())["identity"]["features"]  # the same projection, to the byte
        client.close()
        remote, _ = _remote(tiny, corpus, tmp_path / "remote", url, terms, "train.max_steps=4")
        reset_accelerate()
        cached, _ = run_job(tiny, corpus, tmp_path / "cached", "teacher.source=cache", f"teacher.cache={store}", "eval.at_end=false",
                            "train.max_steps=4", terms)
        a, b = [[(m["train/kd_loss"], m["train/feat_loss"]) for m in read_metrics(run) if "train/loss" in m] for run in (remote, cached)]
        assert len(a) == 4 and all(f > 0 for _, f in a)
        assert [x for pair in a for x in pair] == pytest.approx([x for pair in b for x in pair], rel=1e-5)
    finally:
        server.stop()
    # A pool started without them: one line before step 0.
    _, plain = pool
    with pytest.raises(ConfigError, match="a hidden term needs the teacher's hidden states, and its store or pool gives none"):
        _remote(tiny, corpus, tmp_path / "plain", plain, terms)
    assert not (tmp_path / "plain" / "metrics.jsonl").exists()
