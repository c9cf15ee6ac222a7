"""The evaluate metric modules shipped in distill/metrics: loaded by path offline, checked against
hand computations; a user's own metric module reaches the report and the trackers."""

import re

import pytest

from conftest import REPO
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
    counter = tmp_path / "target_count.py"
    counter.write_text(MY_METRIC.replace("WrongRate", "TargetCount").replace(
        '{"rate": sum(p != r for p, r in zip(predictions, references)) / len(references)}', '{"n": len(references)}'))
    run_dir, result = run_job(tiny, corpus, tmp_path / "run", f"eval.metrics=[{module}, {counter}]", "eval.speed=false", "train.max_steps=2")
    rows = {r["model"]: r for r in result["rows"]}
    for name in ("teacher", "initial_student", "student"):
        # Every target is either right or wrong: the user's metrics see exactly the perplexity's targets.
        n, rate = rows[name]["metric/target_count/n"], rows[name]["metric/wrong_rate/rate"]
        assert n == rows[name]["tokens"] > 0
        assert 0 < rate < 1 and rate * n == pytest.approx(round(rate * n), abs=1e-6)
    report = (run_dir / "report.md").read_text()
    assert "Further metrics (eval.metrics)" in report and "wrong_rate/rate" in report


def test_the_readmes_example_metric_loads_and_computes(tmp_path, monkeypatch):
    """The metric the README shows is the one users copy: it must load by path, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    readme = (REPO / "README.md").read_text()
    block = readme.split("`evaluate.Metric` subclass in a file:", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    module = tmp_path / "wrong_rate.py"
    module.write_text(block)
    assert metrics.load(str(module)).compute(predictions=[1, 2, 3, 4], references=[1, 2, 0, 0]) == {"rate": 0.5}
