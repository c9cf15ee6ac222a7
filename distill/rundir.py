"""The run directory: checked before anything loads, reused only on request, one writer at a time.

Torch-free, so that the launcher can check a directory before it starts any process.

- :func:`check_writable`: creatable, a directory, writable, with some free space.
- :func:`check_reuse`: a directory that already holds a run (a config, checkpoints or a student)
  is reused only with ``--resume``, or with ``--overwrite``, which first removes what the old run
  wrote (:data:`RUN_OUTPUTS`; other files are left alone).
- :class:`RunLock`: one job per run directory. The lock is a file created atomically, whole, by
  hard-linking a fully written private file into place (atomic on NFS v3+ and Lustre, unlike
  ``flock``), holding the holder's host, PID, process start time and SLURM job; the holder touches it every
  :data:`HEARTBEAT_SECONDS`. A lock is stale, and taken over, when its holder's process is gone
  (same host), when it belongs to an earlier attempt of the same SLURM job, or when its heartbeat
  is older than :data:`STALE_AFTER_SECONDS` (another host).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import yaml

from distill.errors import ConfigError, RunLocked

LOCK_FILE = "distill.lock"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0
MIN_FREE_BYTES = 16 * 2**20


class RunDir:
    """One run directory: the names of the files a run writes, reading them back, and writing them atomically.

    Every module that opens a run (the job, eval, quantize, compare, plots, the report, sweeps, the
    trackers, the model card) names its files through this class; no other module spells them.
    """

    CONFIG, EVAL, INITIAL_EVAL, REPORT, METRICS = "config.yaml", "eval.json", "initial_eval.json", "report.md", "metrics.jsonl"
    CHECKPOINTS, STUDENT, ADAPTER, OBJECTIVE, QUANTIZED, PLOTS = "checkpoints", "student", "adapter", "objective", "quantized", "plots"
    PREEMPTED = "PREEMPTED"  # written when SIGUSR1 stopped the job; the sbatch script requeues
    SAMPLES = "samples.jsonl"  # the student's completions of validation prompts at each evaluation (rollout.samples)
    TENSORBOARD, WANDB, WANDB_ID = "tensorboard", "wandb", ".wandb_id"
    MLFLOW_DB, MLFLOW_ARTIFACTS, MLFLOW_RUN_ID = "mlflow.db", "mlflow-artifacts", ".mlflow_run_id"
    OUTPUTS = (CONFIG, CHECKPOINTS, STUDENT, ADAPTER, OBJECTIVE, QUANTIZED, EVAL, REPORT, INITIAL_EVAL, METRICS, SAMPLES, PLOTS, PREEMPTED,
               TENSORBOARD, WANDB, MLFLOW_DB, MLFLOW_ARTIFACTS, WANDB_ID, MLFLOW_RUN_ID)  # what --overwrite removes
    MARKERS = (CONFIG, CHECKPOINTS, STUDENT)  # what makes a directory hold a run

    def __init__(self, path: str | os.PathLike):
        self.path = Path(os.path.expanduser(str(path)))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    config = property(lambda self: self.path / self.CONFIG)
    eval = property(lambda self: self.path / self.EVAL)
    initial_eval = property(lambda self: self.path / self.INITIAL_EVAL)
    report = property(lambda self: self.path / self.REPORT)
    metrics = property(lambda self: self.path / self.METRICS)
    checkpoints = property(lambda self: self.path / self.CHECKPOINTS)
    student = property(lambda self: self.path / self.STUDENT)
    adapter = property(lambda self: self.path / self.ADAPTER)
    objective = property(lambda self: self.path / self.OBJECTIVE)
    quantized = property(lambda self: self.path / self.QUANTIZED)
    plots = property(lambda self: self.path / self.PLOTS)
    preempted = property(lambda self: self.path / self.PREEMPTED)
    samples = property(lambda self: self.path / self.SAMPLES)

    def read_eval(self) -> dict | None:
        return read_json(self.eval)

    def read_initial_eval(self) -> dict | None:
        return read_json(self.initial_eval)

    def read_config(self) -> dict | None:
        """The saved config as a plain mapping (None when missing or unreadable)."""

        try:
            value = yaml.safe_load(self.config.read_text())
        except (OSError, yaml.YAMLError):
            return None
        return value if isinstance(value, dict) else None

    def records(self) -> list[dict]:
        """metrics.jsonl's records (torn lines skipped)."""
        return read_metrics(self.metrics)

    def last_samples(self) -> list[dict]:
        """The student's sample completions of the last evaluation that wrote any (samples.jsonl), or none."""
        rows = read_metrics(self.samples) if self.samples.is_file() else []
        last = max((row.get("step", 0) for row in rows), default=None)
        return [row for row in rows if row.get("step") == last]

    def write(self, name: str, content: str | bytes) -> Path:
        """``name`` in the run directory, written whole or not at all and never through a link."""
        write_atomic(self.path / name, content)
        return self.path / name

    def write_json(self, name: str, value) -> Path:
        return self.write(name, json.dumps(value, indent=2))

    def is_run(self) -> bool:
        return self.config.is_file()

    def finished(self) -> bool:
        """Saved its student and its evaluation, and was not stopped to be requeued."""
        return self.student.is_dir() and self.eval.is_file() and not self.preempted.exists()


