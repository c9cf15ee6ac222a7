"""Downstream benchmarks (lm-evaluation-harness, offline with a local task) and the student as the
teacher's draft model, in eval.json, the report and the trackers."""

import json

import pytest
import torch

from conftest import distill_cli, reset_accelerate, run_job, save_llama
from distill import downstream
from distill.config import ConfigError, LmEvalConfig
from distill.tiny import LM_EVAL_TASK, write_lm_eval_task
from distill_launcher.cli import main

SCORE = f"lm_eval/{LM_EVAL_TASK}/acc"


@pytest.fixture(scope="module")
def local_task(corpus, tmp_path_factory):
    """A multiple-choice task made from the validation text: which line comes next?"""
    out = tmp_path_factory.mktemp("lm_eval")
    write_lm_eval_task(corpus["validation"], out, examples=24)
    return out


def lm_eval_set(local_task, **extra) -> str:
    fields = {"tasks": [LM_EVAL_TASK], "include_path": [str(local_task)], "batch_size": 4, **extra}
    return "eval.lm_eval=" + json.dumps(fields)


@pytest.fixture(scope="module")
def judged_run(tiny, corpus, local_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("judged") / "run"
    _, result = run_job(tiny, corpus, out, "train.max_steps=6", lm_eval_set(local_task), "eval.speculative=true",
                        "eval.speculative_prompts=3", "eval.speculative_new_tokens=12", "eval.quantize=[int8_dynamic]",
                        "tracking.backend=mlflow")
    reset_accelerate()
    return out, result


def test_every_model_row_has_benchmark_scores_with_stderr(judged_run):
    _, result = judged_run
    rows = {r["model"]: r for r in result["rows"]}
    for name in ("teacher", "student", "student+int8_dynamic"):
        assert 0.0 <= rows[name][SCORE] <= 1.0, name
        assert rows[name][SCORE + "_stderr"] > 0, name
        assert f"lm_eval/{LM_EVAL_TASK}/acc_norm" in rows[name]


def test_every_student_row_is_measured_as_a_draft_with_identical_outputs(judged_run):
    _, result = judged_run
    rows = {r["model"]: r for r in result["rows"]}
    assert "spec_speedup" not in rows["teacher"]
    for name in ("student", "student+int8_dynamic"):
        row = rows[name]
        assert row["spec_identical"] is True, name  # greedy assisted generation = the teacher's own greedy output
        assert 0.0 <= row["spec_acceptance_rate"] <= 1.0 and row["spec_accepted_per_step"] >= 0
        assert row["spec_tokens_per_s"] > 0 and row["spec_teacher_tokens_per_s"] > 0


def test_report_and_trackers_show_them(judged_run):
    from mlflow.tracking import MlflowClient

    out, _ = judged_run
    report = (out / "report.md").read_text()
    assert "Downstream benchmarks" in report and f"{LM_EVAL_TASK}/acc" in report and " ± " in report
    assert "Speculative decoding" in report and "| student+int8_dynamic" in report
    saved = json.loads((out / "eval.json").read_text())
    assert SCORE in saved["rows"][-1]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("distill").experiment_id])
    metrics = run.data.metrics
    assert f"student/{SCORE}" in metrics and f"teacher/{SCORE}" in metrics and "student/spec_acceptance_rate" in metrics
    assert f"student_int8_dynamic/{SCORE}" in metrics


def test_the_teacher_as_its_own_draft_accepts_everything(tiny, corpus):
    """The counting: a draft identical to the teacher has every proposed token accepted."""
    from transformers import AutoModelForCausalLM

    from distill.data import collate

    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    same = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    ids = torch.randint(3, len(tiny["tokenizer"]), (2, 20), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [collate([{"input_ids": row, "labels": row} for row in ids], pad_id=0)]
    reference = downstream.teacher_alone(teacher, batches, device=torch.device("cpu"), new_tokens=16, prompts=2, prompt_tokens=8)
    figures = downstream.speculative(teacher, same, reference, device=torch.device("cpu"), new_tokens=16)
    assert figures["spec_identical"] is True
    assert figures["spec_acceptance_rate"] == pytest.approx(1.0)
    assert figures["spec_accepted_per_step"] >= 1.0


def test_a_draft_with_another_vocabulary_is_noted_not_measured(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    padded = save_llama(tmp_path / "padded", tiny["tokenizer"], vocab_size=len(tiny["tokenizer"]) + 64, layers=1, hidden=32, heads=2)
    student = AutoModelForCausalLM.from_pretrained(tiny["student"])
    figures = downstream.speculative(padded, student, {"prompts": [], "outputs": []}, device=torch.device("cpu"), new_tokens=4)
    assert figures == {"spec_note": f"not measured: the teacher's and the draft's vocabularies differ ({len(tiny['tokenizer']) + 64} vs "
                                    f"{len(tiny['tokenizer'])} ids)"}


def test_unknown_task_lists_close_matches(local_task):
    with pytest.raises(ConfigError, match=f"unknown lm-eval task 'stdlib_next_wor'; close matches: {LM_EVAL_TASK}"):
        downstream.check_tasks(LmEvalConfig(tasks=["stdlib_next_wor"], include_path=[str(local_task)]))
    with pytest.raises(ConfigError, match="close matches: .*hellaswag"):
        downstream.check_tasks(LmEvalConfig(tasks=["hellaswagg"]))


def test_missing_harness_is_one_line_before_training(tiny, corpus, tmp_path, local_task, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_lm_eval)
    from test_bad_input import cli_run

    assert main(cli_run(tiny, corpus, tmp_path / "r", lm_eval_set(local_task))) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "distill: error: eval.lm_eval needs lm-evaluation-harness: pip install 'distill[lm-eval]' (or pip install lm-eval)"
    assert not (tmp_path / "r" / "checkpoints").exists() and not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_distill_eval_adds_benchmarks_and_draft_figures_to_a_finished_run(tiny, corpus, local_task, tmp_path):
    out, _ = run_job(tiny, corpus, tmp_path / "run", "train.max_steps=2", "eval.speed=false")
    result = distill_cli("eval", str(out), "--lm-eval", LM_EVAL_TASK, "--lm-eval-include", str(local_task), "--lm-eval-limit", "8",
                         "--speculative")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["model"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}
    assert SCORE in rows["teacher"] and SCORE in rows["student"] and rows["student"]["spec_identical"] is True
    assert "Downstream benchmarks" in result.stdout and "Speculative decoding" in result.stdout
    unknown = distill_cli("eval", str(out), "--lm-eval", "no_such_task_at_all", "--lm-eval-include", str(local_task))
    assert unknown.returncode == 2 and "unknown lm-eval task 'no_such_task_at_all'" in unknown.stderr
