"""SIGUSR1 and SIGTERM, handled from the start of a job process to its exit.

SIGUSR1 is the warning a scheduler sends before a time limit or a preemption (``--signal=B:USR1``):
save, stop, and be requeued. SIGTERM is what SLURM sends at the time limit and what ``scancel`` and
``kill`` send: save if there is time, then exit non-zero. What a signal does depends on the phase:

- ``idle`` (the process is starting, the config is not read yet): recorded; acted on when setup starts.
- ``setup`` (loading models and data; nothing to save yet): the job stops at once, by raising
  :class:`SetupInterrupted` from the handler. SIGUSR1 leaves the PREEMPTED marker, so the sbatch
  script requeues the job and ``--resume`` starts from the last checkpoint, or from scratch.
  Python drops an exception raised where it cannot propagate (a handler that runs inside a weakref
  callback such as importlib's module-lock cleanup, or a ``__del__``): such a drop is not printed
  and the signal is sent to the main thread again; and whatever swallowed it (a bare ``except:``
  in a library), setup never ends into training with a setup signal recorded.
- ``training``: recorded; the loop checks once per step, and all processes agree on it, so every
  rank saves the same checkpoint and stops at the same step.
- ``finishing`` (after the last step: saving the student, evaluating): recorded and ignored; the
  job finishes and exits 0.
"""

from __future__ import annotations

import signal
import sys
import threading

USR1, TERM = "SIGUSR1", "SIGTERM"


class SetupInterrupted(BaseException):
    """A stop signal arrived during setup. A BaseException, so library code that catches
    ``Exception`` (and there is some) cannot swallow it."""

    def __init__(self, name: str):
        super().__init__(f"{name} during setup")
        self.name = name


class StopSignals:
    def __init__(self):
        self.phase = "idle"
        self.received: set[str] = set()
        self._previous: dict | None = None
        self._unraisable = None

    def install(self) -> bool:
        """Installs the handlers; call first thing in a job process. Returns False when they
        were installed already (then the earlier caller owns them)."""
        if self._previous is not None:
            return False
        self._previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGUSR1, signal.SIGTERM)}
        self._unraisable, sys.unraisablehook = sys.unraisablehook, self._dropped
        return True

    def uninstall(self) -> None:
        """Restores the handlers found by :meth:`install` (a job run inside a longer process)."""
        for signum, handler in (self._previous or {}).items():
            signal.signal(signum, handler)
        if self._unraisable is not None:
            sys.unraisablehook, self._unraisable = self._unraisable, None
        self._previous = None

    def hand_back(self) -> None:
        """For a command that is not a job: the handlers found at start again (the defaults), and
        every signal recorded so far delivered now under them, as it would have been without
        the early handler."""
        received = [name for name in (USR1, TERM) if name in self.received]
        self.uninstall()
        self.reset()
        for name in received:
            signal.raise_signal(signal.Signals[name])

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.received.add(name)
        if self.phase == "setup":
            raise SetupInterrupted(self._stop)
        if self.phase == "finishing":
            print(f"distill: {name} after the last step: finishing the student and the report", file=sys.stderr, flush=True)

    def _dropped(self, unraisable) -> None:
        """``sys.unraisablehook``: the handler's stop, raised where Python could only drop it, is
        delivered again from outside; anything else goes to the hook found at install."""
        if not isinstance(unraisable.exc_value, SetupInterrupted):
            return self._unraisable(unraisable)
        again = (threading.main_thread().ident, signal.Signals[unraisable.exc_value.name])
        threading.Timer(0.01, signal.pthread_kill, again).start()

    def enter(self, phase: str) -> None:
        """Moves to ``phase``; entering setup with a signal already recorded stops at once, and so
        does leaving it with one recorded during it (its stop was swallowed on the way)."""
        # A signal recorded before setup stops it as it starts, so one recorded when setup ends came during it.
        if self.phase == "setup" and self.received:
            raise SetupInterrupted(self._stop)
        self.phase = phase
        if phase == "setup" and self.received:
            raise SetupInterrupted(self._stop)

    @property
    def _stop(self) -> str:
        """The signal a stop names: SIGTERM when both came."""
        return TERM if TERM in self.received else USR1

    @property
    def preempt(self) -> bool:
        return USR1 in self.received

    @property
    def terminate(self) -> bool:
        return TERM in self.received

    def reset(self) -> None:
        """Forgets recorded signals and returns to idle (one process may run several jobs: tests)."""
        self.received.clear()
        self.phase = "idle"


SIGNALS = StopSignals()
