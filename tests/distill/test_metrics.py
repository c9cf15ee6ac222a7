"""The evaluate metric modules shipped in distill/metrics: loaded by path offline, checked against
hand computations; a user's own metric module reaches the report and the trackers."""

import re

import pytest

from distill import metrics
from distill.config import ConfigError


def test_shipped_metrics_load_offline_and_compute(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    predictions, references = [0, 1, 2, 2, 1, 0, 3], [0, 1, 1, 2, 2, 0, 0]
    assert metrics.compute("accuracy", predictions=predictions, references=references)["accuracy"] == pytest.approx(4 / 7)
    # Per class F1: 0: p=1, r=2/3 -> 0.8; 1: p=1/2, r=1/2 -> 0.5; 2: p=1/2, r=1/2 -> 0.5; 3: never right -> 0.
    assert metrics.compute("macro_f1", predictions=predictions, references=references)["macro_f1"] == pytest.approx((0.8 + 0.5 + 0.5 + 0) / 4)
    assert metrics.compute("top1_agreement", predictions=[1, 2, 3], references=[1, 0, 3])["top1_agreement"] == pytest.approx(2 / 3)
    assert metrics.compute("kl_to_teacher", predictions=[0.25, 0.75])["kl_to_teacher"] == pytest.approx(0.5)


def test_a_metric_that_cannot_load_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=re.escape("eval.metrics: cannot load metric 'no_such_metric_xyz'")):
        metrics.load("no_such_metric_xyz")


MY_METRIC = '''
import datasets
import evaluate


class WrongRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="", citation="", inputs_description="",
                                   features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        return {"rate": sum(p != r for p, r in zip(predictions, references)) / len(references)}
'''


@pytest.mark.slow
def test_a_users_metric_reaches_the_report(tiny, corpus, tmp_path, monkeypatch):
    from conftest import run_job

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = tmp_path / "wrong_rate.py"
    module.write_text(MY_METRIC)
    run_dir, result = run_job(tiny, corpus, tmp_path / "run", f"eval.metrics=[{module}]", "eval.speed=false", "train.max_steps=2")
    rows = {r["model"]: r for r in result["rows"]}
    for name in ("teacher", "initial_student", "student"):
        assert 0 <= rows[name]["metric/wrong_rate/rate"] <= 1
    # Every target is either right or wrong: the user's metric and the perplexity's targets agree in count.
    report = (run_dir / "report.md").read_text()
    assert "Further metrics (eval.metrics)" in report and "wrong_rate/rate" in report
