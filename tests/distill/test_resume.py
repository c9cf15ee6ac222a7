"""Checkpoints: complete or ignored; a killed run resumes and reproduces the uninterrupted losses."""

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, job_overrides, read_metrics, run_job, reset_accelerate
from distill import checkpoint


def _losses(run_dir):
    return {m["step"]: (m["train/loss"], m["train/kd_loss"], m["train/ce_loss"]) for m in read_metrics(run_dir) if "train/loss" in m}


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(tiny, corpus, tmp_path):
    extra = ("train.max_steps=120", "train.save_every=20", "eval.at_end=false", "train.eval_every=0", "loss.alpha=0.2", "train.warmup_steps=10")
    reference, _ = run_job(tiny, corpus, tmp_path / "reference", *extra)
    reset_accelerate()

    out = tmp_path / "killed"
    sets = [a for o in job_overrides(tiny, corpus, out, *extra) for a in ("--set", o)]
    config = tmp_path / "job.yaml"
    config.write_text("{}\n")
    proc = subprocess.Popen([sys.executable, "-m", "distill_launcher.cli", "run", str(config), *sets], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while checkpoint.latest(out / "checkpoints") is None or checkpoint.latest(out / "checkpoints").name < "step_00000040":
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.latest(out / "checkpoints")
    assert killed_at is not None and not (out / "student").exists()
    # Debris of an interrupted save must never be loaded.
    (out / "checkpoints" / ".tmp-step_00000119").mkdir()
    (out / "checkpoints" / "step_00000118").mkdir()

    result = subprocess.run([sys.executable, "-m", "distill_launcher.cli", "run", str(config), *sets, "--resume"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_from = int(killed_at.name.split("_")[1])
    assert f"resuming from {killed_at}" in result.stderr
    assert resumed_from >= 40
    expected, got = _losses(reference), _losses(out)
    assert sorted(got) == list(range(1, 121))
    for step in range(1, 121):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_incomplete_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000010").mkdir(parents=True)
    (root / "step_00000010" / checkpoint.STATE_FILE).write_text(json.dumps({"step": 10, "samples_consumed": 40}))
    (root / "step_00000020").mkdir()  # renamed before its state file: cannot happen, but must not load
    (root / ".tmp-step_00000030").mkdir()
    (root / ".tmp-step_00000030" / checkpoint.STATE_FILE).write_text("{}")
    assert checkpoint.latest(root).name == "step_00000010"


def test_resume_without_checkpoint_starts_fresh(tiny, corpus, tmp_path, capsys):
    run_dir, _ = run_job(tiny, corpus, tmp_path / "fresh", "train.max_steps=2", "eval.at_end=false", resume=True)
    assert "no complete checkpoint" in capsys.readouterr().err
    assert (run_dir / "student").is_dir()
