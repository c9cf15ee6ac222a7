"""What a long phase is doing, on stderr, so that a minute of silence never looks like a hang.

For the phases outside the training loop (evaluations, speed measurement, the teacher-fidelity
check, quantization, pruning). A phase still running after :data:`AFTER_SECONDS` says what it is
doing, and then how long it took; a quick one stays silent. Only the main process speaks; the
others pass ``quiet=True``.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

AFTER_SECONDS = 2.0


@contextmanager
def phase(what: str, *, quiet: bool = False):
    start = time.perf_counter()
    announced = threading.Event()

    def announce():
        announced.set()
        print(f"distill: {what} ...", file=sys.stderr, flush=True)

    timer = threading.Timer(AFTER_SECONDS, announce)
    timer.daemon = True
    if not quiet:
        timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if announced.is_set():
        print(f"distill: {what}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _figure(value) -> str:
    """A number as a log line shows it: four significant digits, an integer as itself."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


class StepProgress:
    """Training's record on the console: a bar on a terminal; in a log file (SLURM's, a pipe) one plain
    line per logged step instead, since a bar there is redrawn as unreadable carriage returns. Each
    evaluation prints one line either way. Only the main process speaks (``enabled``)."""

    # What a logged step's line shows, in this order: train/ metrics under short names.
    SHOWN = (("train/lr", "lr"), ("train/grad_norm", "grad_norm"), ("train/tokens_per_s", "tok/s"), ("train/teacher_time_share", "teacher"),
             ("train/generation_time_share", "generation"), ("train/completion_length", "completion"))

    def __init__(self, total: int, initial: int, *, enabled: bool, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm  # start-up time: tqdm loads only for a terminal's bar

            self.bar = tqdm(total=total, initial=initial, desc="distill", dynamic_ncols=True, mininterval=0.1, file=self.stream)

    def write(self, line: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def logged(self, step: int, metrics: dict) -> None:
        """A logged step: the bar's figures, or one plain line."""
        terms = {k.removeprefix("train/").removesuffix("_loss"): v for k, v in metrics.items()
                 if k.startswith("train/") and k.endswith("_loss") and v is not None}
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", **{k: f"{v:.4f}" for k, v in terms.items()}, refresh=False)
            return
        shown = [f"loss {_figure(metrics['train/loss'])}", *(f"{k} {_figure(v)}" for k, v in terms.items())]
        shown += [f"{name} {_figure(metrics[key])}" for key, name in self.SHOWN if metrics.get(key) is not None]
        self.write(f"step {step}/{self.total}: " + " ".join(shown))

    def evaluated(self, step: int, metrics: dict) -> None:
        """One line per evaluation: every figure it measured."""
        shown = " ".join(f"{k} {_figure(v)}" for k, v in metrics.items() if v is not None)
        self.write(f"eval at step {step}/{self.total}: {shown}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
