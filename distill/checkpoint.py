"""Checkpoints that are written completely or not at all, and that can never run code.

A checkpoint is written under a temporary name (``.tmp-step_N``) by every process, and the main
process renames it to ``step_N`` only after ``trainer_state.json`` is in place. Only ``step_N``
directories holding that file are ever loaded, so a crash mid-save leaves the previous
checkpoint as the latest. A save that fails (a full disk) removes its partial directory.

What a checkpoint holds, and how each piece is loaded back:

- ``trainer_state.json`` (step, samples consumed), ``scheduler.json``, ``rng_state_R.json``
  (Python, NumPy, torch and CUDA generators of rank R): written by this module as JSON.
- ``model.safetensors`` (accelerate, without DeepSpeed): safetensors, which cannot carry code.
- ``optimizer.bin`` (accelerate) and ``pytorch_model/*.pt`` (DeepSpeed ZeRO, and its universal
  format): torch pickles. accelerate loads the optimizer with ``weights_only=True``; DeepSpeed
  loads its files with ``weights_only=False``. So :func:`verify` first loads every pickle in the
  checkpoint with torch's ``weights_only`` unpickler and an explicit allowlist (tensors, plus the
  three DeepSpeed classes its optimizer state holds); a file that names any other global, or
  that is a plain pickle rather than a torch archive, is refused, naming the file, before any
  library opens it.

Any piece that cannot be restored is an error that names its file.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from distill.errors import CheckpointError, DiskFull, first_line
from distill.rundir import RunDir, write_atomic

STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.json"
RNG_FILE = "rng_state_{rank}.json"
PREEMPTED_MARKER = RunDir.PREEMPTED  # written when SIGUSR1 stopped the job; the sbatch script requeues
_NAME = re.compile(r"^step_(\d+)$")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
# Globals a DeepSpeed ZeRO optimizer state may name (found by saving ZeRO-1/2/3 checkpoints).
_DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
)


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


def _write_json(path: Path, value) -> None:
    write_atomic(path, json.dumps(value))


def save(accelerator, root: Path, state: TrainState, *, keep: int, scheduler=None) -> Path:
    """Saves model and optimizer (via accelerate or DeepSpeed), scheduler and RNG states (JSON)
    and ``state``; raises :class:`DiskFull` (partial files removed) when the disk fills up."""
    final = root / f"step_{state.step:08d}"
    tmp = root / f".tmp-step_{state.step:08d}"
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        rank = accelerator.process_index
        # accelerate pickles the RNG states; this job keeps them as JSON instead.
        (tmp / f"random_states_{rank}.pkl").unlink(missing_ok=True)
        _write_json(tmp / RNG_FILE.format(rank=rank), rng_state())
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if scheduler is not None:
                _write_json(tmp / SCHEDULER_FILE, scheduler.state_dict())
            _write_json(tmp / STATE_FILE, asdict(state))
    except Exception as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if out_of_space(err, root):
            raise DiskFull(disk_full_message(f"checkpoint of step {state.step}", root, needed=directory_bytes(latest(root)))) from None
        raise
    if accelerator.is_main_process:
        if final.exists():  # re-saving a step after a resume: swap, never leave a gap
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _free_bytes(where: Path) -> int:
    try:
        return shutil.disk_usage(where if where.exists() else where.parent).free
    except OSError:
        return 0


def out_of_space(err: BaseException, where: Path) -> bool:
    """Whether ``err`` came from a full disk. torch's archive writer reports it only as
    "unexpected pos" (a RuntimeError), so the free space is checked as well."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left" in text or "unexpected pos" in text or "file write failed" in text or _free_bytes(where) < 1 << 20


def directory_bytes(path: Path | None) -> int:
    if path is None or not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def disk_full_message(what: str, where: Path, *, needed: int) -> str:
    """One line: what could not be written, the space it needs, and what remains complete."""
    free = _free_bytes(where)
    need = f"about {needed / 2**20:,.1f} MiB needed, " if needed else ""
    run_dir = RunDir(where.parent if where.name == RunDir.CHECKPOINTS else where)
    kept = latest(run_dir.checkpoints)
    remains = f"the last complete checkpoint is {kept}" if kept else "no complete checkpoint exists"
    return f"no space left on device writing the {what} to {where} ({need}{free / 2**20:,.1f} MiB free); {remains}; free space and rerun with --resume"


