"""End to end on tiny models saved to disk: outputs, re-evaluation, trackers, secrets."""

import json
import os

import pytest

from conftest import distill_cli, read_metrics, run_job, reset_accelerate

EVAL_ROW_FIELDS = {"model", "params", "disk_bytes", "memory_bytes", "quantization", "perplexity", "ce",
                   "latency_ms_per_token", "throughput_tokens_per_s"}
STEP_FIELDS = {"train/loss", "train/kd_loss", "train/ce_loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
               "train/teacher_time_share", "train/peak_memory_bytes"}


@pytest.fixture(scope="module")
def finished_run(tiny, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    run_job(tiny, corpus, out, "train.max_steps=8", "train.eval_every=4", "train.save_every=4")
    reset_accelerate()
    return out


def test_run_directory_layout(finished_run):
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "report.md", "student/config.json", "student/model.safetensors",
                 "student/tokenizer.json", "checkpoints/step_00000008/trainer_state.json"):
        assert (finished_run / name).exists(), name
    assert not list(finished_run.glob("**/.tmp-*"))


def test_metrics_have_every_field(finished_run):
    metrics = read_metrics(finished_run)
    steps = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 9))
    for m in steps:
        assert STEP_FIELDS <= m.keys()
        assert 0.0 < m["train/teacher_time_share"] < 1.0 and m["train/tokens_per_s"] > 0
    assert any("eval/kl_to_teacher" in m for m in metrics)


def test_eval_json_has_every_field(finished_run):
    result = json.loads((finished_run / "eval.json").read_text())
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"teacher", "initial_student", "student"}
    for name in ("teacher", "student"):
        assert EVAL_ROW_FIELDS <= rows[name].keys(), name
        assert all(rows[name][k] is not None for k in EVAL_ROW_FIELDS), name
    assert {"kl_to_teacher", "top1_agreement"} <= rows["student"].keys()
    assert rows["student"]["params"] < rows["teacher"]["params"]
    assert result["validation_tokens"] > 0
    report = (finished_run / "report.md").read_text()
    assert "| teacher" in report and "| student" in report and "speedup" in report


