"""A user's DeepSpeed JSON config (``--ds-config``), read and checked torch-free for the launcher
and the job alike; the job fills in the values it owns (:func:`distill.setup.deepspeed_config`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from distill.errors import ConfigError

# Sections of a DeepSpeed config that this job owns: it builds the optimizer and the schedule
# from train.*, so DeepSpeed's own would silently train with other settings.
JOB_OWNED_DS_SECTIONS = {"optimizer": "train.optimizer, train.lr, train.betas and train.weight_decay",
                         "scheduler": "train.scheduler and train.warmup_steps"}


def read_ds_config(path: str | os.PathLike) -> dict:
    """A user's DeepSpeed config: a JSON object without the sections the job owns."""
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"--ds-config {path}: not valid JSON ({err})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--ds-config {path}: expected a JSON object of DeepSpeed settings")
    for section, owner in JOB_OWNED_DS_SECTIONS.items():
        if section in ds:
            raise ConfigError(f"--ds-config {path} has an \"{section}\" section; distill builds it from {owner}: "
                              "remove the section from the DeepSpeed config and set those options instead")
    return ds
