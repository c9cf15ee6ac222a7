"""Every error the user can act on, with the exit code it ends the process with.

Torch-free, so the launcher and every entry point (``distill ...`` in-process, and
``python -m distill.job`` under each launcher) map errors the same way through :func:`main_guard`.
A :class:`DistillError` prints as one line, ``distill: error: MESSAGE``, with credentials
redacted; anything else is a bug and prints a (redacted) traceback.

Exit codes (the README lists them):

====  ===================================================================================
0     success; also a job stopped by SIGUSR1 (checkpoint saved, PREEMPTED written: requeue it)
1     an unexpected error (a bug): a traceback follows
2     bad input: config, command-line option, data or model file (:class:`ConfigError`)
3     the loss became NaN or inf (:class:`NonFiniteLoss`)
4     a file in a run directory or checkpoint is unsafe or cannot be restored (:class:`CheckpointError`)
5     no space left on the device while writing (:class:`DiskFull`)
6     another job holds the run directory (:class:`RunLocked`)
7     the teacher pool (teacher.source=remote) gave no answer within teacher.remote_timeout (:class:`TeacherUnavailable`), after a checkpoint
130   interrupted (Ctrl-C)
143   stopped by SIGTERM (:class:`Terminated`), after a checkpoint when one could be saved in time
====  ===================================================================================
"""

from __future__ import annotations

import errno
import os
import sys
import traceback

from distill import noise
from distill.redaction import redact


class DistillError(Exception):
    """An error the user can act on; the message names what to change."""

    exit_code = 1


class ConfigError(DistillError, ValueError):
    """A configuration, option, data or model-file problem; the message names the option to change."""

    exit_code = 2


def check(ok: bool, message: str) -> None:
    """Raises ConfigError(``message``) unless ``ok``: the config's and the kinds' checks, one line each."""
    if not ok:
        raise ConfigError(message)


class LaunchError(ConfigError):
    """A bad launch request (launcher, topology, SLURM options)."""


class NonFiniteLoss(DistillError):
    """The loss became NaN or inf."""

    exit_code = 3


class CheckpointError(DistillError):
    """A checkpoint or run-directory file that must not be loaded (it could run code), or that
    cannot be restored; the message names the file."""

    exit_code = 4


class DiskFull(DistillError):
    """No space left while writing a checkpoint, the student or a report."""

    exit_code = 5


class RunLocked(DistillError):
    """Another job is writing to the same run directory."""

    exit_code = 6


class TeacherUnavailable(DistillError):
    """The teacher pool did not answer within teacher.remote_timeout; a checkpoint was saved first when training had started."""

    exit_code = 7


class Terminated(DistillError):
    """SIGTERM (a time limit, scancel, kill) stopped the job."""

    exit_code = 143


EXIT_INTERRUPTED = 130


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def report(err: BaseException) -> int:
    """Prints ``err`` as one redacted line and returns its exit code."""
    message = " ".join(str(err).split("\n")) if isinstance(err, DistillError) else str(err)
    print(f"distill: error: {redact(message)}", file=sys.stderr, flush=True)
    return getattr(err, "exit_code", 1)


def print_redacted_traceback(err: BaseException) -> None:
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    print(redact(text), file=sys.stderr, end="", flush=True)


EXIT_DIR_ENV = "DISTILL_EXIT_DIR"


def main_guard(fn, *args, **kwargs) -> int:
    """Runs an entry point and maps what it raises to an exit code, the same way everywhere.

    Under ``distill launch`` (which sets DISTILL_EXIT_DIR) each job process also records its code,
    because torchrun and the deepspeed launcher replace a failed process's code by their own.
    """

    noise.install()
    code = _guarded(fn, *args, **kwargs)
    exit_dir = os.environ.get(EXIT_DIR_ENV)
    if exit_dir and code:
        try:
            with open(os.path.join(exit_dir, f"rank-{int(os.environ.get('RANK', '0') or 0):06d}"), "w") as f:
                f.write(str(code))
        except OSError:
            pass
    return code


def launched_exit_code(exit_dir: str, launcher_code: int) -> int:
    """The exit code of a launch: the lowest failing rank's own code, else the launcher's."""
    try:
        names = sorted(os.listdir(exit_dir))
    except OSError:
        names = []
    for name in names:
        try:
            with open(os.path.join(exit_dir, name)) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return launcher_code


def _guarded(fn, *args, **kwargs) -> int:
    try:
        code = fn(*args, **kwargs)
        return 0 if code is None else code
    except DistillError as err:
        return report(err)
    except KeyboardInterrupt:
        print("distill: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:
        if err.errno == errno.ENOSPC:  # a write outside the guarded saves (a log, a report)
            where = f" writing {err.filename}" if err.filename else ""
            return report(DiskFull(f"no space left on device{where}; free space and rerun (with --resume when checkpoints exist)"))
        print_redacted_traceback(err)
        return 1
    except Exception as err:
        print_redacted_traceback(err)
        return 1
