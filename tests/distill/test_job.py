"""End to end on tiny models saved to disk: outputs, re-evaluation, trackers, secrets."""

import json

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


def test_mlflow_records_readable(tiny, corpus, tmp_path):
    import mlflow

    run_dir, _ = run_job(tiny, corpus, tmp_path / "ml", "tracking.backend=mlflow", "eval.speed=false", "tracking.project=tiny-exp",
                         "tracking.group=sweep-1", "tracking.tags=[kd, tiny]", "tracking.notes=a first try")
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-exp")
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) == 6
    assert run.data.params["loss.kind"] == "forward_kl"
    tags = run.data.tags
    assert tags["distill.group"] == "sweep-1" and "kd" in tags and "tiny" in tags and tags["mlflow.note.content"] == "a first try"
    # The final evaluation is in the history, as the report has it.
    (final,) = client.get_metric_history(run.info.run_id, "final_student_perplexity")
    assert final.step == 6 and final.value == pytest.approx(json.loads((run_dir / "eval.json").read_text())["rows"][-1]["perplexity"])


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
