"""TensorBoard: scalars, the config and final evaluation as text, the plots as images, and HParams
(the settings this run chose against the student's final figures)."""

from __future__ import annotations

import json
from pathlib import Path

from distill import rundir
from distill.config import DistillConfig, TrackingConfig, to_dict
from distill.trackers.base import TrackerKind, flatten, markdown_table, numeric

# Always in HParams, even at their defaults: what a comparison of runs is read against.
HPARAMS_ALWAYS = ("loss.kind", "loss.temperature", "loss.alpha", "train.lr", "train.max_steps", "train.micro_batch_size", "train.grad_accum",
                  "data.seq_len", "teacher.path")
# Never in HParams: where the run is and how it is recorded, not a choice of the distillation.
HPARAMS_NEVER = ("output_dir", "tracking.", "models.")


def hparams(config: dict) -> dict:
    """The settings a run chose: those that differ from the defaults, and :data:`HPARAMS_ALWAYS`; scalars only."""
    defaults = flatten(to_dict(DistillConfig()))
    chosen = {}
    for key, value in flatten(config).items():
        if key.startswith(HPARAMS_NEVER) or not isinstance(value, (int, float, str, bool)):
            continue
        if key in HPARAMS_ALWAYS or (key in defaults and value != defaults[key]):
            chosen[key] = value
    return chosen


class TensorBoardTracker(TrackerKind):
    name, package, extra = "tensorboard", "tensorboard", "tensorboard"

    def __init__(self, cfg: TrackingConfig, run_dir: Path, name: str, config: dict, *, resume: bool):
        super().__init__(cfg, run_dir, name, config, resume=resume)
        from torch.utils.tensorboard import SummaryWriter  # start-up time: tensorboard loads only for tracking.backend=tensorboard

        self.writer = SummaryWriter(log_dir=str(run_dir / rundir.RunDir.TENSORBOARD))
        self.config = config

    def add_config(self, config: dict) -> None:
        self.config = config
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def summary(self, values: dict, rows: list[dict], plots: list[Path]) -> None:
        self.writer.add_text("eval", "```\n" + json.dumps({**values, "rows": rows}, indent=2) + "\n```")
        from matplotlib.image import imread  # start-up time: matplotlib loads only when this runs

        for path in plots:
            self.writer.add_image(f"plots/{path.stem}", imread(path)[..., :3], dataformats="HWC")
        student = next((r for r in rows if r.get("model") == "student"), {})
        metrics = {f"hparams/student/{k}": v for k, v in student.items() if numeric(v)}
        if metrics:
            self.writer.add_hparams(hparams(self.config), metrics, run_name="hparams")

    def table(self, name: str, rows: list[dict], step: int) -> None:
        self.writer.add_text(name, markdown_table(rows), step)

    def close(self, *, failed: bool = False) -> None:
        self.writer.close()
