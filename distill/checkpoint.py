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
PREEMPTED_MARKER = "PREEMPTED"  # written after a checkpoint taken on SIGUSR1; the sbatch script requeues
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


def saved_state(path: Path) -> TrainState:
    return TrainState(**json.loads((path / STATE_FILE).read_text()))


def to_universal(accelerator, path: Path) -> Path:
    """A copy of a DeepSpeed ZeRO checkpoint that loads at any world size.

    ZeRO partitions optimizer state by data-parallel rank and refuses a checkpoint saved at
    another world size; DeepSpeed's universal checkpoint format stores it per parameter. The
    conversion runs once, on the main process, into ``universal-step_N`` beside the original.
    """
    import subprocess
    import sys

    target = path.parent / f"universal-{path.name}"
    if accelerator.is_main_process and not (target / STATE_FILE).is_file():
        tmp = path.parent / f".tmp-universal-{path.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        convert = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path / "pytorch_model"),
                   "--output_folder", str(tmp / "pytorch_model"), "--inject_missing_state"]
        done = subprocess.run(convert, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"converting {path} to a universal checkpoint failed:\n{done.stderr[-3000:]}")
        for item in path.iterdir():
            if item.is_file() and item.name != "latest":
                shutil.copy2(item, tmp / item.name)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
    accelerator.wait_for_everyone()
    return target


def load(accelerator, path: Path) -> TrainState:
    """Restores what :func:`save` wrote and returns the trainer state."""
    accelerator.load_state(str(path))
    return saved_state(path)