def rng_state() -> dict:
    """Every generator this process draws from, as JSON-able lists."""

    import numpy as np  # this module stays free of numpy until it is needed
    import torch  # this module stays free of torch until it is needed

    algorithm, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {
        "python": [version, list(python_state), gauss_next],
        "numpy": [algorithm, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(path: Path) -> None:
    """Restores what :func:`rng_state` saved; any failure names the file."""

    import numpy as np  # this module stays free of numpy until it is needed
    import torch  # this module stays free of torch until it is needed

    try:
        state = json.loads(path.read_text())
        version, python_state, gauss_next = state["python"]
        random.setstate((version, tuple(python_state), gauss_next))
        algorithm, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((algorithm, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if torch.cuda.is_available() and "cuda" in state:
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"cannot restore the random number generators from {path}: {first_line(err)}; "
                              "resume from another checkpoint or start over with --overwrite") from None


def _allowed_globals() -> list:
    allowed = []
    for module, name in _DEEPSPEED_GLOBALS:
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # without DeepSpeed, its files cannot be loaded anyway
            pass
    return allowed


_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


def verify(path: Path) -> None:
    """Refuses a checkpoint any of whose files could run code or cannot be read back.

    Every pickle is loaded once with torch's ``weights_only`` unpickler (memory-mapped, so the
    tensors are not read) and the allowlist above; the unpickler refuses any other global without
    calling it. Plain (non-torch) pickles are refused unread. safetensors headers and JSON files
    are parsed. Python files that DeepSpeed copies in (``zero_to_fp32.py``) are never run.
    """
    import torch  # this module stays free of torch until it is needed
    from safetensors import safe_open  # this module stays free of safetensors until it is needed

    allowed = _allowed_globals()
    for file in checkpoint_files(path):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt"):
                    pass
            elif file.suffix == ".json":
                json.loads(file.read_text())
            else:
                head = _head(file)
                if file.suffix not in _PICKLE_SUFFIXES and head != _ZIP_MAGIC and not head.startswith(_PICKLE_MAGIC):
                    continue  # text no library unpickles: DeepSpeed's `latest` tag, its zero_to_fp32.py
                if head != _ZIP_MAGIC:
                    raise CheckpointError(f"refusing to load {file}: it is not a torch archive (a plain pickle, which can run code, "
                                          "or a damaged file); remove it or resume from another checkpoint")
                with torch.serialization.safe_globals(allowed):
                    torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except CheckpointError:
            raise
        except Exception as err:
            unsafe = "Unsupported global" in str(err) or "Weights only load failed" in str(err)
            why = "it names code to run when loaded" if unsafe else "it cannot be read"
            detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), first_line(err))
            raise CheckpointError(f"refusing to load {file}: {why} ({detail[:200]}); remove the checkpoint or resume from another one") from None


def checkpoint_files(path: Path) -> list[Path]:
    """Every file under ``path`` by its real path, symlinked folders entered, sorted.

    DeepSpeed and accelerate open whatever a name leads to, so the walk follows links too
    (``Path.rglob`` does not enter symlinked folders); a link that leads outside ``path`` (itself
    resolved, so a checkpoint folder the user linked into place is fine) is refused, naming it.
    """
    root = Path(os.path.realpath(path))
    found: set[Path] = set()
    seen = {root}
    for folder, dirs, files in os.walk(root, followlinks=True):
        for name in [*dirs, *files]:
            entry = Path(folder) / name
            real = Path(os.path.realpath(entry))
            if real != root and root not in real.parents:
                raise CheckpointError(f"refusing to load {entry}: it is a symbolic link to {real}, outside the checkpoint {path}; "
                                      "remove the link or resume from another checkpoint")
            if name in files:
                found.add(real)
        # a folder linked twice (or a link to a parent) is walked once
        dirs[:] = [d for d in dirs if (real := Path(os.path.realpath(Path(folder) / d))) not in seen and not seen.add(real)]
    return sorted(f for f in found if f.is_file())


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


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
    file = path / STATE_FILE
    try:
        state = TrainState(**json.loads(file.read_text()))
        if not all(isinstance(v, int) and v >= 0 for v in asdict(state).values()):
            raise ValueError(f"unexpected values {asdict(state)}")
        return state
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"cannot read the data position from {file}: {first_line(err)}; "
                              "resume from another checkpoint or start over with --overwrite") from None


def to_universal(accelerator, path: Path) -> Path:
    """A copy of a DeepSpeed ZeRO checkpoint that loads at any world size.

    ZeRO partitions optimizer state by data-parallel rank and refuses a checkpoint saved at
    another world size; DeepSpeed's universal checkpoint format stores it per parameter. The
    conversion runs once, on the main process, into ``universal-step_N`` beside the original.
    """

    target = path.parent / f"universal-{path.name}"
    if accelerator.is_main_process and not (target / STATE_FILE).is_file():
        verify(path)  # ds_to_universal unpickles every file with weights_only=False
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


def _weights_mismatch(err: Exception) -> str | None:
    """What torch's multi-line "Missing key(s) / Unexpected key(s)" error means, in one line."""
    found = {kind: re.findall(r'"([^"]+)"', line) for line in str(err).splitlines()
             for kind in ("Missing", "Unexpected") if line.strip().startswith(f"{kind} key(s)")}
    if not found:
        return None
    missing, unexpected = found.get("Missing", []), found.get("Unexpected", [])
    parts = [f"{len(names)} {kind.lower()} weights (e.g. {names[0]})" for kind, names in (("Missing", missing), ("Unexpected", unexpected)) if names]
    reason = "its weights do not fit this job's model: " + ", ".join(parts)
    if unexpected and all(not name.startswith(("student.", "objective.")) for name in unexpected) and any(n.startswith("student.") for n in missing):
        reason += " (it was saved by an earlier distill, which checkpointed the student alone; this one saves the student and the objective together)"
    return reason


def load(accelerator, path: Path, scheduler=None) -> TrainState:
    """Checks, then restores what :func:`save` wrote; returns the trainer state."""
    verify(path)
    state = saved_state(path)
    try:
        accelerator.load_state(str(path))
    except Exception as err:
        reason = _weights_mismatch(err) or first_line(err)
        raise CheckpointError(f"cannot restore the model or optimizer from {path}: {reason}; "
                              "resume from another checkpoint or start over with --overwrite") from None
    if scheduler is not None:
        file = path / SCHEDULER_FILE
        try:
            scheduler.load_state_dict(json.loads(file.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"cannot restore the learning-rate scheduler from {file}: {first_line(err)}; "
                                  "resume from another checkpoint or start over with --overwrite") from None
    # After accelerate, which restores RNG states from its own (pickled) file when one exists.
    restore_rng(path / RNG_FILE.format(rank=accelerator.process_index))
    return state