# What a run writes; --overwrite removes exactly these.
RUN_OUTPUTS = RunDir.OUTPUTS
RUN_MARKERS = RunDir.MARKERS


def read_json(path: Path) -> dict | None:
    """A JSON object a run wrote (eval.json, initial_eval.json, ...); None when it is missing, torn or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_atomic(path: Path, content: str | bytes) -> None:
    """Writes ``path`` whole or not at all, and never through a symbolic link.

    The content goes to a fresh private name (created with ``O_EXCL | O_NOFOLLOW``, so a planted
    link is never written through), is synced, and is renamed over ``path``: a rename replaces a
    link at ``path`` itself instead of following it, and a reader sees the old file or the new one.
    """
    path = Path(path)
    data = content.encode() if isinstance(content, str) else content
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_dir_atomic(path: Path, write) -> None:
    """``write(tmp)`` into a fresh folder beside ``path``, then renamed to ``path``: a failed write leaves
    ``path`` as it was and no partial folder (the error is raised again for the caller to report)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.is_symlink():
        path.unlink()
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)


def open_log(path: Path, *, append: bool):
    """A text file opened for writing (appending, or from empty) that is not a symbolic link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    try:
        return os.fdopen(os.open(path, flags, 0o644), "a" if append else "w")
    except OSError:
        if Path(path).is_symlink():
            raise ConfigError(f"refusing to write {path}: it is a symbolic link (to {os.path.realpath(path)}); remove it") from None
        raise


def outside_links(run_dir: Path) -> list[tuple[Path, str]]:
    """Symbolic links under ``run_dir`` that lead outside it (``run_dir`` itself may be a link the user made)."""
    root = os.path.realpath(run_dir)
    found = []

    def judge(entry: str) -> None:
        real = os.path.realpath(entry)
        if os.path.islink(entry) and os.path.commonpath([root, real]) != root:
            found.append((Path(entry), real))

    # What a run writes (a run directory may sit in a larger folder: the rest is not walked). Inside
    # wandb/ the links are W&B's own (its debug logs point into its cache) and W&B writes there, not the job.
    for name in (*RUN_OUTPUTS, LOCK_FILE, "slurm"):
        top = os.path.join(run_dir, name)
        judge(top)
        if os.path.isdir(top) and not os.path.islink(top) and name != "wandb":
            for folder, dirs, files in os.walk(top):  # links are listed, never entered
                for entry in [*dirs, *files]:
                    judge(os.path.join(folder, entry))
    return found


def check_links(run_dir: Path) -> None:
    """Fails, naming the link, when a symbolic link in ``run_dir`` leads outside it: the job would
    write (or read) through it into someone else's files."""
    found = outside_links(run_dir)
    if found:
        entry, real = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ConfigError(f"output_dir {run_dir}: {entry.relative_to(run_dir)} is a symbolic link to {real}, outside the run directory{more}; "
                          "remove it, or choose another --output-dir")


def check_writable(run_dir: Path) -> bool:
    """Fails, naming output_dir, unless ``run_dir`` can hold a run; returns whether it created the directory."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} exists and is not a directory; choose another --output-dir")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output_dir {run_dir} cannot be created ({err.strerror}); choose another --output-dir") from None
    probe = run_dir / f".write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir {run_dir} is not writable ({err.strerror}); choose another --output-dir") from None
    free = shutil.disk_usage(run_dir).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(f"output_dir {run_dir} has only {free / 2**20:.1f} MiB free (at least {MIN_FREE_BYTES // 2**20} MiB needed); "
                          "free space or choose another --output-dir")
    return created


def remove_created(run_dir: Path, before: set[str]) -> None:
    """Undoes a run that failed before training: removes the run outputs that were not in
    ``before`` (the names ``run_dir`` held when the run started). A user's own files are never touched."""
    for name in RUN_OUTPUTS:
        if name not in before:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink(missing_ok=True)


def holds_run(run_dir: Path) -> list[str]:
    """The names that mark ``run_dir`` as holding a run (empty when it does not)."""
    return [name for name in RUN_MARKERS if (run_dir / name).exists()]


