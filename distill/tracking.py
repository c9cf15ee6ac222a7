"""Experiment tracking: metrics.jsonl always, plus the trackers ``tracking.backend`` names (W&B,
TensorBoard, MLflow; several at once), each a kind of :mod:`distill.trackers`.

Only the main process creates a tracker, before any model loads, so a tracker that cannot start
is one line before anything else happens. Everything that leaves the process goes through
:func:`distill.config.redact`, so credentials in the environment never reach a record, and the
config the trackers receive leaves out endpoints and credential files (:data:`PRIVATE_SETTINGS`).

What each tracker receives: the config (and, once loaded, the models' sizes and configs), every
logged step, the final evaluation at the last step, both as ``final/MODEL/FIGURE`` and under the
names the mid-run evaluations used (``eval/perplexity``), so a summary agrees with the report, the
report's rows as a table, the plots, and, with ``tracking.log_model``, the student (or its
checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path

from distill import rundir
from distill.config import TrackingConfig, redact, trackers
from distill.trackers import TRACKERS
from distill.trackers.base import numeric
from distill.trackers.wandb_run import wandb_mode  # noqa: F401  (re-exported: where W&B finds its key)

# Where the teacher pool and the tracker live and the file holding a token: endpoints, not settings of the run.
PRIVATE_SETTINGS = (("teacher", "url"), ("teacher", "token_file"), ("tracking", "mlflow_tracking_uri"))


def tracker_config(config: dict) -> dict:
    """``config`` as the trackers receive it: redacted, without :data:`PRIVATE_SETTINGS`."""
    config = redact(json.loads(json.dumps(config, default=str)))
    for section, key in PRIVATE_SETTINGS:
        config.get(section, {}).pop(key, None)
    return config


def check_backends(cfg: TrackingConfig, run_dir: Path) -> None:
    """What would stop a tracker from starting, found before any model loads, as one line each."""
    for name in trackers(cfg):
        TRACKERS[name].check(cfg, run_dir)


class Tracker:
    """Writes one JSON object per logged step to metrics.jsonl and forwards to every tracker."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, config: dict, *, resume: bool = False):
        self.cfg, self.run_dir = cfg, run_dir
        self._jsonl = rundir.open_log(rundir.RunDir(run_dir).metrics, append=resume)
        name = redact(cfg.run_name or run_dir.resolve().name)
        self.kinds = []
        try:
            for kind in trackers(cfg):
                self.kinds.append(TRACKERS[kind](cfg, run_dir, name, tracker_config(config), resume=resume))
        except BaseException:
            self.close(failed=True)
            raise

    def add_config(self, config: dict) -> None:
        """The resolved config with the models' facts, once they are loaded."""
        config = tracker_config(config)
        for kind in self.kinds:
            kind.add_config(config)

    def log(self, metrics: dict, step: int) -> None:
        record = redact({"step": step, **metrics})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        figures = {k: v for k, v in record.items() if k != "step" and numeric(v)}
        for kind in self.kinds:
            kind.log(figures, step)

    def table(self, name: str, rows: list[dict], step: int) -> None:
        """Rows of text at a step (the student's sample completions): one line each in samples.jsonl, and to every tracker."""
        rows = [redact({"step": step, **row}) for row in rows]
        with rundir.open_log(rundir.RunDir(self.run_dir).samples, append=True) as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
        for kind in self.kinds:
            kind.table(name, rows, step)

    def summary(self, values: dict) -> None:
        """The final evaluation attached to the run: figures, the report's rows as a table, the plots, the report."""
        values = redact(values)
        rows = values.pop("rows", [])
        plots = [self.run_dir / p for p in values.get("plots", []) if (self.run_dir / p).is_file()]
        for kind in self.kinds:
            kind.summary(values, rows, plots)

    def log_model(self, path: Path, *, kind: str, step: int, task: str = "causal_lm") -> None:
        """``path`` (the student or a checkpoint) as each tracker's model record, per ``tracking.log_model``."""
        if self.cfg.log_model == "false" or (kind == "checkpoint") != (self.cfg.log_model == "checkpoints"):
            return
        for tracker in self.kinds:
            tracker.log_model(path, kind=kind, step=step, task=task)

    def close(self, *, failed: bool = False) -> None:
        self._jsonl.close()
        for kind in self.kinds:
            kind.close(failed=failed)
