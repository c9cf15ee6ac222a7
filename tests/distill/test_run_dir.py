"""The run directory: checked before any model loads, reused only on request, one writer at a time,
and a full disk reported in one line with nothing partial left behind."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import REPO, job_overrides, read_metrics, reset_accelerate, run_job
from distill import checkpoint, rundir
from distill_launcher.cli import main

MISSING_TEACHER = "teacher.path=/nonexistent/teacher"  # so an error about output_dir proves it came first


EMPTY_CONFIG = Path(tempfile.mkdtemp()) / "empty.yaml"
EMPTY_CONFIG.write_text("{}\n")


def cli_argv(tiny, corpus, out, *extra, flags=()):
    config = EMPTY_CONFIG
    sets = [a for o in job_overrides(tiny, corpus, out, *extra) for a in ("--set", o)]
    return ["run", str(config), *sets, *flags]


def last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("distill: error: "), lines[-5:]
    return lines[-1]


@contextmanager
def tmpfs(path: Path, size: str, *options: str):
    """A real small file system (root, as on CI and the dev machines)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_output_dir_that_is_a_file_fails_before_loading(tiny, corpus, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("not a directory")
    assert main(cli_argv(tiny, corpus, out, MISSING_TEACHER)) == 2
    assert "output_dir" in (line := last_error(capsys)) and "is not a directory" in line and "--output-dir" in line


def test_read_only_output_dir_fails_before_loading(tiny, corpus, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        assert main(cli_argv(tiny, corpus, ro / "run", MISSING_TEACHER)) == 2
        line = last_error(capsys)
        assert f"output_dir {ro / 'run'} cannot be created" in line and "Read-only" in line
        assert main(cli_argv(tiny, corpus, ro, MISSING_TEACHER)) == 2
        assert "is not writable" in last_error(capsys)


def test_almost_full_disk_fails_before_loading(tiny, corpus, tmp_path, capsys):
    with tmpfs(tmp_path / "small", "4m") as small:
        assert main(cli_argv(tiny, corpus, small / "run", MISSING_TEACHER)) == 2
        assert "MiB free" in last_error(capsys)


def test_finished_run_is_reused_only_with_resume_or_overwrite(tiny, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ("train.max_steps=4", "train.save_every=2", "eval.at_end=false")
    assert main(cli_argv(tiny, corpus, out, *extra)) == 0
    old_student = (out / "student" / "model.safetensors").read_bytes()
    reset_accelerate()
    assert main(cli_argv(tiny, corpus, out, *extra)) == 2
    line = last_error(capsys)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert (out / "student" / "model.safetensors").read_bytes() == old_student  # nothing touched
    (out / "notes.txt").write_text("mine")
    assert main(cli_argv(tiny, corpus, out, *extra, "train.max_steps=2", "train.seed=7", flags=["--overwrite"])) == 0
    # The old run's checkpoints are gone, so a later --resume cannot pick them up.
    assert [p.name for p in checkpoint.complete_checkpoints(out / "checkpoints")] == ["step_00000002"]
    assert [m["step"] for m in read_metrics(out) if "train/loss" in m] == [1, 2]
    assert (out / "student" / "model.safetensors").read_bytes() != old_student
    assert (out / "notes.txt").read_text() == "mine"  # only what a run writes is removed


def test_resume_and_overwrite_are_exclusive(tiny, corpus, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(cli_argv(tiny, corpus, tmp_path / "run", flags=["--resume", "--overwrite"]))
    assert exit_info.value.code == 2


def test_torn_metrics_line_does_not_break_resume(tiny, corpus, tmp_path):
    out = tmp_path / "run"
    extra = ("train.max_steps=4", "train.save_every=2", "eval.at_end=false")
    run_job(tiny, corpus, out, *extra)
    reset_accelerate()
    shutil_rm = __import__("shutil").rmtree
    shutil_rm(out / "checkpoints" / "step_00000004")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # a write cut short by a kill
    run_job(tiny, corpus, out, *extra, resume=True)
    steps = [m["step"] for m in read_metrics(out)]
    assert steps == [1, 2, 3, 4]
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


# ----------------------------------------------------------------------------- one writer


def start_run(tiny, corpus, out, *extra, flags=()):
    argv = cli_argv(tiny, corpus, out, *extra, flags=flags)
    return subprocess.Popen([sys.executable, "-m", "distill_launcher.cli", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(predicate, timeout=300, what="it"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_second_job_on_the_same_directory_fails_at_once_naming_the_holder(tiny, corpus, tmp_path):
    out = tmp_path / "run"
    long = ("train.max_steps=100000", "eval.at_end=false", "train.log_every=50", "train.save_every=5")
    first = start_run(tiny, corpus, out, *long)
    try:
        wait_for(lambda: checkpoint.latest(out / "checkpoints") is not None or first.poll() is not None, what="the first job's checkpoint")
        assert first.poll() is None, first.stderr.read()[-3000:]
        second = subprocess.run([sys.executable, "-m", "distill_launcher.cli", *cli_argv(tiny, corpus, out, *long, flags=["--resume"])],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 6, second.stderr[-3000:]
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith("distill: error: output_dir") and "in use by another distill job" in line and f"pid {first.pid}" in line
        # The holder was not disturbed: it is still training and its metrics are whole.
        assert first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # A holder that died (SIGKILL: no clean-up) leaves a stale lock, which the next job takes over.
    holder = json.loads((out / rundir.LOCK_FILE).read_text())
    assert holder["pid"] == first.pid
    third = subprocess.run([sys.executable, "-m", "distill_launcher.cli",
                            *cli_argv(tiny, corpus, out, "train.max_steps=12", "eval.at_end=false", "train.save_every=5", flags=["--resume"])],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the lock of pid {first.pid}" in third.stderr and "has exited" in third.stderr
    assert not (out / rundir.LOCK_FILE).exists()  # released at exit


def test_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / rundir.LOCK_FILE
    lock.write_text(json.dumps({"host": "node-that-is-not-this-one", "pid": 1, "since": time.time()}))
    with pytest.raises(rundir.RunLocked, match="pid 1 on node-that-is-not-this-one"):
        rundir.RunLock(run_dir).acquire()
    old = time.time() - rundir.STALE_AFTER_SECONDS - 5
    os.utime(lock, (old, old))
    held = rundir.RunLock(run_dir).acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    held.release()
    assert not lock.exists()


def test_lock_of_an_earlier_attempt_of_the_same_slurm_job_is_stale(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / rundir.LOCK_FILE).write_text(json.dumps({"host": "other-node", "pid": 1, "slurm_job_id": "42", "slurm_restart_count": 0}))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    rundir.RunLock(run_dir).acquire().release()


# ----------------------------------------------------------------------------- a full disk


@pytest.mark.slow
def test_disk_full_during_a_checkpoint(tiny, corpus, tmp_path):
    with tmpfs(tmp_path / "disk", "64m") as disk:
        out = disk / "run"
        run = start_run(tiny, corpus, out, "train.max_steps=400", "train.save_every=20", "train.log_every=1000", "eval.at_end=false",
                        "train.keep_checkpoints=5")
        try:
            wait_for(lambda: checkpoint.latest(out / "checkpoints") is not None or run.poll() is not None, what="the first checkpoint")
            first = checkpoint.latest(out / "checkpoints")
            # Something else fills the disk while the job trains.
            subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'ballast'}", "bs=1M"], capture_output=True)
            _, stderr = run.communicate(timeout=600)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
        assert run.returncode == 5, stderr[-3000:]
        line = stderr.strip().splitlines()[-1]
        assert line.startswith("distill: error: no space left on device writing the checkpoint of step"), line
        assert "MiB needed" in line and f"the last complete checkpoint is {out / 'checkpoints'}" in line
        assert not list((out / "checkpoints").glob(".tmp-*"))  # the partial checkpoint is gone
        kept = checkpoint.latest(out / "checkpoints")
        assert kept is not None and kept.name >= first.name
        checkpoint.verify(kept)  # complete and loadable
        assert "Traceback" not in stderr


def test_disk_full_during_the_final_save(tiny, tmp_path):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from distill.config import LossConfig
    from distill.errors import DiskFull
    from distill.job import save_student
    from distill.objective import Distillee, build_objective
    from distill.tasks import CausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    with tmpfs(tmp_path / "disk", "256k") as disk:
        (disk / "student").mkdir()
        (disk / "student" / "kept.txt").write_text("the previous student")
        with pytest.raises(DiskFull, match="no space left on device writing the student") as err:
            save_student(Accelerator(cpu=True), Distillee(model, build_objective(LossConfig()), CausalLM(), 320), tiny["tokenizer"], disk / "student")
        assert "MiB needed" in str(err.value)
        assert sorted(p.name for p in disk.iterdir()) == ["student"]  # no partial .tmp-student
        assert (disk / "student" / "kept.txt").read_text() == "the previous student"


def test_eval_and_quantize_are_writers_too(tmp_path):
    from conftest import distill_cli

    run_dir = tmp_path / "run"
    (run_dir / "student").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("teacher: {path: t}\nstudent: {architecture: {num_hidden_layers: 1}}\ndata: {train_files: [a.txt]}\n")
    (run_dir / "eval.json").write_text("{}")
    with rundir.RunLock(run_dir):  # a job of this (live) process holds the directory
        for argv in (["eval", str(run_dir)], ["quantize", str(run_dir), "--method", "int8_dynamic"]):
            result = distill_cli(*argv)
            assert result.returncode == 6, result.stderr[-2000:]
            assert f"pid {os.getpid()}" in result.stderr.strip().splitlines()[-1]


def test_the_loss_plot_keeps_a_term_equal_to_the_total_visible():
    """An objective of one term logs a term equal to the total loss; both lines stay visible."""
    from distill.plots import loss_figure

    records = [{"step": s, "train/loss": 3.0 / s, "train/kd_loss": 3.0 / s, "train/ce_loss": 4.0 / s} for s in range(1, 21)]
    (ax,) = loss_figure(records).axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"loss", "kd_loss (= loss)", "ce_loss"}
    styles = [(line.get_linestyle(), line.get_linewidth(), line.get_marker()) for line in lines.values()]
    assert len(set(styles)) == 3  # no line drawn exactly over another in the same style
    assert lines["loss"].get_linewidth() > lines["kd_loss (= loss)"].get_linewidth() and lines["loss"].get_alpha() < 1


def test_a_lock_interrupted_before_its_heartbeat_started_still_releases(tmp_path, monkeypatch):
    """A stop signal raises inside acquire(): between taking the lock file and starting the heartbeat thread."""
    import threading

    from distill import rundir

    def interrupted(self):
        raise KeyboardInterrupt  # what a signal handler's exception looks like to the code it interrupts

    monkeypatch.setattr(threading.Thread, "start", interrupted)
    lock = rundir.RunLock(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        lock.acquire()
    assert lock.held and (tmp_path / rundir.LOCK_FILE).exists()
    lock.release()  # no "cannot join thread before it is started"
    assert not (tmp_path / rundir.LOCK_FILE).exists()