def test_student_loads_with_auto_class(finished_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(finished_run / "student")
    tokenizer = AutoTokenizer.from_pretrained(finished_run / "student")
    assert model.config.num_hidden_layers == 1
    ids = tokenizer("def main():", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.isfinite(model(ids).logits).all()


def test_distill_eval_rewrites_the_same_figures(finished_run):
    before = json.loads((finished_run / "eval.json").read_text())
    result = distill_cli("eval", str(finished_run))
    assert result.returncode == 0, result.stderr[-2000:]
    after = json.loads((finished_run / "eval.json").read_text())
    rows_before = {r["model"]: r for r in before["rows"]}
    rows_after = {r["model"]: r for r in after["rows"]}
    for name in ("teacher", "student", "initial_student"):
        assert rows_after[name]["perplexity"] == pytest.approx(rows_before[name]["perplexity"], rel=1e-4)
    assert "| student" in result.stdout


def test_tensorboard_records_readable(tiny, corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = run_job(tiny, corpus, tmp_path / "tb", "tracking.backend=tensorboard", "eval.speed=false", "eval.speculative=true",
                         "eval.speculative_prompts=2", "eval.speculative_new_tokens=8")
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 7))
    assert 0 <= acc.Scalars("final/student/spec_acceptance_rate")[0].value <= 1  # the draft-model figures reach the tracker
    (final,) = acc.Scalars("final/student/perplexity")
    assert final.step == 6 and final.value == pytest.approx(json.loads((run_dir / "eval.json").read_text())["rows"][-1]["perplexity"], rel=1e-5)
    assert {"plots/loss", "plots/validation", "plots/speed"} <= set(acc.Tags()["images"])
    # HParams: the settings against the student's final figures, in the run add_hparams writes beside the main one.
    (hparams_dir,) = [p for p in (run_dir / "tensorboard").iterdir() if p.is_dir()]
    hp = EventAccumulator(str(hparams_dir))
    hp.Reload()
    assert "_hparams_/session_start_info" in hp.PluginTagToContent("hparams")
    assert hp.Scalars("hparams/student/perplexity")[0].value == pytest.approx(final.value, rel=1e-5)


def test_mlflow_records_readable(tiny, corpus, tmp_path):
    import mlflow

    run_dir, _ = run_job(tiny, corpus, tmp_path / "ml", "tracking.backend=mlflow", "eval.speed=false", "tracking.project=tiny-exp",
                         "tracking.group=sweep-1", "tracking.tags=[kd, tiny]", "tracking.notes=a first try", "tracking.log_model=end")
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-exp")
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == 6
    assert run.data.params["loss.kind"] == "forward_kl"
    tags = run.data.tags
    assert tags["distill.group"] == "sweep-1" and "kd" in tags and "tiny" in tags and tags["mlflow.note.content"] == "a first try"
    # The final evaluation is in the history, as the report has it.
    (final,) = client.get_metric_history(run.info.run_id, "final/student/perplexity")
    assert final.step == 6 and final.value == pytest.approx(json.loads((run_dir / "eval.json").read_text())["rows"][-1]["perplexity"])
    # One naming rule: the project's own names, as in W&B and TensorBoard.
    assert {"train/loss", "train/lr", "eval/perplexity", "final/student/perplexity", "train/runtime_seconds"} <= set(run.data.metrics)
    assert not [name for name in run.data.metrics if name.startswith("train_")]
    # The student as an MLflow transformers model: loads back through mlflow with its tokenizer.
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    try:
        (logged,) = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
        components = mlflow.transformers.load_model(logged.model_uri, return_type="components")
    finally:
        mlflow.set_tracking_uri(None)
    assert logged.name == "student" and components["model"].config.num_hidden_layers == 1 and components["tokenizer"] is not None


def test_wandb_offline_run_and_no_secrets_anywhere(tiny, corpus, tmp_path, monkeypatch):
    secret = "hf_TESTSECRETvalue0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("MY_SERVICE_API_KEY", "sk-another-secret-42")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir, _ = run_job(tiny, corpus, tmp_path / "wb", "tracking.backend=wandb", "eval.speed=false",
                         f"tracking.run_name=leaky-{secret}")
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    assert list(offline.glob("*.wandb"))
    for path in run_dir.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert secret.encode() not in blob and b"sk-another-secret-42" not in blob, path
    assert "leaky-***" in (run_dir / "config.yaml").read_text()


