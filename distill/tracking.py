"""Experiment tracking: metrics.jsonl always, plus W&B, TensorBoard or MLflow.

Only the main process creates a tracker. Everything that leaves the process goes through
:func:`distill.config.redact`, so credentials in the environment never reach a record.
"""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path

from distill.config import ConfigError, TrackingConfig, redact


def wandb_has_key() -> bool:
    """True when W&B could sync: an API key in the environment or from `wandb login`."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return bool(host and host[2])


class Tracker:
    """Writes one JSON object per logged step to metrics.jsonl and forwards to the backend."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, config: dict, *, resume: bool = False):
        self.backend = cfg.backend
        self.run_dir = run_dir
        self._jsonl = open(run_dir / "metrics.jsonl", "a" if resume else "w")
        self._client = None
        name = redact(cfg.run_name or run_dir.resolve().name)
        config = redact(config)
        if cfg.backend == "wandb":
            self._client = _start_wandb(cfg, run_dir, name, config)
        elif cfg.backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._client = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self._client.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
        elif cfg.backend == "mlflow":
            self._client = _start_mlflow(cfg, run_dir, name, config)

    def log(self, metrics: dict, step: int) -> None:
        record = redact({"step": step, **metrics})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        numeric = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.backend == "wandb":
            self._client.log(numeric, step=step)
        elif self.backend == "tensorboard":
            for key, value in numeric.items():
                self._client.add_scalar(key, value, step)
        elif self.backend == "mlflow":
            self._client.log_metrics({k.replace("/", "_"): v for k, v in numeric.items()}, step=step)

    def summary(self, values: dict) -> None:
        """Final figures (the evaluation) attached to the run."""
        values = redact(values)
        if self.backend == "wandb":
            self._client.summary.update(values)
        elif self.backend == "tensorboard":
            self._client.add_text("eval", "```\n" + json.dumps(values, indent=2) + "\n```")  # the figures went to log() as final/...
        elif self.backend == "mlflow":
            numeric = {_mlflow_name(k): v for k, v in _flatten(values).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._client.log_metrics(numeric)

    def close(self) -> None:
        self._jsonl.close()
        if self.backend == "wandb":
            self._client.finish()
        elif self.backend == "tensorboard":
            self._client.close()
        elif self.backend == "mlflow":
            self._client.end_run()


def _mlflow_name(key: str) -> str:
    """MLflow metric names allow alphanumerics and _ - . space : / only ("student+bnb_4bit/..." has a +)."""
    import re

    return re.sub(r"[^\w\-. :/]", "_", key)


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _start_wandb(cfg: TrackingConfig, run_dir: Path, name: str, config: dict):
    try:
        import wandb
    except ImportError:
        raise ConfigError("tracking.backend=wandb needs wandb: pip install wandb (or set tracking.backend=none)") from None
    # Offline unless a key is configured, so a run is always recorded locally and can be
    # synced later with `wandb sync`. An explicit WANDB_MODE wins.
    mode = os.environ.get("WANDB_MODE") or ("online" if wandb_has_key() else "offline")
    settings = wandb.Settings(save_code=False, x_disable_meta=True, x_disable_stats=True, console="off")
    # wandb.init's arguments beat its environment variables; the variables users set by hand win here.
    env = os.environ
    described = {"group": None if env.get("WANDB_RUN_GROUP") else cfg.group, "job_type": None if env.get("WANDB_JOB_TYPE") else cfg.job_type,
                 "notes": None if env.get("WANDB_NOTES") else cfg.notes, "tags": None if env.get("WANDB_TAGS") else (cfg.tags or None)}
    return wandb.init(project=redact(cfg.project), name=name, dir=str(run_dir), mode=mode, config=config, settings=settings, resume="allow",
                      id=_run_id(run_dir), **redact(described))


def _run_id(run_dir: Path) -> str:
    """A stable W&B run id per run directory, so a resumed run continues the same record."""
    path = run_dir / ".wandb_id"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def _start_mlflow(cfg: TrackingConfig, run_dir: Path, name: str, config: dict):
    try:
        import mlflow
    except ImportError:
        raise ConfigError("tracking.backend=mlflow needs mlflow: pip install mlflow (or set tracking.backend=none)") from None
    uri = cfg.mlflow_tracking_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(redact(cfg.project))
    tags = {**{t: "true" for t in cfg.tags}, **({"distill.group": cfg.group} if cfg.group else {}),
            **({"mlflow.note.content": cfg.notes} if cfg.notes else {})}
    mlflow.start_run(run_name=name, tags=redact(tags) or None)
    mlflow.log_params({k: str(v)[:500] for k, v in _flatten(config).items()})
    return mlflow
