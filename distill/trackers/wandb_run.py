"""Weights & Biases: offline unless an API key is configured, so a run is always recorded locally
(``wandb sync`` uploads it later). The variables W&B users set by hand (WANDB_PROJECT, WANDB_RUN_GROUP,
...) win over the config, as they do for any W&B script."""

from __future__ import annotations

import configparser
import netrc
import os
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse

from distill import rundir
from distill.config import TrackingConfig, redact
from distill.trackers.base import TrackerKind, cell

WANDB_DEFAULT_HOST = "https://api.wandb.ai"


def wandb_host() -> str:
    """The W&B server runs talk to: WANDB_BASE_URL, else what `wandb login --host` wrote into wandb's settings file."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"].rstrip("/")
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
    settings = configparser.ConfigParser()
    try:
        settings.read(config_dir / "settings")
        return settings.get("default", "base_url", fallback=WANDB_DEFAULT_HOST).rstrip("/")
    except configparser.Error:
        return WANDB_DEFAULT_HOST


def wandb_key_source(host: str) -> str | None:
    """Where W&B finds an API key for ``host`` (as wandb does: the environment, then the netrc file), or None."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(urlparse(host).hostname or host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return None
    return str(path) if entry and entry[2] else None


def wandb_mode() -> tuple[str, str]:
    """(online|offline|disabled, why): offline unless a key is configured, so a run is always recorded locally."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE is set"
    host = wandb_host()
    source = wandb_key_source(host)
    if source:
        return "online", f"an API key for {host} from {source}"
    return "offline", f"no API key for {host} (WANDB_API_KEY unset, none in the netrc file); sync later with `wandb sync`"


def _run_id(run_dir: Path) -> str:
    """A stable W&B run id per run directory, so a resumed run continues the same record (--overwrite removes it: a new id)."""
    path = run_dir / rundir.RunDir.WANDB_ID
    if not path.exists():
        rundir.write_atomic(path, uuid.uuid4().hex[:12])
    return path.read_text().strip()


class WandbTracker(TrackerKind):
    name, package, extra = "wandb", "wandb", "wandb"

    def __init__(self, cfg: TrackingConfig, run_dir: Path, name: str, config: dict, *, resume: bool):
        super().__init__(cfg, run_dir, name, config, resume=resume)
        import wandb  # start-up time: wandb loads only for tracking.backend=wandb (checked installed before)

        mode, why = wandb_mode()
        env = os.environ
        project = env.get("WANDB_PROJECT") or cfg.project
        described = {"group": None if env.get("WANDB_RUN_GROUP") else cfg.group, "job_type": None if env.get("WANDB_JOB_TYPE") else cfg.job_type,
                     "notes": None if env.get("WANDB_NOTES") else cfg.notes, "tags": None if env.get("WANDB_TAGS") else (cfg.tags or None)}
        print(f"W&B: {mode} ({why}); project {project}, run {name}", file=sys.stderr)
        # W&B records the command line (its settings read sys.argv whenever they are sent) in the
        # run's files, which `wandb sync` uploads: it sees the redacted one until the run ends.
        self._argv = sys.argv
        sys.argv = redact(list(sys.argv))
        # console="wrap": the run's output.log keeps what the job printed (Python's streams, the job's own lines).
        settings = wandb.Settings(save_code=False, x_disable_stats=not cfg.system_metrics, console="wrap")
        self.run = wandb.init(project=redact(project), name=name, dir=str(run_dir), mode=mode, config=config, settings=settings,
                              resume="allow", id=_run_id(run_dir), **redact(described))
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step")  # every curve against the optimizer step, also after a resume

    def add_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({**metrics, "train/global_step": step}, step=step)

    def summary(self, values: dict, rows: list[dict], plots: list[Path]) -> None:
        import wandb  # start-up time: wandb loads only for tracking.backend=wandb

        self.run.summary.update({k: v for k, v in values.items() if not isinstance(v, (list, dict)) or k == "objective"})
        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = wandb.Table(columns=columns, data=[[cell(row.get(c)) for c in columns] for row in rows])
        self.run.log({"final/report": table, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})

    def table(self, name: str, rows: list[dict], step: int) -> None:
        import wandb  # start-up time: wandb loads only for tracking.backend=wandb

        columns = list(dict.fromkeys(k for row in rows for k in row))
        self.run.log({name: wandb.Table(columns=columns, data=[[cell(row.get(c)) for c in columns] for row in rows]), "train/global_step": step}, step=step)

    def log_model(self, path: Path, *, kind: str, step: int, task: str) -> None:
        import wandb  # start-up time: wandb loads only for tracking.backend=wandb

        name = f"{'model' if kind == 'student' else 'checkpoint'}-{self.run.id}"
        artifact = wandb.Artifact(name, type="model", metadata={"step": step, "kind": kind})
        artifact.add_dir(str(path))
        self.run.log_artifact(artifact, aliases=["latest", f"step_{step}"])

    def close(self, *, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
        sys.argv = self._argv
