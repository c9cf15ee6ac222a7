"""Experiment tracking: metrics.jsonl always, plus W&B, TensorBoard or MLflow.

Only the main process creates a tracker. Everything that leaves the process goes through
:func:`distill.config.redact`, so credentials in the environment never reach a record.

What each tracker receives: the config (and the models' sizes and configs), every logged step,
the final evaluation as ``final/MODEL/FIGURE`` metrics at the last step (so a summary agrees with
the report), the report's rows as a table, the plots, and, with ``tracking.log_model``, the
student (or its checkpoints) as artifacts.
"""

from __future__ import annotations

import configparser
import json
import netrc
import os
import re
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse

from distill import rundir
from distill.config import ConfigError, TrackingConfig, redact
from distill.errors import first_line

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


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Tracker:
    """Writes one JSON object per logged step to metrics.jsonl and forwards to the backend."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, config: dict, *, resume: bool = False):
        self.backend = cfg.backend
        self.cfg = cfg
        self.run_dir = run_dir
        self._jsonl = rundir.open_log(rundir.RunDir(run_dir).metrics, append=resume)
        self._client = None
        self._config = config = redact(config)
        name = redact(cfg.run_name or run_dir.resolve().name)
        self._argv = sys.argv
        if cfg.backend == "wandb":
            # W&B records the command line (its settings read sys.argv whenever they are sent) in the
            # run's files, which `wandb sync` uploads: it sees the redacted one until the run ends.
            sys.argv = redact(list(sys.argv))
            self._client = _start_wandb(cfg, run_dir, name, config)
        elif cfg.backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # start-up time: tensorboard loads only for tracking.backend=tensorboard

            self._client = SummaryWriter(log_dir=str(run_dir / rundir.RunDir.TENSORBOARD))
            self._client.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
        elif cfg.backend == "mlflow":
            # mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI; put the user's back when the run ends.
            self._user_mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI")
            self._client = _start_mlflow(cfg, run_dir, name, config, resume=resume)

    def log(self, metrics: dict, step: int) -> None:
        record = redact({"step": step, **metrics})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        numeric = {k: v for k, v in record.items() if k != "step" and _numeric(v)}
        if self.backend == "wandb":
            self._client.log({**numeric, "train/global_step": step}, step=step)
        elif self.backend == "tensorboard":
            for key, value in numeric.items():
                self._client.add_scalar(key, value, step)
        elif self.backend == "mlflow":
            self._client.log_metrics({_mlflow_name(k.replace("/", "_")): v for k, v in numeric.items()}, step=step)

    def summary(self, values: dict) -> None:
        """The final evaluation attached to the run: figures, the report's rows as a table, the plots, the report."""
        values = redact(values)
        rows = values.pop("rows", [])
        columns = list(dict.fromkeys(k for row in rows for k in row))  # the report's rows as one table
        plots = [self.run_dir / p for p in values.get("plots", []) if (self.run_dir / p).is_file()]
        if self.backend == "wandb":
            import wandb  # start-up time: wandb loads only when this runs

            self._client.summary.update({k: v for k, v in values.items() if not isinstance(v, (list, dict)) or k == "objective"})
            table = wandb.Table(columns=columns, data=[[_cell(row.get(c)) for c in columns] for row in rows])
            self._client.log({"final/report": table, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
        elif self.backend == "tensorboard":
            self._client.add_text("eval", "```\n" + json.dumps({**values, "rows": rows}, indent=2) + "\n```")
            from matplotlib.image import imread  # start-up time: matplotlib loads only when this runs

            for path in plots:
                self._client.add_image(f"plots/{path.stem}", imread(path)[..., :3], dataformats="HWC")
            self._add_hparams(rows)
        elif self.backend == "mlflow":
            numeric = {_mlflow_name(k): v for k, v in _flatten(values).items() if _numeric(v)}
            self._client.log_metrics(numeric)
            self._client.log_table({c: [_cell(row.get(c)) for row in rows] for c in columns}, artifact_file="report_rows.json")
            for name in (rundir.RunDir.REPORT, rundir.RunDir.EVAL, rundir.RunDir.CONFIG):
                if (self.run_dir / name).is_file():
                    self._client.log_artifact(str(self.run_dir / name))
            for path in plots:
                self._client.log_artifact(str(path), artifact_path="plots")

    def _add_hparams(self, rows: list[dict]) -> None:
        """TensorBoard's HParams tab: the settings (scalars) against the student's final figures."""
        student = next((r for r in rows if r.get("model") == "student"), {})
        hparams = {k: v for k, v in _flatten(self._config).items() if isinstance(v, (int, float, str, bool))}
        metrics = {f"hparams/student/{k}": v for k, v in student.items() if _numeric(v)}
        if metrics:
            self._client.add_hparams(hparams, metrics, run_name="hparams")

    def log_model(self, path: Path, *, kind: str, step: int) -> None:
        """``path`` (the student or a checkpoint) as a W&B artifact or MLflow artifacts, per ``tracking.log_model``."""
        if self.cfg.log_model == "false" or (kind == "checkpoint") != (self.cfg.log_model == "checkpoints"):
            return
        if self.backend == "wandb":
            import wandb  # start-up time: wandb loads only when this runs

            name = f"{'model' if kind == 'student' else 'checkpoint'}-{self._client.id}"
            artifact = wandb.Artifact(name, type="model", metadata={"step": step, "kind": kind})
            artifact.add_dir(str(path))
            self._client.log_artifact(artifact, aliases=["latest", f"step_{step}"])
        elif self.backend == "mlflow":
            self._client.log_artifacts(str(path), artifact_path=f"{kind}/step_{step:08d}" if kind == "checkpoint" else kind)

    def close(self) -> None:
        self._jsonl.close()
        if self.backend == "wandb":
            self._client.finish()
            sys.argv = self._argv
        elif self.backend == "tensorboard":
            self._client.close()
        elif self.backend == "mlflow":
            self._client.end_run()
            if self._user_mlflow_uri:
                self._client.set_tracking_uri(self._user_mlflow_uri)
            else:
                os.environ.pop("MLFLOW_TRACKING_URI", None)


def _cell(value):
    """A table cell: numbers and strings as they are, anything else as JSON."""
    return value if value is None or isinstance(value, (int, float, str, bool)) else json.dumps(value)


def _mlflow_name(key: str) -> str:
    """MLflow metric names allow alphanumerics and _ - . space : / only ("student+bnb_4bit/..." has a +)."""

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
        import wandb  # may be missing: the except names what to install
    except ImportError:
        raise ConfigError("tracking.backend=wandb needs wandb: pip install wandb (or set tracking.backend=none)") from None
    mode, why = wandb_mode()
    # The variables W&B users set by hand win over the config (wandb.init's arguments would beat them).
    env = os.environ
    project = env.get("WANDB_PROJECT") or cfg.project
    described = {"group": None if env.get("WANDB_RUN_GROUP") else cfg.group, "job_type": None if env.get("WANDB_JOB_TYPE") else cfg.job_type,
                 "notes": None if env.get("WANDB_NOTES") else cfg.notes, "tags": None if env.get("WANDB_TAGS") else (cfg.tags or None)}
    print(f"W&B: {mode} ({why}); project {project}, run {name}", file=sys.stderr)
    settings = wandb.Settings(save_code=False, x_disable_stats=not cfg.system_metrics, console="off")
    run = wandb.init(project=redact(project), name=name, dir=str(run_dir), mode=mode, config=config, settings=settings, resume="allow",
                     id=_run_id(run_dir), **redact(described))
    run.define_metric("train/global_step")
    run.define_metric("*", step_metric="train/global_step")  # every curve against the optimizer step, also after a resume
    return run


def _run_id(run_dir: Path) -> str:
    """A stable W&B run id per run directory, so a resumed run continues the same record (--overwrite removes it: a new id)."""
    path = run_dir / rundir.RunDir.WANDB_ID
    if not path.exists():
        rundir.write_atomic(path, uuid.uuid4().hex[:12])
    return path.read_text().strip()


def _mlflow_uri(cfg: TrackingConfig, run_dir: Path) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else a store inside the run directory."""
    return cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / rundir.RunDir.MLFLOW_DB).resolve()}"


def check_backend(cfg: TrackingConfig, run_dir: Path) -> None:
    """What would stop the tracker from starting, found before any model loads, as one line each:
    a missing package, an MLflow server that does not answer, a file store MLflow 3 refuses."""
    if cfg.backend not in ("wandb", "mlflow"):
        return
    try:
        __import__(cfg.backend)
    except ImportError:
        raise ConfigError(f"tracking.backend={cfg.backend} needs {cfg.backend}: pip install {cfg.backend} (or set tracking.backend=none)") from None
    if cfg.backend != "mlflow":
        return
    import httpx  # start-up time: httpx loads only when this runs

    uri = _mlflow_uri(cfg, run_dir)
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:  # the tracking server's own health route; mlflow itself would retry for minutes, tracebacks and all
            httpx.get(uri.rstrip("/") + "/health", timeout=10.0)
        except httpx.HTTPError as err:
            raise ConfigError(f"tracking.backend=mlflow: the MLflow server at {redact(uri)} does not answer ({first_line(err)}); start it, "
                              "correct tracking.mlflow_tracking_uri (or MLFLOW_TRACKING_URI), or set tracking.backend=none") from None
    elif scheme in ("file", "") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
        raise ConfigError(f"tracking.backend=mlflow: MLflow 3 refuses the file store {redact(uri)} unless MLFLOW_ALLOW_FILE_STORE=true; "
                          "set that, give a sqlite:/// or http(s):// URI, or leave tracking.mlflow_tracking_uri and MLFLOW_TRACKING_URI "
                          "unset for a SQLite store in the run directory")


def _start_mlflow(cfg: TrackingConfig, run_dir: Path, name: str, config: dict, *, resume: bool):
    try:
        import mlflow  # may be missing: the except names what to install
    except ImportError:
        raise ConfigError("tracking.backend=mlflow needs mlflow: pip install mlflow (or set tracking.backend=none)") from None
    uri = _mlflow_uri(cfg, run_dir)
    try:
        return _start_mlflow_run(mlflow, uri, cfg, run_dir, name, config, resume=resume)
    except Exception as err:  # MlflowException, requests' and SQLAlchemy's errors: one line, not mlflow's retries' tracebacks
        raise ConfigError(f"tracking.backend=mlflow: cannot start the MLflow run at {redact(uri)}: {first_line(err)[:300]}; "
                          "check the tracking server, or set tracking.backend=none") from None


def _start_mlflow_run(mlflow, uri: str, cfg: TrackingConfig, run_dir: Path, name: str, config: dict, *, resume: bool):
    mlflow.set_tracking_uri(uri)
    experiment = redact(os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.project)
    if mlflow.get_experiment_by_name(experiment) is None:
        # A new experiment keeps its artifacts beside the run (not in ./mlruns of whatever directory the job started in),
        # unless a tracking server decides where they go.
        local = urlparse(uri).scheme in ("sqlite", "file", "")
        mlflow.create_experiment(experiment, artifact_location=(run_dir / rundir.RunDir.MLFLOW_ARTIFACTS).resolve().as_uri() if local else None)
    mlflow.set_experiment(experiment)
    id_file = run_dir / rundir.RunDir.MLFLOW_RUN_ID
    tags = {**{t: "true" for t in cfg.tags}, **({"distill.group": cfg.group} if cfg.group else {}),
            **({"mlflow.note.content": cfg.notes} if cfg.notes else {})}
    if resume and id_file.is_file():
        mlflow.start_run(run_id=id_file.read_text().strip())  # the same run continues
        return mlflow
    run = mlflow.start_run(run_name=name, tags=redact(tags) or None)
    rundir.write_atomic(id_file, run.info.run_id)
    mlflow.log_params({k: str(v)[:6000] for k, v in _flatten(config).items()})
    return mlflow