def check_reuse(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; use one")
    found = holds_run(run_dir)
    if found and not resume and not overwrite:
        raise ConfigError(f"output_dir {run_dir} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                          "or --overwrite to delete its checkpoints, student and reports and start over")


def clear_run(run_dir: Path) -> None:
    """Removes what an earlier run wrote into ``run_dir`` (``--overwrite``)."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _process_start_time(pid: int) -> float | None:
    import psutil  # start-up time: the command line stays free of psutil until a command needs it

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _holder_info() -> dict:
    return {
        "host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start_time(os.getpid()), "since": time.time(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "token": uuid.uuid4().hex,
    }


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # torn or foreign: judged by its age alone


def stale_reason(holder: dict, age: float) -> str | None:
    """Why the lock of ``holder`` (heartbeat ``age`` seconds ago) no longer protects anything."""
    me = _holder_info()
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"] \
            and int(holder.get("slurm_restart_count", 0)) < me["slurm_restart_count"]:
        return "an earlier attempt of this SLURM job"
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
        started = _process_start_time(holder["pid"])
        if started is None or (holder.get("process_start") and abs(started - holder["process_start"]) > 1.0):
            return f"process {holder['pid']} has exited"
        return None
    if age > STALE_AFTER_SECONDS:
        return f"no heartbeat for {age:.0f} s"
    return None


def describe(holder: dict, age: float) -> str:
    if not holder:
        return f"an unreadable lock file, last touched {age:.0f} s ago"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    slurm = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{slurm}, since {since}, last heartbeat {age:.0f} s ago"


class RunLock:
    """Held by one process of a job (the main one) from before the first write until exit."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.info = _holder_info()
        self._stop = threading.Event()
        self._thread = None
        self.held = False

    def acquire(self) -> "RunLock":
        # The lock appears whole or not at all: its content is written to a private file first and
        # hard-linked into place (an atomic create-if-absent, also on NFS), so a signal or crash
        # never leaves an empty lock, and release() can always recognise its own by the token.
        private = self.path.with_name(f".{LOCK_FILE}.{self.info['token']}")
        with open(private, "w") as f:
            json.dump(self.info, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            for _ in range(3):
                try:
                    os.link(private, self.path)
                except FileExistsError:
                    self._take_over_if_stale()
                    continue
                self.held = True  # ours from here: a stop signal raised inside start() below still releases it
                self._thread = threading.Thread(target=self._heartbeat, name="distill-lock-heartbeat", daemon=True)
                self._thread.start()
                return self
        finally:
            private.unlink(missing_ok=True)
        raise RunLocked(f"could not take the lock {self.path}; another job is starting in output_dir {self.path.parent}")

    def _take_over_if_stale(self) -> None:
        holder = _read(self.path)
        if holder is None:  # released meanwhile
            return
        age = _age(self.path)
        reason = stale_reason(holder, age)
        if reason is None:
            raise RunLocked(f"output_dir {self.path.parent} is in use by another distill job ({describe(holder, age)}); "
                            "wait for it to finish or choose another --output-dir")
        # Move the stale lock aside under a unique name, then check that what was moved is what
        # was judged stale (another process may have taken it over in between); if not, put it back.
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _read(aside) != holder:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            raise RunLocked(f"output_dir {self.path.parent} was just taken by another distill job; choose another --output-dir")
        aside.unlink(missing_ok=True)
        print(f"distill: taking over the lock of {describe(holder, age)}: {reason}", file=sys.stderr)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self.held = False
        self.path.with_name(f".{LOCK_FILE}.{self.info['token']}").unlink(missing_ok=True)
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():  # a signal may have come before start() ran
            self._thread.join(timeout=5)
        if (_read(self.path) or {}).get("token") == self.info["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _age(path: Path) -> float:
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return 0.0


def check_not_locked(run_dir: Path) -> None:
    """Fails at once when a live job holds ``run_dir`` (for launchers, before they start processes)."""
    path = run_dir / LOCK_FILE
    holder = _read(path)
    if holder is None:
        return
    age = _age(path)
    if stale_reason(holder, age) is None:
        raise RunLocked(f"output_dir {run_dir} is in use by another distill job ({describe(holder, age)}); "
                        "wait for it to finish or choose another --output-dir")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn line (a write cut short by a kill) is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def train_seconds(records: list[dict]) -> float:
    """Training time: each logged window's mean step time times the steps it covers."""
    total, previous = 0.0, 0
    for record in sorted((r for r in records if "train/loss" in r), key=lambda r: r["step"]):
        if not isinstance(record.get("train/step_seconds"), (int, float)):
            return math.nan  # a run logged before step times were recorded
        total += record["train/step_seconds"] * (record["step"] - previous)
        previous = record["step"]
    return total


def truncate_metrics(path: Path, step: int) -> None:
    """Drops records after ``step`` (and torn lines) from metrics.jsonl, so a resumed run continues it cleanly."""
    if not path.exists():
        return
    kept = [record for record in read_metrics(path) if record.get("step", 0) <= step]
    write_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))
