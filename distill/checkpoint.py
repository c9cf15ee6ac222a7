"""Checkpoints that are written completely or not at all.

A checkpoint is written under a temporary name (``.tmp-step_N``) by every process, and the main
process renames it to ``step_N`` only after ``trainer_state.json`` is in place. Only ``step_N``
directories holding that file are ever loaded, so a crash mid-save leaves the previous
checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    step: int = 0
    samples_consumed: int = 0
    world_size: int = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(accelerator, root: Path, state: TrainState, *, keep: int) -> Path:
    """Saves model, optimizer, scheduler and RNG states (via accelerate) plus ``state``."""
    final = root / f"step_{state.step:08d}"
    tmp = root / f".tmp-step_{state.step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(asdict(state), f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving a step after a resume: swap, never leave a gap
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load(accelerator, path: Path) -> TrainState:
    """Restores what :func:`save` wrote and returns the trainer state."""
    accelerator.load_state(str(path))
    return TrainState(**json.loads((path / STATE_FILE).read_text()))
