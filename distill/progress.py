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
