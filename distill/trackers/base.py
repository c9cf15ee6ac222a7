"""What every tracker kind (``tracking.backend``) declares and does: the package and install extra it
needs, the checks that run before any model loads, and the run's record (config, steps, summary,
model). :class:`distill.tracking.Tracker` hands each kind redacted values only."""

from __future__ import annotations

import json
from pathlib import Path

from distill.config import ConfigError, TrackingConfig


class TrackerKind:
    """One tracker: started before any model loads, given the config, every logged step, the final evaluation and the model."""

    name = ""
    package = ""  # the module it imports
    extra = ""  # the pip extra that installs it: pip install 'distill[EXTRA]'

    @classmethod
    def check(cls, cfg: TrackingConfig, run_dir: Path) -> None:
        """What would stop it from starting, as one line, before anything loads (the package, by default)."""
        try:
            __import__(cls.package)
        except ImportError:
            raise ConfigError(f"tracking.backend={cls.name} needs {cls.package}: pip install 'distill[{cls.extra}]' "
                              f"(or pip install {cls.package}; or leave {cls.name} out of tracking.backend)") from None

    def __init__(self, cfg: TrackingConfig, run_dir: Path, name: str, config: dict, *, resume: bool):
        self.cfg, self.run_dir = cfg, run_dir

    def add_config(self, config: dict) -> None:
        """The whole resolved config, once the models are loaded (their sizes, the steps train.epochs made)."""

    def log(self, metrics: dict, step: int) -> None:
        """One logged step's numbers, under the project's names (train/loss, eval/perplexity, final/student/perplexity)."""

    def summary(self, values: dict, rows: list[dict], plots: list[Path]) -> None:
        """The final evaluation: figures, the report's rows as a table, the plots."""

    def table(self, name: str, rows: list[dict], step: int) -> None:
        """Rows of text at a step (the student's sample completions at an evaluation), as the tracker shows tables."""

    def log_model(self, path: Path, *, kind: str, step: int, task: str) -> None:
        """The student (``kind`` student) or a checkpoint as the tracker's model record."""

    def close(self, *, failed: bool = False) -> None:
        """Ends the run (as failed when the job did not finish)."""


def cell(value):
    """A table cell: numbers and strings as they are, anything else as JSON."""
    return value if value is None or isinstance(value, (int, float, str, bool)) else json.dumps(value)


def markdown_table(rows: list[dict]) -> str:
    """Rows as a Markdown table (a cell's newlines and pipes escaped so a completion stays in its cell)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = lambda v: str(cell(v)).replace("|", "\\|").replace("\n", "<br>")
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                      *("| " + " | ".join(text(row.get(c, "")) for c in columns) + " |" for row in rows)])


def numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