def test_a_wandb_run_is_ready_for_a_report(tiny, corpus, tmp_path, monkeypatch):
    """Read back from the offline .wandb file: what a W&B report is built from."""
    from conftest import read_wandb_records

    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_JOB_TYPE", "WANDB_NOTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "from-the-environment")
    monkeypatch.setenv("WANDB_X_STATS_SAMPLING_INTERVAL", "0.5")
    run_dir, result = run_job(tiny, corpus, tmp_path / "wb", "tracking.backend=wandb", "eval.speed=false", "tracking.group=sweep-7",
                              "tracking.tags=[kd, tiny]", "tracking.job_type=distill", "tracking.notes=first try", "tracking.log_model=end")
    records = read_wandb_records(run_dir)
    kinds = lambda kind: [r for r in records if r.WhichOneof("record_type") == kind]
    (run,) = [r.run for r in kinds("run")]
    assert (run.project, run.run_group, run.job_type, run.notes, list(run.tags)) == ("from-the-environment", "sweep-7", "distill", "first try", ["kd", "tiny"])
    config = {item.key: json.loads(item.value_json) for r in kinds("config") for item in r.config.update} | \
             {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["models"]["student"]["params"] == result["rows"][-1]["params"] and config["loss"]["kind"] == "forward_kl"
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item} for r in kinds("history")]
    assert all(h["train/global_step"] == h["_step"] for h in history if "train/global_step" in h)
    final = next(h for h in history if "final/student/perplexity" in h)
    assert final["final/student/perplexity"] == pytest.approx(result["rows"][-1]["perplexity"])  # the history agrees with the report
    # The report's rows as a table, the plots as images (W&B flattens their descriptions into nested keys).
    assert (final["final/report/_type"], final["final/report/nrows"]) == ("table-file", 3)
    assert final["plots/loss/_type"] == final["plots/validation/_type"] == "image-file"
    assert any(m.metric.glob_name == "*" and m.metric.step_metric == "train/global_step" for m in kinds("metric"))
    summary = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for r in kinds("summary") for item in r.summary.update}
    # Runtime is the logged step times summed over the steps they cover; throughput is the samples seen over it (6 steps x 4).
    from distill.train import train_seconds

    seconds = train_seconds(read_metrics(run_dir))
    assert summary["train/runtime_seconds"] == pytest.approx(seconds) and seconds > 0
    assert summary["train/samples_per_second"] == pytest.approx(6 * 4 / seconds) and "rows" not in summary
    assert kinds("stats"), "no system metrics were recorded"
    (artifact,) = [a.artifact for a in kinds("artifact") if a.artifact.type == "model"]
    assert artifact.type == "model" and {f.path for f in artifact.manifest.contents} >= {"model.safetensors", "config.json", "README.md"}
    card = (run_dir / "student" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "| student " in card and "forward_kl" in card


def test_wandb_finds_the_key_wandb_login_wrote_for_its_host(tmp_path, monkeypatch):
    from distill.tracking import wandb_mode

    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "settings").write_text("[default]\nbase_url = https://wandb.example.com\n")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb"))
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    mode, why = wandb_mode()  # a key for the default host is not one for the host `wandb login --host` chose
    assert mode == "offline" and "no API key for https://wandb.example.com" in why
    netrc.write_text("machine wandb.example.com\n  login user\n  password " + "b" * 40 + "\n")
    assert wandb_mode() == ("online", f"an API key for https://wandb.example.com from {netrc}")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode() == ("offline", "WANDB_MODE is set")


def test_the_baseline_row_is_shown_only_for_a_matching_run(tiny, corpus, tmp_path, capsys):
    baseline, _ = run_job(tiny, corpus, tmp_path / "ce", "loss.alpha=1.0", "eval.speed=false", "eval.initial=false")
    reset_accelerate()
    capsys.readouterr()
    run_dir, result = run_job(tiny, corpus, tmp_path / "kd", "eval.speed=false", f"eval.baseline={baseline}")
    rows = {r["model"]: r for r in result["rows"]}
    assert [r["model"] for r in result["rows"]] == ["teacher", "initial_student", "baseline", "student"]
    assert rows["baseline"]["perplexity"] == json.loads((baseline / "eval.json").read_text())["rows"][-1]["perplexity"]
    assert "against the baseline (the same student, data and steps, without the teacher): perplexity" in capsys.readouterr().out
    assert "| baseline " in (run_dir / "report.md").read_text()
    reset_accelerate()
    _, result = run_job(tiny, corpus, tmp_path / "longer", "eval.speed=false", "train.max_steps=8", f"eval.baseline={baseline}")
    assert "baseline" not in [r["model"] for r in result["rows"]]
    assert f"eval.baseline: {baseline} is not shown: its run differs from this job in train.max_steps" in capsys.readouterr().err


