"""What a careful user or an attacker on a shared cluster can hand the job: run directories, planted links,
secrets on the command line, unreachable trackers, shared caches. Each through the real `distill` command."""

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import yaml

from conftest import distill_cli, job_overrides, run_job
from distill import rundir
from distill.shared_build import build_once

PAYLOAD_METRIC = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")  # module-level code: runs as soon as the metric is loaded

import datasets
import evaluate


class Planted(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="", citation="", inputs_description="",
                                   features=datasets.Features({{"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}}))

    def _compute(self, predictions, references):
        return {{"n": len(references)}}
'''


def cli_args(tiny, corpus, out, *extra):
    config = out.parent / f"{out.name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("{}\n")
    return [str(config), *[a for o in job_overrides(tiny, corpus, out, *extra) for a in ("--set", o)]]


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def handed_run(tiny, corpus, tmp_path_factory):
    """A finished run whose config.yaml someone edited to name a metric module that runs code."""
    root = tmp_path_factory.mktemp("handed")
    out = root / "run"
    run_job(tiny, corpus, out, "train.max_steps=2", "eval.speed=false")
    marker = root / "PWNED"
    metric = root / "planted.py"
    metric.write_text(PAYLOAD_METRIC.format(marker=str(marker)))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["eval"]["metrics"] = [str(metric)]
    cfg["eval"]["speed"] = False
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    return out, marker


@pytest.mark.slow
def test_eval_of_a_handed_run_runs_no_code_unless_allowed(handed_run, tmp_path):
    out, marker = handed_run
    for command in (["eval", str(out)], ["quantize", str(out), "--method", "int8_dynamic"]):
        refused = distill_cli(*command, env={"HF_HUB_OFFLINE": "1"})
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert last_line(refused) == (f"distill: error: {out / 'config.yaml'} names code to run (eval.metrics: {marker.parent / 'planted.py'}); "
                                      "pass --allow-code if you trust this run directory and that code")
        assert not marker.exists(), "the metric's code ran"
    allowed = distill_cli("eval", str(out), "--allow-code", env={"HF_HUB_OFFLINE": "1"})
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert marker.read_text() == "ran"
    rows = {r["model"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}
    assert rows["student"]["metric/planted/n"] == rows["student"]["tokens"]


@pytest.mark.slow
def test_planted_links_never_redirect_a_runs_writes(tiny, corpus, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    elsewhere = tmp_path / "elsewhere.yaml"
    out = tmp_path / "shared-scratch" / "run"
    out.mkdir(parents=True)
    (out / "metrics.jsonl").symlink_to(victim)
    (out / "config.yaml").symlink_to(elsewhere)  # dangling: the run would create it
    refused = distill_cli("run", *cli_args(tiny, corpus, out, "train.max_steps=2", "eval.at_end=false"))
    assert refused.returncode == 2, refused.stderr[-2000:]
    line = last_line(refused)
    assert line.startswith(f"distill: error: output_dir {out}: ") and "is a symbolic link to" in line and "outside the run directory" in line
    assert victim.read_text() == "precious\n" and not elsewhere.exists()
    # A link the user made to the run directory itself is theirs to make; the run writes inside its target.
    target = tmp_path / "big-disk" / "run"
    target.mkdir(parents=True)
    linked = tmp_path / "linked-run"
    linked.symlink_to(target)
    done = distill_cli("run", *cli_args(tiny, corpus, linked, "train.max_steps=2", "eval.at_end=false"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (target / "student" / "config.json").is_file() and (target / "metrics.jsonl").is_file()


def test_atomic_writes_replace_a_planted_link_instead_of_following_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").symlink_to(victim)
    (run / f".tmp-report.md-{'0' * 8}").symlink_to(victim)  # a guessed temporary name does not help either
    rundir.write_atomic(run / "eval.json", "{}")
    rundir.write_atomic(run / "report.md", "# report")
    assert victim.read_text() == "precious\n"
    assert not (run / "eval.json").is_symlink() and (run / "eval.json").read_text() == "{}"
    (run / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(rundir.ConfigError, match="metrics.jsonl: it is a symbolic link"):
        rundir.open_log(run / "metrics.jsonl", append=True)
    assert victim.read_text() == "precious\n"


SECRET_TOKEN, SECRET_KEY = "s3cretT0kenXYZ", "k3yValueQWE"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["wandb", "tensorboard", "mlflow"])
def test_secrets_on_the_command_line_reach_no_tracker_file(tiny, corpus, tmp_path, backend):
    """W&B keeps sys.argv in its .wandb file (which `wandb sync` uploads); every tracker's files are searched."""
    out = tmp_path / "run"
    notes = f"https://bob:{SECRET_TOKEN}@host/x?api_key={SECRET_KEY}"
    done = distill_cli("run", *cli_args(tiny, corpus, out, "train.max_steps=2", "eval.speed=false", f"tracking.backend={backend}",
                                        f"tracking.notes={notes}"), env={"WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-3000:]
    records = {"wandb": "wandb/offline-run-*/*.wandb", "tensorboard": "tensorboard/**/events.out.tfevents.*", "mlflow": "mlflow.db"}
    assert list(out.glob(records[backend])), f"no {backend} record in {sorted(p.name for p in out.iterdir())}"
    if backend == "wandb":  # the redacted command line is there, so the search below looks where the secret was
        assert b"https://***@host/x?api_key=***" in next(out.glob(records[backend])).read_bytes()
    leaks = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and (SECRET_TOKEN.encode() in p.read_bytes() or SECRET_KEY.encode() in p.read_bytes())]
    assert not leaks
    assert SECRET_TOKEN not in done.stdout + done.stderr


@pytest.mark.slow
def test_a_tracker_that_cannot_start_is_one_line_before_models_load_and_leaves_no_run(tiny, corpus, tmp_path):
    out = tmp_path / "run"
    down = distill_cli("run", *cli_args(tiny, corpus, out, "tracking.backend=mlflow", "tracking.mlflow_tracking_uri=http://127.0.0.1:9"))
    assert down.returncode == 2
    assert down.stderr.strip().splitlines() == ["distill: error: tracking.backend=mlflow: the MLflow server at http://127.0.0.1:9 does not answer "
                                                "([Errno 111] Connection refused); start it, correct tracking.mlflow_tracking_uri (or "
                                                "MLFLOW_TRACKING_URI), or set tracking.backend=none"]
    assert not out.exists()
    filed = distill_cli("run", *cli_args(tiny, corpus, out, "tracking.backend=mlflow"), env={"MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}"})
    assert filed.returncode == 2 and "MLflow 3 refuses the file store" in last_line(filed) and not out.exists()


@pytest.mark.slow
def test_garbage_data_is_one_line_and_leaves_no_run(tiny, corpus, tmp_path):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(os.urandom(4096))
    out = tmp_path / "run"
    failed = distill_cli("run", *cli_args(tiny, corpus, out, f"data.train_files=[{garbage}]"))
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [f"distill: error: data.train_files: cannot read {garbage} as parquet: Parquet magic bytes "
                                                  "not found in footer. Either the file is corrupted or this is not a parquet file."]
    assert not out.exists()
    # A directory the user made keeps what it held; the run's own files go.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert distill_cli("run", *cli_args(tiny, corpus, out, f"data.train_files=[{garbage}]")).returncode == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def _slow_build(out: str, log: str) -> None:
    def build(tmp: Path) -> None:
        with open(log, "a") as f:
            f.write(f"start {os.getpid()}\n")
        time.sleep(1.5)  # long enough for the other builder to arrive while this one works
        (tmp / "data.txt").write_text(str(os.getpid()))
        (tmp / "done").write_text("1")

    build_once(Path(out), ready=lambda p: (p / "done").is_file(), build=build, what="test")


def test_two_builders_of_one_cache_build_it_once(tmp_path):
    out, log = tmp_path / "cache", tmp_path / "log.txt"
    context = multiprocessing.get_context("fork")
    builders = [context.Process(target=_slow_build, args=(str(out), str(log))) for _ in range(2)]
    for p in builders:
        p.start()
    for p in builders:
        p.join(60)
    assert [p.exitcode for p in builders] == [0, 0]
    assert len(log.read_text().splitlines()) == 1  # one built; the other waited and reused it
    assert (out / "done").is_file() and not list(tmp_path.glob(".cache.tmp-*"))
