"""MLflow: a run in a tracking server or store (by default a SQLite store in the run directory, its
artifacts beside it), metrics under the project's own names, the config as params, the report and
plots as artifacts, and the student as an MLflow transformers model."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

from distill import rundir
from distill.config import ConfigError, TrackingConfig, redact
from distill.errors import first_line
from distill.trackers.base import TrackerKind, cell, flatten, numeric

# The task's model class and its transformers pipeline task (what mlflow.transformers records).
PIPELINES = {"causal_lm": ("AutoModelForCausalLM", "text-generation"), "masked_lm": ("AutoModelForMaskedLM", "fill-mask"),
             "sequence_classification": ("AutoModelForSequenceClassification", "text-classification")}


def metric_name(key: str) -> str:
    """One rule for every metric: the project's own name (train/loss, final/student/perplexity), with the characters MLflow
    refuses (it allows alphanumerics and _ - . space : /) replaced by _ ("student+bnb_4bit" has a +)."""
    return re.sub(r"[^\w\-. :/]", "_", key)


def tracking_uri(cfg: TrackingConfig, run_dir: Path) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else a store inside the run directory."""
    return cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / rundir.RunDir.MLFLOW_DB).resolve()}"


class MlflowTracker(TrackerKind):
    name, package, extra = "mlflow", "mlflow", "mlflow"

    @classmethod
    def check(cls, cfg: TrackingConfig, run_dir: Path) -> None:
        """The package, a server that does not answer, a file store MLflow 3 refuses: one line each."""
        super().check(cfg, run_dir)
        import httpx  # start-up time: httpx loads only when this runs

        uri = tracking_uri(cfg, run_dir)
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

    def __init__(self, cfg: TrackingConfig, run_dir: Path, name: str, config: dict, *, resume: bool):
        super().__init__(cfg, run_dir, name, config, resume=resume)
        import mlflow  # start-up time: mlflow loads only for tracking.backend=mlflow (checked installed before)

        self.mlflow = mlflow
        # mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI; put the user's back when the run ends.
        self._user_uri = os.environ.get("MLFLOW_TRACKING_URI")
        uri = tracking_uri(cfg, run_dir)
        try:
            self.new_run = self._start(uri, name, resume=resume)
        except Exception as err:  # MlflowException, requests' and SQLAlchemy's errors: one line, not mlflow's retries' tracebacks
            raise ConfigError(f"tracking.backend=mlflow: cannot start the MLflow run at {redact(uri)}: {first_line(err)[:300]}; "
                              "check the tracking server, or set tracking.backend=none") from None

    def _start(self, uri: str, name: str, *, resume: bool) -> bool:
        mlflow, cfg, run_dir = self.mlflow, self.cfg, self.run_dir
        mlflow.set_tracking_uri(uri)
        experiment = redact(os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.project)
        if mlflow.get_experiment_by_name(experiment) is None:
            # A new experiment keeps its artifacts beside the run (not in ./mlruns of whatever directory the job started in),
            # unless a tracking server decides where they go.
            local = urlparse(uri).scheme in ("sqlite", "file", "")
            mlflow.create_experiment(experiment, artifact_location=(run_dir / rundir.RunDir.MLFLOW_ARTIFACTS).resolve().as_uri() if local else None)
        mlflow.set_experiment(experiment)
        id_file = run_dir / rundir.RunDir.MLFLOW_RUN_ID
        if resume and id_file.is_file():
            mlflow.start_run(run_id=id_file.read_text().strip())  # the same run continues
            return False
        tags = {**{t: "true" for t in cfg.tags}, **({"distill.group": cfg.group} if cfg.group else {}),
                **({"mlflow.note.content": cfg.notes} if cfg.notes else {})}
        run = mlflow.start_run(run_name=name, tags=redact(tags) or None)
        rundir.write_atomic(id_file, run.info.run_id)
        return True

    def add_config(self, config: dict) -> None:
        if self.new_run:  # a resumed run has its params (MLflow refuses to change one)
            self.mlflow.log_params({k: str(v)[:6000] for k, v in flatten(config).items()})

    def log(self, metrics: dict, step: int) -> None:
        self.mlflow.log_metrics({metric_name(k): v for k, v in metrics.items()}, step=step)

    def summary(self, values: dict, rows: list[dict], plots: list[Path]) -> None:
        self.mlflow.log_metrics({metric_name(k): v for k, v in flatten(values).items() if numeric(v)})
        columns = list(dict.fromkeys(k for row in rows for k in row))
        self.mlflow.log_table({c: [cell(row.get(c)) for row in rows] for c in columns}, artifact_file="report_rows.json")
        for name in (rundir.RunDir.REPORT, rundir.RunDir.EVAL, rundir.RunDir.CONFIG):
            if (self.run_dir / name).is_file():
                self.mlflow.log_artifact(str(self.run_dir / name))
        for path in plots:
            self.mlflow.log_artifact(str(path), artifact_path="plots")

    def table(self, name: str, rows: list[dict], step: int) -> None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        self.mlflow.log_table({c: [cell(row.get(c)) for row in rows] for c in columns}, artifact_file=f"{name}/step_{step:08d}.json")

    def log_model(self, path: Path, *, kind: str, step: int, task: str) -> None:
        """A checkpoint as files; the student as an MLflow transformers model (loadable with mlflow.transformers.load_model),
        or as files where the flavor cannot take it (a LoRA adapter, a task without a pipeline), with a line saying why."""
        if kind == "checkpoint":
            self.mlflow.log_artifacts(str(path), artifact_path=f"checkpoint/step_{step:08d}")
            return
        why = "a LoRA adapter" if (path / "adapter_config.json").is_file() else None if task in PIPELINES else f"task {task}"
        if why is None:
            try:
                self._log_transformers_model(path, task)
                return
            except Exception as err:  # the flavor's limits (versions, model kinds): the files still reach the run
                why = f"mlflow.transformers refused it: {first_line(err)[:200]}"
        print(f"MLflow: the student is logged as files (artifact student/), not as an MLflow model: {why}", file=sys.stderr)
        self.mlflow.log_artifacts(str(path), artifact_path="student")

    def _log_transformers_model(self, path: Path, task: str) -> None:
        import transformers  # start-up time: loaded only to log the student

        auto_class, pipeline_task = PIPELINES[task]
        model = getattr(transformers, auto_class).from_pretrained(path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        # pip_requirements given: mlflow's inference of them imports torchvision and more, which a student never needs.
        self.mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tokenizer}, name="student", task=pipeline_task,
                                           pip_requirements=["torch", "transformers", "accelerate"])

    def close(self, *, failed: bool = False) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
        if self._user_uri:
            self.mlflow.set_tracking_uri(self._user_uri)
        else:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