def test_mlflow_honours_its_variables_logs_checkpoints_and_resumes_its_run(tiny, corpus, tmp_path, monkeypatch):
    import mlflow

    store = tmp_path / "team.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-exp")
    sets = ("tracking.backend=mlflow", "eval.speed=false", "train.save_every=2", "tracking.log_model=checkpoints")
    run_dir, _ = run_job(tiny, corpus, tmp_path / "ml", *sets, "train.max_steps=4")
    reset_accelerate()
    run_job(tiny, corpus, tmp_path / "ml", *sets, "train.max_steps=6", resume=True)
    assert not (run_dir / "mlflow.db").exists() and os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{store}"
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("team-exp").experiment_id])  # --resume continued the same run
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 7))
    saved = {f.path for f in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert saved == {"checkpoint/step_00000002", "checkpoint/step_00000004", "checkpoint/step_00000006"}
    assert not client.list_artifacts(run.info.run_id, "student")  # checkpoints, not the final student
    assert {f.path for f in client.list_artifacts(run.info.run_id)} >= {"report.md", "eval.json", "config.yaml", "plots"}


def test_mlflow_keeps_its_artifacts_beside_the_run(tiny, corpus, tmp_path, monkeypatch):
    import mlflow

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    run_dir, _ = run_job(tiny, corpus, tmp_path / "ml", "tracking.backend=mlflow", "eval.speed=false", "eval.at_end=false",
                         "tracking.project=beside")
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    assert client.get_experiment_by_name("beside").artifact_location == (run_dir / "mlflow-artifacts").resolve().as_uri()


def test_a_resumed_wandb_run_continues_its_id_and_an_overwritten_one_gets_a_new_one(tiny, corpus, tmp_path, monkeypatch):
    from conftest import read_wandb_records

    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    sets = ("tracking.backend=wandb", "eval.speed=false", "train.save_every=2", "tracking.system_metrics=false")
    run_dir, _ = run_job(tiny, corpus, tmp_path / "wb", *sets, "train.max_steps=4")
    first = (run_dir / ".wandb_id").read_text()
    reset_accelerate()
    run_job(tiny, corpus, tmp_path / "wb", *sets, "train.max_steps=6", resume=True)
    # offline-run-TIME-ID, and -N after it when a run of the same id starts within the same second (wandb's suffix)
    ids = {p.name.split("-")[3] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert ids == {first}
    reset_accelerate()
    from distill import rundir

    rundir.clear_run(run_dir)  # what --overwrite does before the job starts
    run_job(tiny, corpus, tmp_path / "wb", *sets)
    assert (run_dir / ".wandb_id").read_text() != first
    (run,) = [r.run for r in read_wandb_records(run_dir) if r.WhichOneof("record_type") == "run"]
    assert run.run_id != first


def test_wandb_and_tensorboard_at_once_with_the_final_evaluation_under_the_mid_run_names(tiny, corpus, tmp_path, monkeypatch):
    """tracking.backend as a list (report_to): both records, each with the final evaluation as the last eval/ value,
    W&B's console log kept, and no endpoint in any tracker's config or in HParams (only the settings the run chose)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import read_wandb_records

    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    run_dir, result = run_job(tiny, corpus, tmp_path / "both", "tracking.backend=wandb,tensorboard", "eval.speed=false", "train.eval_every=3",
                              "teacher.url=http://pool.internal:8765", "loss.temperature=2.0", "tracking.system_metrics=false")
    final = next(r for r in result["rows"] if r["model"] == "student")["perplexity"]
    records = read_wandb_records(run_dir)
    kinds = lambda kind: [r for r in records if r.WhichOneof("record_type") == kind]
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item} for r in kinds("history")]
    mid_run = [h["eval/perplexity"] for h in history if "eval/perplexity" in h]
    assert len(mid_run) == 2 and mid_run[-1] == pytest.approx(final) and mid_run[0] != pytest.approx(final)
    summary = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for r in kinds("summary") for item in r.summary.update}
    assert summary["eval/perplexity"] == pytest.approx(final)
    config = {item.key: json.loads(item.value_json) for r in kinds("config") for item in r.config.update} | \
             {item.key: json.loads(item.value_json) for item in kinds("run")[0].run.config.update}
    assert "url" not in config["teacher"] and "token_file" not in config["teacher"] and config["loss"]["temperature"] == 2.0
    assert "pool.internal" not in "".join(str(p.read_bytes()) for p in (run_dir / "wandb").rglob("*") if p.is_file())
    (log,) = list((run_dir / "wandb").glob("offline-run-*/files/output.log"))
    assert "eval at step 3/6: " in log.read_text()  # what the job printed while the run was open
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("eval/perplexity")][-1] == pytest.approx(final, rel=1e-5)
    (hparams_dir,) = [p for p in (run_dir / "tensorboard").iterdir() if p.is_dir()]
    hp = EventAccumulator(str(hparams_dir))
    hp.Reload()
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = hp.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    chosen = set(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)
    assert {"loss.temperature", "loss.kind", "train.lr", "train.max_steps", "teacher.path"} <= chosen
    assert not {k for k in chosen if k.startswith(("teacher.url", "teacher.token_file", "tracking.", "output_dir"))}
    assert len(chosen) < 40, sorted(chosen)  # the choices of this run, not every setting


def test_the_model_card_carries_hub_metadata_and_a_snippet_that_loads_tokenizer_and_model(finished_run, tmp_path):
    import yaml as pyyaml

    from distill.config import load_config
    from distill.report import card_metadata

    card = (finished_run / "student" / "README.md").read_text()
    front = pyyaml.safe_load(card.split("---")[1])
    assert front["tags"][0] == "distillation" and "base_model" not in front  # a local teacher of one's own has no hub id
    assert str(finished_run.parent) not in card.split("## Evaluation")[0]  # the teacher by its name, not a local path
    snippet = card.split("```python\n")[1].split("```")[0].replace("PATH", repr(str(finished_run / "student")))
    scope = {}
    exec(snippet, scope)  # the card's own snippet: the tokenizer and the model, loaded
    assert scope["tokenizer"]("def f():")["input_ids"] and scope["model"].config.num_hidden_layers == 1
    cfg = load_config(None, ["teacher.path=/home/me/.cache/huggingface/hub/models--meta-llama--Llama-3.1-8B/snapshots/0e9e39f",
                             "student.architecture={num_hidden_layers: 2}", "data.dataset=HuggingFaceFW/fineweb-edu", "student.license=llama3.1"])
    assert card_metadata(cfg, lora=False) == {"library_name": "transformers", "base_model": "meta-llama/Llama-3.1-8B",
                                              "datasets": ["HuggingFaceFW/fineweb-edu"], "license": "llama3.1",
                                              "tags": ["distillation", "knowledge-distillation", "causal_lm"], "pipeline_tag": "text-generation"}


def test_push_shows_what_it_would_upload_and_refuses_in_one_line(finished_run, tmp_path):
    """No hub is reachable here: what a push would send (files and calls) by --dry-run, and its one-line refusals."""
    from conftest import distill_cli

    no_token = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf")}
    planned = distill_cli("push", str(finished_run), "me/tiny-student", "--private", "--dry-run", env=no_token)
    assert planned.returncode == 0, planned.stderr
    lines = planned.stdout.splitlines()
    assert lines[0].startswith("create_repo(repo_id='me/tiny-student', repo_type='model', private=True, exist_ok=True); "
                               "upload_folder(repo_id='me/tiny-student', revision=None, commit_message='distill: the student of run run')")
    sent = {line.split()[0] for line in lines[1:]}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "distill/report.md", "distill/eval.json",
            "distill/config.yaml", "distill/plots/loss.png"} <= sent
    assert not [name for name in sent if name.startswith(("checkpoints/", "adapter/", "quantized/"))]
    refused = [
        (("push", str(finished_run), "me/tiny-student"), no_token, 2, "no Hugging Face token: run `hf auth login` or set HF_TOKEN"),
        (("push", str(tmp_path), "me/x"), no_token, 2, "is not a finished run (needs student/ and eval.json)"),
        (("push", str(finished_run), "not a repo"), no_token, 2, "REPO_ID 'not a repo' is not a hub repository id"),
        (("push", str(finished_run), "me/x", "--quantized", "bnb_4bit", "--dry-run"), no_token, 2, "--quantized bnb_4bit: "),
        (("push", str(finished_run), "me/x", "--adapter", "--dry-run"), no_token, 2, "--adapter: "),
        # A token, but no hub (offline here; a refused token where the hub answers): one line, exit 1.
        (("push", str(finished_run), "me/tiny-student"), {"HF_TOKEN": "hf_not_a_real_token"}, 1, "cannot push to me/tiny-student: "),
    ]
    for args, env, code, message in refused:
        result = distill_cli(*args, env=env, timeout=300)
        errors = [line for line in result.stderr.splitlines() if line.startswith("distill: error:")]
        assert result.returncode == code and len(errors) == 1 and message in errors[0], (args, result.stderr[-2000:])
