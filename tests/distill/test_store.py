"""The teacher store (distill cache-teacher, teacher.source=cache): sparse losses against dense
ones restricted the same way, a content address that names what differs, atomic resumable builds
identical at any world size and after a kill, and training from it without the teacher."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, job_overrides, read_metrics, reset_accelerate, run_job, sweep_args
from distill.config import ConfigError, LossConfig, load_config
from distill.losses import DIVERGENCES, IGNORE_INDEX
from distill.objective import Outputs, build_objective
from distill.store import Store, buckets, top_k

K = 8


def _dense_buckets(student_logits, teacher_logits, k, temperature):
    """The k + 1 bucket distributions computed densely, in float64: the reference."""
    log_t = torch.log_softmax(teacher_logits.double(), -1)
    top, ids = log_t.topk(k, -1)
    tail = torch.log1p(-top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-12))
    if temperature != 1.0:
        top = torch.log1p(-tail.exp()) + torch.log_softmax(top / temperature, -1)
    log_s = torch.log_softmax(student_logits.double() / temperature, -1)
    s_top = log_s.gather(-1, ids)
    s_rest = torch.log1p(-s_top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-12))
    return torch.cat([s_top, s_rest], -1), torch.cat([top, tail], -1)


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_terms_equal_dense_ones_restricted_to_the_same_buckets(divergence, temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 9, 40, generator=g) * 2, torch.randn(2, 9, 40, generator=g) * 3
    labels = torch.randint(0, 40, (2, 9), generator=g)
    labels[1, 6:] = IGNORE_INDEX
    mask = labels != IGNORE_INDEX
    sparse = top_k(teacher[mask], K)
    cfg = LossConfig(terms=[{"kind": "logits", "divergence": divergence, "temperature": temperature}, {"kind": "ce", "weight": 0.5}], chunk_size=4)
    fused_head = torch.nn.Linear(5, 40, bias=False)
    features = torch.randn(2, 9, 5, generator=g)
    student = fused_head(features).detach()  # the same logits through both paths
    dense_s, dense_t = _dense_buckets(student[mask], teacher[mask], K, temperature)
    reference = DIVERGENCES[divergence](dense_s, dense_t, **({"beta": 0.5} if divergence == "jsd" else {"alpha": 0.1} if "skew" in divergence else {})).sum()
    for outputs in (Outputs(logits=student), Outputs(features=features, head=fused_head)):
        sums = build_objective(cfg).sums(outputs, Outputs(sparse=sparse), labels, vocab=40)
        torch.testing.assert_close(sums[0].double(), reference.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("method", ["top_k", "sampled", "mixed"])
def test_the_fused_sparse_forward_kl_has_the_gradient_of_the_unfused_one(temperature, method):
    """The fused path's closed-form gradient of the forward KL on stored targets (through the gather,
    the tail bucket and the clamps) equals autograd's through the unfused buckets."""
    from distill.store import PICK

    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 40, (4, 5), generator=g)
    labels[0, 3:] = IGNORE_INDEX
    teacher = torch.randn(int((labels != IGNORE_INDEX).sum()), 40, generator=g) * 3
    sparse = PICK[method](teacher, K, torch.Generator().manual_seed(2))
    head = torch.nn.Linear(5, 40)
    features = torch.randn(4, 5, 5, generator=g, requires_grad=True)
    cfg = LossConfig(terms=[{"kind": "logits", "divergence": "forward_kl", "temperature": temperature, "weight": 0.8},
                            {"kind": "ce", "weight": 0.2}], chunk_size=3)
    results = []
    for fused in (False, True):
        features.grad = None
        head.zero_grad(set_to_none=True)
        objective = build_objective(cfg)
        outputs = Outputs(features=features, head=head) if fused else Outputs(logits=head(features))
        sums = objective.sums(outputs, Outputs(sparse=sparse), labels, vocab=40)
        (objective.total(sums) * 0.37).backward()
        results.append((sums.detach(), features.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()))
    for unfused, fused in zip(*results):
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_top_k_keeps_the_rest_as_tail_mass():
    logits = torch.randn(5, 30)
    sparse = top_k(logits, 30)
    assert torch.isinf(sparse.tail).all() and sparse.tail.lt(0).all()
    sparse = top_k(logits, 4)
    total = sparse.logprobs.exp().sum(-1) + sparse.tail.exp()
    torch.testing.assert_close(total, torch.ones(5))
    student, teacher = buckets(logits, sparse, 1.0)
    torch.testing.assert_close(student.exp().sum(-1), torch.ones(5))
    torch.testing.assert_close(student, teacher)  # the same model: zero divergence


