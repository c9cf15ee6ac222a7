"""Tracker kinds (``tracking.backend``): one file each, one line in :data:`TRACKERS`.

:class:`distill.tracking.Tracker` starts the ones a run names (several at once, as ``report_to``)
and gives each the same redacted record.
"""

from distill.trackers.base import TrackerKind
from distill.trackers.mlflow_run import MlflowTracker
from distill.trackers.tensorboard_run import TensorBoardTracker
from distill.trackers.wandb_run import WandbTracker

TRACKERS: dict[str, type[TrackerKind]] = {kind.name: kind for kind in (WandbTracker, TensorBoardTracker, MlflowTracker)}
