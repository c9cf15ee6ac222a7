"""SIGUSR1 and SIGTERM at every moment of a real `distill run` process: during setup, during
training and after the last step."""

import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import pytest

from conftest import REPO, job_overrides, read_metrics
from distill import checkpoint, rundir
from distill.signals import TERM, USR1, SetupInterrupted, StopSignals

EMPTY_CONFIG = Path(tempfile.mkdtemp()) / "empty.yaml"
EMPTY_CONFIG.write_text("{}\n")


def start(tiny, corpus, out, *extra, flags=()):
    sets = [a for o in job_overrides(tiny, corpus, out, *extra) for a in ("--set", o)]
    return subprocess.Popen([sys.executable, "-m", "distill_launcher.cli", "run", str(EMPTY_CONFIG), *sets, *flags], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, what, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before {what}: {proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def finish(proc):
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def test_a_setup_stop_raised_where_python_drops_it_comes_again_unprinted(capfd):
    # A handler that runs inside a weakref callback (importlib's module-lock cleanup, in a real job) raises
    # where Python can only drop the exception: it is delivered again, and nothing is printed.
    signals = StopSignals()
    signals.install()
    try:
        signals.enter("setup")

        class Held:
            pass

        held = Held()
        ref = weakref.ref(held, lambda _: [signal.raise_signal(signal.SIGTERM), sum(range(1000))])  # noqa: F841
        with pytest.raises(SetupInterrupted) as stop:
            del held
            deadline = time.time() + 30
            while time.time() < deadline:
                time.sleep(0.01)
        assert stop.value.name == TERM
        assert capfd.readouterr().err == ""
    finally:
        signals.uninstall()


def test_a_setup_stop_that_a_library_swallowed_still_stops_before_training():
    signals = StopSignals()
    signals.install()
    try:
        signals.enter("setup")
        try:
            signal.raise_signal(signal.SIGUSR1)
            time.sleep(1)
        except:  # noqa: E722  (as a library's bare except would)
            pass
        with pytest.raises(SetupInterrupted) as stop:
            signals.enter("training")
        assert stop.value.name == USR1 and signals.phase == "setup"
    finally:
        signals.uninstall()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_during_setup_stops_cleanly(tiny, corpus, tmp_path, signum):
    out = tmp_path / "run"
    proc = start(tiny, corpus, out, "train.max_steps=5")
    # The lock is taken first thing in setup, before any model or data is loaded.
    wait_for(lambda: (out / rundir.LOCK_FILE).exists(), proc, "setup")
    proc.send_signal(signum)
    code, _, err = finish(proc)
    assert "Traceback" not in err, err[-3000:]
    assert not (out / "student").exists() and not (out / rundir.LOCK_FILE).exists()
    if signum == signal.SIGUSR1:
        # Requeueable: the sbatch script requeues on PREEMPTED, and --resume starts from scratch.
        assert code == 0, err[-3000:]
        assert "SIGUSR1 during setup" in err and (out / checkpoint.PREEMPTED_MARKER).exists()
        again = start(tiny, corpus, out, "train.max_steps=3", "eval.at_end=false", flags=["--resume"])
        code, _, err = finish(again)
        assert code == 0, err[-3000:]
        assert (out / "student").is_dir() and not (out / checkpoint.PREEMPTED_MARKER).exists()
    else:
        assert code == 143
        assert err.strip().splitlines()[-1] == "distill: error: SIGTERM during setup: stopped before training, nothing to save"
        assert not (out / checkpoint.PREEMPTED_MARKER).exists()


@pytest.mark.slow
def test_sigterm_during_training_saves_a_checkpoint_and_exits_nonzero(tiny, corpus, tmp_path):
    out = tmp_path / "run"
    proc = start(tiny, corpus, out, "train.max_steps=100000", "train.save_every=7", "train.log_every=1", "eval.at_end=false")
    wait_for(lambda: checkpoint.latest(out / "checkpoints") is not None, proc, "the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 143, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("distill: error: SIGTERM at step ") and "checkpoint saved in" in line
    step = int(line.split("SIGTERM at step ")[1].split(":")[0])
    assert checkpoint.latest(out / "checkpoints").name == f"step_{step:08d}"  # the step it stopped at, not the last periodic one
    assert max(m["step"] for m in read_metrics(out)) == step
    assert not (out / checkpoint.PREEMPTED_MARKER).exists() and not (out / rundir.LOCK_FILE).exists()


@pytest.mark.slow
def test_sigterm_skips_a_save_that_cannot_finish_in_time(tiny, corpus, tmp_path):
    out = tmp_path / "run"
    proc = start(tiny, corpus, out, "train.max_steps=100000", "train.save_every=7", "train.log_every=1", "eval.at_end=false",
                 "train.stop_grace_seconds=0")
    wait_for(lambda: checkpoint.latest(out / "checkpoints") is not None, proc, "the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 143, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert "no checkpoint saved" in line and "train.stop_grace_seconds=0" in line and "resume from" in line


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_after_the_last_step_finishes_the_student_and_report(tiny, corpus, tmp_path, signum):
    out = tmp_path / "run"
    # A slow evaluation (many timed repeats) keeps the job in its finishing phase long enough.
    proc = start(tiny, corpus, out, "train.max_steps=3", "eval.speed_repeats=200", "eval.latency_new_tokens=16")
    wait_for(lambda: (out / "student" / "config.json").exists(), proc, "the student to be saved")
    proc.send_signal(signum)
    code, stdout, err = finish(proc)
    assert code == 0, err[-3000:]
    assert f"{signal.Signals(signum).name} after the last step: finishing the student and the report" in err
    assert (out / "eval.json").is_file() and "| student" in stdout
    assert not (out / checkpoint.PREEMPTED_MARKER).exists()


def test_an_in_process_run_restores_the_signal_handlers(tiny, corpus, tmp_path):
    from conftest import run_job

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    run_job(tiny, corpus, tmp_path / "run", "train.max_steps=1", "eval.at_end=false")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its SigCgt mask in /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(mask >> (signum - 1) & 1)


# 0.05 s apart from the process's start to 0.75 s: the `distill` command, argparse, the config and torch importing.
EARLY = [round(0.05 * i, 2) for i in range(1, 16)]


@pytest.mark.slow
def test_a_stop_signal_in_the_first_instants_is_handled(tiny, corpus, tmp_path):
    """From the first module of the `distill` command on, SIGUSR1 leaves a requeueable PREEMPTED run (exit 0) and SIGTERM
    ends it with 143 and nothing behind; never death by the signal itself (exit 138 or 143 with no word)."""
    command = Path(sys.executable).parent / "distill"  # the console script a user (and an sbatch script) runs
    failures = []
    for i, delay in enumerate(EARLY):
        signum = signal.SIGTERM if i % 5 == 2 else signal.SIGUSR1
        out = tmp_path / f"run{i}"
        sets = [a for o in job_overrides(tiny, corpus, out, "train.max_steps=3") for a in ("--set", o)]
        proc = subprocess.Popen([str(command), "run", str(EMPTY_CONFIG), *sets], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        start = time.monotonic()
        time.sleep(delay)
        # The interpreter's own start (tens of ms, longer on a busy machine) comes before any code of ours: at an
        # instant inside it, the signal goes as soon as the process catches it, which must be long before the heavy imports.
        while not catches(proc.pid, signum):
            assert proc.poll() is None and time.monotonic() - start < 5.0, "no handler 5 s after start"
            time.sleep(0.001)
        proc.send_signal(signum)
        code, _, err = finish(proc)
        if signum == signal.SIGUSR1:
            ok = code == 0 and "SIGUSR1 during setup" in err and (out / checkpoint.PREEMPTED_MARKER).exists()
        else:
            ok = code == 143 and err.strip().endswith("SIGTERM during setup: stopped before training, nothing to save") and not out.exists()
        if not ok:
            failures.append(f"{signal.Signals(signum).name} at {delay} s: exit {code}, {err.strip()[-300:]!r}")
    assert not failures, "\n".join(failures)