# ----- building and reading real stores ---------------------------------------------------------------------------------------------


def _cache_cli(tiny, corpus, out, *extra, k=K, env=None, wait=True):
    args = [sys.executable, "-m", "distill_launcher.cli", "cache-teacher", "-", "--top-k", str(k), "--out", str(out), "--shard-rows", "16",
            *[a for o in job_overrides(tiny, corpus, out.parent / "unused") for a in ("--set", o)], *extra]
    empty = out.parent / "empty.yaml"  # everything comes from --set, as in run_job
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.write_text("{}\n")
    args[args.index("-")] = str(empty)
    full_env = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=REPO)
    return subprocess.run(args, capture_output=True, text=True, env=full_env, cwd=REPO, timeout=900)


def _files(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def store(tiny, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "whole"
    proc = _cache_cli(tiny, corpus, out)
    assert proc.returncode == 0, proc.stderr
    assert f"teacher store: {out}" in proc.stdout
    return out


def test_the_store_holds_the_teachers_top_k_of_every_target(store, tiny, corpus, tmp_path):
    from distill.job import Setup
    from distill.teacher_source import ModelSource

    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["identity"]["targets"] == {"method": "top_k", "k": K, "vocab": 320, "encoding": "fp16"}
    cfg = load_config(None, job_overrides(tiny, corpus, tmp_path / "x"))
    setup = Setup(cfg, torch.device("cpu"))
    train = setup.sources[0][2]
    from distill import data

    rows = [5, 17, 40]
    batch = data.collate([train[i] for i in rows], setup.tokenizer.pad_token_id)
    labels = setup.task.targets(batch)
    with torch.no_grad():
        logits = ModelSource(setup.teacher, setup.task, 320).signal(batch, frozenset({"logits"})).logits
    expected = top_k(logits[labels != IGNORE_INDEX], K)
    got = Store(store).rows("training", "data", rows)
    assert torch.equal(got.ids.long(), expected.ids)
    torch.testing.assert_close(got.logprobs.float(), expected.logprobs, rtol=2e-3, atol=2e-3)  # stored as float16
    torch.testing.assert_close(got.tail, expected.tail, rtol=1e-5, atol=1e-5)
    assert got.ids.dtype == torch.int16 and got.logprobs.dtype == torch.float16


def test_two_processes_and_a_killed_build_give_the_same_store(store, tiny, corpus, tmp_path):
    two = _cache_cli(tiny, corpus, tmp_path / "two", "--nproc-per-node", "2")
    assert two.returncode == 0, two.stderr
    assert _files(tmp_path / "two") == _files(store)

    killed = tmp_path / "killed"
    proc = _cache_cli(tiny, corpus, killed, wait=False)
    deadline = time.monotonic() + 600
    while len(list(killed.glob("training/data/shard-*"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()
    with pytest.raises(ConfigError, match="is incomplete .distill cache-teacher did not finish"):
        Store(killed)
    resumed = _cache_cli(tiny, corpus, killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "training (data): " in resumed.stderr
    assert _files(killed) == _files(store)


def _train(tiny, corpus, out, *extra):
    return run_job(tiny, corpus, out, "teacher.source=cache", "eval.at_end=false", *extra)


def test_training_from_the_store_matches_the_dense_restricted_loss_and_resumes_exactly(store, tiny, corpus, tmp_path, capfd):
    reset_accelerate()
    whole, _ = _train(tiny, corpus, tmp_path / "whole", f"teacher.cache={store}", "loss.alpha=0.2", "train.save_every=3")
    err = capfd.readouterr().err
    assert f"teacher: store {store} (top-{K} of 320 ids, fp16); the teacher model is not loaded for training" in err
    metrics = [m for m in read_metrics(whole) if "train/loss" in m]
    assert len(metrics) == 6 and all(m["train/kd_loss"] > 0 for m in metrics)
    # A second student from the same store: another alpha and temperature, an unfused loss.
    reset_accelerate()
    other, _ = _train(tiny, corpus, tmp_path / "other", f"teacher.cache={store}", "loss.temperature=2.0", "loss.fused=never")
    assert all(m["train/kd_loss"] > 0 for m in read_metrics(other) if "train/loss" in m)
    # Resumed at step 3, the run continues on the very same curve (the store is read by row, not by position).
    import shutil

    shutil.rmtree(whole / "checkpoints" / "step_00000006")
    reset_accelerate()
    run_job(tiny, corpus, whole, "teacher.source=cache", "eval.at_end=false", f"teacher.cache={store}", "loss.alpha=0.2", "train.save_every=3",
            resume=True)
    again = [m for m in read_metrics(whole) if "train/loss" in m]
    assert [m["step"] for m in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(metrics[3:], again[3:]):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6)


def test_a_store_for_other_data_or_teacher_is_named(store, tiny, corpus, tmp_path):
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"built for another job: data\.seq_len \(store 64, job 32\)"):
        _train(tiny, corpus, tmp_path / "a", f"teacher.cache={store}", "data.seq_len=32")
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"teacher\.path .* teacher\.weights"):
        _train(tiny, corpus, tmp_path / "b", f"teacher.cache={store}", f"teacher.path={tiny['student']}", "student.architecture={}",
               f"student.path={tiny['student']}")


def test_missing_incomplete_truncated_and_foreign_stores_are_named(store, tiny, corpus, tmp_path):
    import shutil

    with pytest.raises(ConfigError, match="does not exist; build it with distill cache-teacher"):
        Store(tmp_path / "nowhere")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match="is not a teacher store .no manifest.json."):
        Store(tmp_path / "foreign")
    broken = tmp_path / "broken"
    shutil.copytree(store, broken)
    shard = broken / "training" / "data" / "shard-00000002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"shard-00000002.safetensors is truncated \(100 of \d+ bytes\)"):
        Store(broken)
    # cache-teacher refuses to write into a directory that is not a store, or a store of other targets.
    proc = _cache_cli(tiny, corpus, tmp_path / "foreign")
    assert proc.returncode != 0 and "is not a teacher store (no identity.json)" in proc.stderr.strip().splitlines()[-1]
    proc = _cache_cli(tiny, corpus, store, k=4)
    assert proc.returncode != 0 and "holds other targets: targets.k (store 8, job 4)" in proc.stderr
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "hi"
    proc = _cache_cli(tiny, corpus, tmp_path / "big", k=100000)
    assert proc.returncode != 0 and "--top-k 100000 must be between 1 and the vocabulary size (320)" in proc.stderr.strip().splitlines()[-1]


def test_a_store_is_found_by_the_jobs_identity(tiny, corpus, tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(root))
    reset_accelerate()
    with pytest.raises(ConfigError, match="no teacher store for this job's teacher and data under"):
        _train(tiny, corpus, tmp_path / "none", "train.max_steps=1")
    proc = _cache_cli(tiny, corpus, root / "teacher" / "mine", env={"DISTILL_CACHE_DIR": str(root)}, k=4)
    assert proc.returncode == 0, proc.stderr
    reset_accelerate()
    run_dir, _ = _train(tiny, corpus, tmp_path / "found", "train.max_steps=2")
    assert len([m for m in read_metrics(run_dir) if "train/loss" in m]) == 2
    # A sweep's runs train from the store found for their teacher and data (unless told not to).
    from distill_launcher.cli import main

    for store_option, uses in (("auto", True), ("never", False)):
        capsys.readouterr()
        assert main(sweep_args(tiny, corpus, tmp_path / f"sweep-{store_option}", "--grid", "loss.temperature=1,2", "--dry-run",
                               "--teacher-store", store_option)) == 0
        commands = capsys.readouterr().out.splitlines()[1:]
        assert len(commands) == 2
        assert all((f"--set teacher.source=cache --set teacher.cache={root / 'teacher' / 'mine'}" in c) == uses for c in commands)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_uniform_tail_is_the_dense_teacher_with_its_tail_spread_evenly(temperature):
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 30, generator=g), torch.randn(6, 30, generator=g) * 2
    labels = torch.randint(0, 30, (1, 6), generator=g)
    sparse = top_k(teacher, 5)
    sparse.tail_mode = "uniform"
    p = torch.softmax(teacher.double(), -1)
    top = p.topk(5, -1)
    rebuilt = ((1 - top.values.sum(-1, keepdim=True)) / 25).expand(-1, 30).clone().scatter_(-1, top.indices, top.values)
    reference = DIVERGENCES["forward_kl"](student.double(), rebuilt.log(), temperature=temperature).sum()
    cfg = LossConfig(terms=[{"kind": "logits", "temperature": temperature}])
    sums = build_objective(cfg).sums(Outputs(logits=student.unsqueeze(0)), Outputs(sparse=sparse), labels, vocab=30)
    torch.testing.assert_close(sums[0].double(), reference.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sets, message", [
    (["loss.terms=[{kind: logits}, {kind: attention}]"], "loss.terms[1]: attention terms need the teacher's attention, which a store does not hold"),
    (["loss.chunk_size=-1"], "loss.chunk_size must be >= 0"),
])
def test_what_a_store_cannot_serve_fails_when_the_config_loads(sets, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, ["teacher.path=t", "student.architecture={num_hidden_layers: 1}", "data.train_files=[a.txt]", "teacher.source=cache", *sets])


def _forward_kl_gradient(student_logits, targets):
    """d(sum of forward KL over rows)/d(student logits), from sparse targets through the loss's own bucket path."""
    from distill.losses import forward_kl

    student = student_logits.clone().requires_grad_(True)
    forward_kl(*buckets(student, targets, 1.0)).sum().backward()
    return student.grad


def test_sampled_targets_give_an_unbiased_forward_kl_gradient_where_top_k_is_biased():
    from distill.store import sample

    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    dense = torch.softmax(student, -1) - torch.softmax(teacher, -1)  # d forward KL / d student logits, at T = 1
    draws = 20_000
    sampled = sample(teacher.repeat(draws, 1), K, torch.Generator().manual_seed(1))
    assert sampled.ids.shape == (3 * draws, K) and torch.isinf(sampled.tail).all()
    kept = sampled.logprobs.exp()
    torch.testing.assert_close(kept.sum(-1), torch.ones(3 * draws))  # the drawn ids' frequencies: all the mass
    mean = _forward_kl_gradient(student.repeat(draws, 1), sampled).reshape(draws, 3, 40).mean(0)
    top = _forward_kl_gradient(student, top_k(teacher, K))
    assert (mean - dense).abs().max() < 0.01  # unbiased: the sampling noise of 20,000 draws of 8
    assert (top - dense).abs().max() > 0.05  # top-k's bucket gradient is not the dense one
    # Ids never drawn sit in the slots beyond the drawn ones at probability 0, all distinct, so the k + 1 buckets partition the vocabulary.
    assert all(len(set(row)) == K for row in sampled.ids[:50].tolist())


def test_mixed_targets_are_exact_at_the_head_unbiased_beyond_and_less_noisy_than_sampled_ones():
    from distill.store import mixed, sample

    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(3, 40, generator=g) * 1.5, torch.randn(3, 40, generator=g)
    dense = torch.softmax(student, -1) - torch.softmax(teacher, -1)
    draws = 20_000
    targets = mixed(teacher.repeat(draws, 1), K, torch.Generator().manual_seed(1))
    exact = top_k(teacher, K // 2)
    assert targets.ids.shape == (3 * draws, K) and torch.isinf(targets.tail).all()
    torch.testing.assert_close(targets.ids[:3, : K // 2], exact.ids)  # the head: the teacher's top K/2, exactly
    torch.testing.assert_close(targets.logprobs[:3, : K // 2], exact.logprobs)
    torch.testing.assert_close(targets.logprobs.exp().sum(-1), torch.ones(3 * draws))  # head + the rest's mass, spread over the drawn ids
    assert all(len(set(row)) == K for row in targets.ids[:50].tolist())  # distinct: no drawn id repeats a head id
    gradients = {"mixed": _forward_kl_gradient(student.repeat(draws, 1), targets).reshape(draws, 3, 40),
                 "sampled": _forward_kl_gradient(student.repeat(draws, 1), sample(teacher.repeat(draws, 1), K, torch.Generator().manual_seed(1))).reshape(draws, 3, 40)}
    assert (gradients["mixed"].mean(0) - dense).abs().max() < 0.005  # unbiased
    noise = {name: (grad - dense).pow(2).sum(-1).mean() for name, grad in gradients.items()}
    assert noise["mixed"] < 0.5 * noise["sampled"]  # the head is exact: only the rest's mass is estimated


@pytest.mark.parametrize("method, held", [("sampled", f"{K} sampled"), ("mixed", f"top-{K // 2} and {K // 2} sampled")])
def test_a_sampled_store_is_the_same_at_any_world_size_and_trains_the_forward_kl_only(method, held, store, tiny, corpus, tmp_path, capfd):
    from distill.cache_teacher import build

    one, two = tmp_path / "one", tmp_path / "two"
    build(load_config(None, job_overrides(tiny, corpus, tmp_path / "unused")), k=K, out=one, shard_rows=16, method=method)  # here, one process
    built = _cache_cli(tiny, corpus, two, "--targets", method, "--nproc-per-node", "2")
    assert built.returncode == 0, built.stderr
    assert _files(one) == _files(two)  # each shard draws from its own seed
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["identity"]["targets"] == {"method": method, "k": K, "vocab": 320, "encoding": "fp16"}
    assert _files(one) != _files(store)
    # Another encoding of the same targets: the same draws (the seed leaves the encoding out), kept as counts.
    packed = build(load_config(None, job_overrides(tiny, corpus, tmp_path / "unused")), k=K, out=tmp_path / "q8", shard_rows=16, method=method,
                   encoding="q8")
    rows = list(range(0, 200, 7))
    a, b = Store(one).rows("training", "data", rows), Store(packed).rows("training", "data", rows)
    drawn = a.logprobs[:, K - (K if method == "sampled" else K // 2):].float() > float("-inf")
    assert torch.equal(a.ids[:, -drawn.shape[1]:][drawn].long(), b.ids[:, -drawn.shape[1]:][drawn].long())
    torch.testing.assert_close(b.logprobs.float(), a.logprobs.float(), rtol=0, atol=2e-3 if method == "sampled" else 0.03)
    reset_accelerate()
    run, _ = _train(tiny, corpus, tmp_path / "run", f"teacher.cache={one}")
    assert f"teacher: store {one} ({held} of 320 ids, fp16)" in capfd.readouterr().err
    assert all(m["train/kd_loss"] > 0 for m in read_metrics(run) if "train/loss" in m)
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"loss term 'kd' \(forward_kl at temperature 2\): sampled teacher targets give an unbiased forward KL "
                                          r"at temperature 1 only"):
        _train(tiny, corpus, tmp_path / "t2", f"teacher.cache={one}", "loss.temperature=2.0")


def test_a_job_finds_a_top_k_store_before_a_mixed_one_before_a_sampled_one(tmp_path, monkeypatch):
    from distill.store import find

    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path))
    job = {"teacher": {"weights": "abc"}, "data": {"seq_len": 64}}
    stores = {"sampled_64": ("sampled", 64, "fp16"), "mixed_64_q4": ("mixed", 64, "q4"), "mixed_64": ("mixed", 64, None), "mixed_64_q8": ("mixed", 64, "q8"),
              "mixed_8": ("mixed", 8, "fp16"), "top_8": ("top_k", 8, "q8")}
    for name, (method, k, encoding) in stores.items():  # None: a store from before encodings (fp16)
        targets = {"method": method, "k": k, "vocab": 320, **({"encoding": encoding} if encoding else {})}
        (tmp_path / "teacher" / name).mkdir(parents=True)
        (tmp_path / "teacher" / name / "manifest.json").write_text(json.dumps({"identity": {**job, "targets": targets}}))
    assert find({**job, "data": {"seq_len": 32}, "targets": None}) is None  # built for other data
    order = []
    while (found := find({**job, "targets": None})) is not None:
        order.append(found.name)
        (found / "manifest.json").unlink()
    assert order == ["top_8", "mixed_64", "mixed_64_q8", "mixed_64_q4", "mixed_8", "sampled_64"]


def _rewrite_shard(path: Path, **changes) -> None:
    """The shard with some tensors replaced (same shapes and dtypes, so the same size)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors.update({name: change(tensors[name]) for name, change in changes.items()})
    size = path.stat().st_size
    save_file(tensors, path)
    assert path.stat().st_size == size


def test_a_store_whose_bytes_changed_is_refused_in_one_line(store, tiny, corpus, tmp_path, capsys):
    """The reader checks every shard against the manifest's sha256 (once, streamed) and its values against the vocabulary."""
    from distill_launcher.cli import main

    def train(path, out):
        config = tmp_path / "empty.yaml"
        config.write_text("{}\n")
        sets = job_overrides(tiny, corpus, tmp_path / out, "teacher.source=cache", f"teacher.cache={path}", "eval.at_end=false")
        code = main(["run", str(config), *[a for o in sets for a in ("--set", o)]])
        return code, capsys.readouterr().err.strip().splitlines()[-1]

    zeroed = tmp_path / "zeroed"  # every log-probability set to 0, every size kept
    shutil.copytree(store, zeroed)
    for shard in sorted(zeroed.rglob("shard-*.safetensors")):
        _rewrite_shard(shard, logprobs=lambda t: torch.zeros_like(t))
    code, line = train(zeroed, "a")
    assert code == 2 and line.startswith("distill: error: teacher.cache: shard ") and "does not match the sha256 in its manifest" in line
    # Shards and manifest rewritten together: the values are checked too (ids past the vocabulary, NaNs).
    for name, change, problem in (("ids", lambda t: t + 400, "ids outside the vocabulary [0, 320)"),
                                  ("logprobs", lambda t: torch.full_like(t, float("nan")), "log-probabilities that are NaN")):
        forged = tmp_path / f"forged-{name}"
        shutil.copytree(store, forged)
        manifest = json.loads((forged / "manifest.json").read_text())
        for split, sources in manifest["splits"].items():
            for source, entry in sources.items():
                for shard in entry["shards"]:
                    path = forged / split / source / shard["file"]
                    _rewrite_shard(path, **{name: change})
                    shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (forged / "manifest.json").write_text(json.dumps(manifest))
        code, line = train(forged, f"b-{name}")
        assert code == 2 and "is not a valid teacher store shard" in line and problem in line, line
    # A store whose identity records each target's own token's log-probability (--any-tokenizer) must hold it.
    claimed = tmp_path / "claimed"
    shutil.copytree(store, claimed)
    manifest = json.loads((claimed / "manifest.json").read_text())
    manifest["identity"]["targets"]["actual"] = True
    (claimed / "manifest.json").write_text(json.dumps(manifest))
    code, line = train(claimed, "c")
    assert code == 2 and "is not a valid teacher store shard: it lacks the log-probability of each target's own token" in line, line


# ----- encodings ------------------------------------------------------------------------------------------------------------------------


def _dense(targets, vocab):
    return torch.zeros(len(targets), vocab, dtype=torch.float64).scatter_add_(1, targets.ids.long(), targets.logprobs.double().exp())


@pytest.mark.parametrize("method", ["top_k", "sampled", "mixed"])
def test_every_encoding_reads_back_the_targets_it_was_given(method):
    from safetensors.torch import load

    from distill.encodings.base import pack, unpack
    from distill.encodings.registry import ENCODINGS
    from distill.sparse import PICK, bucket_forward_kl_and_grad
    from distill_launcher.cli import build_parser

    vocab, k = 320, 16
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(90, vocab, generator=generator) * 3
    given = PICK[method](logits, k, generator)
    counts = [40, 0, 30, 20]  # a row without targets too
    size, back = {}, {}
    for name, kind in ENCODINGS.items():
        data = kind(vocab=vocab, method=method, k=k).encode(given, counts)
        size[name], back[name] = len(data), kind(vocab=vocab, method=method, k=k).decode(load(data))
        got = back[name]
        assert got.ids.shape == given.ids.shape and all(len(set(row)) == k for row in got.ids.tolist())  # k distinct ids a target
        mass = _dense(got, vocab).sum(-1) + got.tail.double().exp()
        assert (mass - 1).abs().max() < (2e-3 if name == "fp16" else 1e-5), name  # the quantized ones scaled to the stored rest's mass
        error = (_dense(got, vocab) - _dense(given, vocab)).abs().sum(-1).max()
        assert error < {"fp16": 2e-3, "q8": 1e-2, "q4": 0.12}[name], (name, float(error))
        exact = {"top_k": k, "mixed": k // 2, "sampled": 0}[method]
        assert torch.equal(got.ids[:, :exact].long(), given.ids[:, :exact])  # the exact ids, in order
        if method != "top_k":  # the drawn ids are their counts: nothing lost
            drawn = given.logprobs[:, exact:] > float("-inf")
            assert torch.equal(got.ids[:, exact:][drawn].long(), given.ids[:, exact:][drawn]), name
            if name != "fp16":
                torch.testing.assert_close(got.logprobs[:, exact:].float(), given.logprobs[:, exact:], rtol=0, atol=2e-5 if method == "sampled" else 2e-3)
    if method == "sampled":  # no exact log-probability: the same bytes in both
        assert size["q4"] == size["q8"] < size["fp16"] / 2, size
    else:  # at k=16 and 9-bit ids
        assert size["q4"] < size["q8"] < 0.65 * size["fp16"], size
    if method == "sampled":  # the same forward KL and gradient, whatever ids fill the slots never drawn
        student = torch.randn(90, vocab, generator=generator)
        for a, b in zip(bucket_forward_kl_and_grad(student, given, 1.0), bucket_forward_kl_and_grad(student, back["q8"], 1.0)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    values = torch.randint(0, 1 << 17, (1001,), generator=generator).numpy()
    for width in (1, 4, 7, 8, 9, 16, 17):  # the bit packing, at and between whole bytes
        assert (unpack(pack(values % (1 << width), width), 1001, width) == values % (1 << width)).all(), width
    cache = next(a for a in build_parser()._subparsers._group_actions[0].choices["cache-teacher"]._actions if "--encoding" in a.option_strings)
    assert list(cache.choices) == list(ENCODINGS)  # the launcher's own list (torch-free) is the registry's


def test_a_quantized_store_trains_and_a_store_from_before_encodings_reads_as_fp16(store, tiny, corpus, tmp_path, capfd):
    from safetensors.torch import load_file, save_file

    from distill.cache_teacher import build

    q8 = tmp_path / "q8"
    built = _cache_cli(tiny, corpus, q8, "--encoding", "q8", "--nproc-per-node", "2")
    assert built.returncode == 0, built.stderr
    alone = build(load_config(None, job_overrides(tiny, corpus, tmp_path / "unused")), k=K, out=tmp_path / "alone", shard_rows=16, encoding="q8")
    assert _files(alone) == _files(q8)  # one process writes what two do
    assert json.loads((q8 / "manifest.json").read_text())["identity"]["targets"] == {"method": "top_k", "k": K, "vocab": 320, "encoding": "q8"}
    shards = lambda path: sum(f.stat().st_size for f in path.rglob("shard-*.safetensors"))
    assert shards(q8) < 0.7 * shards(store)  # at k=8: 23 bytes a target against 36
    rows = [0, 5, 17, 40]
    exact, packed = Store(store).rows("training", "data", rows), Store(q8).rows("training", "data", rows)
    assert torch.equal(packed.ids.long(), exact.ids.long())
    torch.testing.assert_close(packed.logprobs, exact.logprobs.float(), rtol=0, atol=0.03)
    reset_accelerate()
    run, _ = _train(tiny, corpus, tmp_path / "run", f"teacher.cache={q8}")
    assert f"teacher: store {q8} (top-{K} of 320 ids, q8)" in capfd.readouterr().err
    assert all(m["train/kd_loss"] > 0 for m in read_metrics(run) if "train/loss" in m)
    # A store whose identity names no encoding (built before there were any) is read as fp16.
    older = tmp_path / "older"
    shutil.copytree(store, older)
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["identity"]["targets"]["encoding"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    old = Store(older).rows("training", "data", rows)
    assert torch.equal(old.ids, exact.ids) and torch.equal(old.logprobs, exact.logprobs)
    # Records that do not parse, behind a manifest rewritten to match: one line, before training.
    forged = tmp_path / "forged"
    shutil.copytree(q8, forged)
    manifest = json.loads((forged / "manifest.json").read_text())
    shard = manifest["splits"]["training"]["data"]["shards"][0]
    path = forged / "training" / "data" / shard["file"]
    tensors = load_file(path)
    tensors["blob_offsets"][1] += 1
    save_file(tensors, path)
    shard["sha256"], shard["bytes"] = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size
    (forged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="is not a valid teacher store shard: its q8 targets do not read back: a row's record is"):
        Store(forged).rows("training", "data", [0])
    reset_accelerate()


# ----- the teacher's hidden states in the store ------------------------------------------------------------------------------------

HIDDEN = "loss.terms=[{kind: logits, name: kd, weight: 1.0}, {kind: hidden, name: feat, weight: 1.0, layers: [[1, 2]]}]"


def test_a_store_holds_the_teachers_hidden_states_reduced_the_same_at_any_world_size(tiny, corpus, tmp_path):
    from distill import data
    from distill.cache_teacher import build
    from distill.job import Setup
    from distill.teacher_source import ModelSource

    cfg = load_config(None, job_overrides(tiny, corpus, tmp_path / "unused"))
    one = build(cfg, k=K, out=tmp_path / "one", shard_rows=16, hidden_layers=[1, 2], hidden_dim=16, method="mixed", encoding="q4")
    two = _cache_cli(tiny, corpus, tmp_path / "two", "--hidden-layers", "1,2", "--hidden-dim", "16", "--targets", "mixed", "--encoding", "q4",
                     "--nproc-per-node", "2")
    assert two.returncode == 0, two.stderr
    assert "hidden states of layer(s) 1, 2 reduced from 64 to 16 dimensions (variance kept: " in two.stderr
    assert _files(one) == _files(tmp_path / "two")  # the projection too: fitted alike by every process
    features = json.loads((one / "manifest.json").read_text())["identity"]["features"]
    assert {key: features[key] for key in ("layers", "teacher_layers", "width", "dim", "dtype")} == \
        {"layers": [1, 2], "teacher_layers": 2, "width": 64, "dim": 16, "dtype": "int8"}
    # What is stored: the teacher's states in the projection's coordinates, each position within its int8 step.
    held = Store(one)
    setup = Setup(cfg, torch.device("cpu"), load_student=False)
    train = setup.sources[0][2]
    rows = [3, 40]
    batch = data.collate([train[i] for i in rows], setup.tokenizer.pad_token_id)
    states = ModelSource(setup.teacher, setup.task, 320).signal(batch, frozenset({"hidden_states"})).hidden_states
    for i, row in enumerate(rows):
        got, n = held.hidden("training", "data", row), len(train[row]["input_ids"])
        for layer in (1, 2):
            mean, components = held.features.projection[layer]
            torch.testing.assert_close(components @ components.T, torch.eye(16), rtol=0, atol=1e-5)
            exact = (states[layer][i, :n] - mean) @ components.T
            assert got[layer].shape == (n, 16)
            assert bool(((got[layer] - exact).abs() <= 0.6 * exact.abs().amax(-1, keepdim=True) / 127 + 1e-6).all())
    # 18 bytes a position and layer against 128 for the raw float16 states.
    assert held.features.bytes_per_position() == 2 * 18
    with pytest.raises(ConfigError, match=r"--hidden-dim 65 must be between 1 and the teacher's hidden size \(64\)"):
        build(cfg, k=K, out=tmp_path / "wide", hidden_layers=[2], hidden_dim=65)
    with pytest.raises(ConfigError, match=r"--hidden-layers: layer 3 is out of range; the teacher has layers 0..2"):
        build(cfg, k=K, out=tmp_path / "deep", hidden_layers=[3], hidden_dim=8)


def test_a_hidden_term_trains_from_the_store_as_from_the_teacher(store, tiny, corpus, tmp_path, capfd):
    from distill.cache_teacher import build

    cfg = load_config(None, job_overrides(tiny, corpus, tmp_path / "unused"))
    raw = build(cfg, k=K, out=tmp_path / "raw", shard_rows=16, hidden_layers=[2], hidden_dtype="fp16")
    assert not (raw / "features.safetensors").exists() and Store(raw).features.dim == 64
    # The raw states in float16 train the hidden term as the teacher in the process does (a learned projection, 32 to 64 wide).
    reset_accelerate()
    online, _ = run_job(tiny, corpus, tmp_path / "online", HIDDEN, "eval.at_end=false", "train.max_steps=3")
    reset_accelerate()
    cached, _ = _train(tiny, corpus, tmp_path / "cached", f"teacher.cache={raw}", HIDDEN, "train.max_steps=3", "loss.fused=never")
    a, b = [[m["train/feat_loss"] for m in read_metrics(run) if "train/loss" in m] for run in (online, cached)]
    assert len(a) == 3 and b == pytest.approx(a, rel=2e-3)
    # A student as wide as the teacher, from reduced states (beside mixed targets): compared in the store's coordinates, through its projection.
    reduced = build(cfg, k=K, out=tmp_path / "reduced", shard_rows=16, hidden_layers=[1, 2], hidden_dim=16, method="mixed")
    reset_accelerate()
    wide = "student.architecture={num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4}"
    run, _ = _train(tiny, corpus, tmp_path / "wide", f"teacher.cache={reduced}", wide, HIDDEN.replace("[[1, 2]]", "uniform"))
    losses = [m["train/feat_loss"] for m in read_metrics(run) if "train/loss" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]
    capfd.readouterr()
    # What the store cannot give: one line each, before step 0.
    for where, sets, message in [
        (store, (HIDDEN,), "loss.terms[1]: a hidden term needs the teacher's hidden states, and its store or pool gives none; build the store with "
                           "distill cache-teacher --hidden-layers"),
        (raw, (HIDDEN.replace("[[1, 2]]", "[[1, 1]]"),), "loss.terms[1].layers: teacher layer 1 is not in the store, which holds the hidden states of layer(s) 2"),
    ]:
        reset_accelerate()
        with pytest.raises(ConfigError, match=re.escape(message)):
            _train(tiny, corpus, tmp_path / "refused", f"teacher.cache={where}", *sets)
        assert not (tmp_path / "refused" / "metrics.jsonl").exists()
