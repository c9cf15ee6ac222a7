"""Caches that many processes may build at once (``distill prepare-tiny``, ``prepare-minilm``): one builds, the rest wait and reuse.

:func:`build_once` takes an exclusive lock beside the cache (``.NAME.lock``, ``flock``), checks
again whether the cache is ready once it holds it, and otherwise builds into a private temporary
folder that is renamed into place when it is complete. A second builder therefore waits for the
first and reuses its result instead of deleting the folder under it, and a killed build leaves
only a temporary folder, removed by the next one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path
from typing import Callable


def build_once(out: Path, *, ready: Callable[[Path], bool], build: Callable[[Path], None],
               finish: Callable[[Path], None] | None = None, what: str = "build") -> bool:
    """Makes ``out`` ready, building it at most once across processes; returns whether this call built it.

    Args:
        ready: whether a folder holds a complete build (checked before and again under the lock).
        build: writes a complete build into the empty folder it is given (a temporary name).
        finish: steps that need the final path (files that record it), run on ``out`` after the
            rename, still under the lock; ``ready`` must be false until they are done.
    """
    if ready(out):
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{what}: another process is building {out}; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if ready(out):
            return False
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed build: the lock says nobody writes them now
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.mkdir()
        try:
            build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
        if finish is not None:
            finish(out)
    return True
