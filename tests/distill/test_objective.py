"""The objective as named, weighted terms: against a float64 reference, the same as its shorthand,
each term in the log, and load-time errors that name the key."""

import re

import pytest
import torch

from conftest import read_metrics, run_job, reset_accelerate
from distill.config import ConfigError, LossConfig, load_config
from distill.losses import IGNORE_INDEX
from distill.objective import Outputs, build_objective

BASE = ["teacher.path=t", "student.architecture={num_hidden_layers: 1}", "data.train_files=[a.txt]"]


def log_softmax64(logits, temperature):
    return torch.log_softmax(logits.double() / temperature, -1)


def test_term_sums_and_total_match_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 7, 30, generator=g) * 3, torch.randn(2, 7, 30, generator=g) * 3
    labels = torch.randint(0, 30, (2, 7), generator=g)
    labels[1, 4:] = IGNORE_INDEX
    cfg = LossConfig(terms=[{"kind": "logits", "name": "fkl", "divergence": "forward_kl", "weight": 0.6, "temperature": 2.0},
                            {"kind": "logits", "name": "rkl", "divergence": "reverse_kl", "weight": 0.3},
                            {"kind": "ce", "weight": 0.1}], chunk_size=5)
    objective = build_objective(cfg)
    sums = objective.sums(Outputs(logits=s), Outputs(logits=t), labels).double()
    mask = (labels != IGNORE_INDEX).double()
    p_t2, p_s2 = log_softmax64(t, 2.0), log_softmax64(s, 2.0)
    fkl = ((p_t2.exp() * (p_t2 - p_s2)).sum(-1) * mask).sum()
    p_t1, p_s1 = log_softmax64(t, 1.0), log_softmax64(s, 1.0)
    rkl = ((p_s1.exp() * (p_s1 - p_t1)).sum(-1) * mask).sum()
    ce = (-p_s1.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum()
    torch.testing.assert_close(sums, torch.stack([fkl, rkl, ce]), rtol=1e-5, atol=1e-5)
    total = objective.total(sums.float()).double()
    torch.testing.assert_close(total, 0.6 * 4.0 * fkl + 0.3 * rkl + 0.1 * ce, rtol=1e-5, atol=1e-5)
    assert objective.names == ["fkl", "rkl", "ce"]


def test_explicit_terms_train_exactly_like_the_shorthand(tiny, corpus, tmp_path):
    short, _ = run_job(tiny, corpus, tmp_path / "short", "loss.alpha=0.3", "loss.temperature=2.0", "eval.at_end=false")
    reset_accelerate()
    terms = "loss.terms=[{kind: logits, name: kd, divergence: forward_kl, weight: 0.7, temperature: 2.0}, {kind: ce, weight: 0.3}]"
    explicit, _ = run_job(tiny, corpus, tmp_path / "explicit", terms, "eval.at_end=false")
    for a, b in zip(read_metrics(short), read_metrics(explicit)):
        for key in ("train/loss", "train/kd_loss", "train/ce_loss", "train/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key


def test_every_term_is_logged_and_the_loss_is_their_weighted_sum(tiny, corpus, tmp_path):
    terms = ("loss.terms=[{kind: logits, name: fkl, divergence: forward_kl, weight: 0.5}, "
             "{kind: logits, name: jsd, divergence: jsd, weight: 0.5, temperature: 2.0}, {kind: ce, weight: 0.0}]")
    run_dir, _ = run_job(tiny, corpus, tmp_path / "run", terms, "eval.at_end=false")
    for m in (m for m in read_metrics(run_dir) if "train/loss" in m):
        assert m["train/loss"] == pytest.approx(0.5 * m["train/fkl_loss"] + 0.5 * 4.0 * m["train/jsd_loss"], rel=1e-6)
        assert m["train/ce_loss"] > 0  # weight 0: reported, not trained on


def test_without_a_weighted_teacher_term_the_teacher_does_not_run(tiny, corpus, tmp_path):
    run_dir, _ = run_job(tiny, corpus, tmp_path / "run", "loss.alpha=1.0", "eval.at_end=false")
    metrics = [m for m in read_metrics(run_dir) if "train/loss" in m]
    assert all(m["train/teacher_time_share"] == 0 and m["train/kd_loss"] == 0 for m in metrics)


@pytest.mark.parametrize("terms, message", [
    ("[{kind: features}]", "loss.terms[0].kind: must be one of logits, ce, hidden, attention, uld (got 'features')"),
    ("[{kind: hidden, distance: l1}]", "loss.terms[0].distance: must be mse or cosine"),
    ("[{kind: hidden, layers: last}]", "loss.terms[0].layers: expected 'uniform' or a list"),
    ("[{kind: hidden, temperature: 2}]", "unknown config key: loss.terms[0].temperature"),
    ("[{kind: attention, mode: heads}]", "loss.terms[0].mode: must be auto, maps or relations"),
    ("[{kind: attention, relation_heads: 0}]", "loss.terms[0].relation_heads must be an integer > 0"),
    ("[{kind: ce, temperature: 2}]", "unknown config key: loss.terms[0].temperature"),
    ("[{kind: logits, divergence: kl}]", "loss.terms[0].divergence: must be one of forward_kl"),
    ("[{kind: logits, weight: -1}]", "loss.terms[0].weight must be a number >= 0"),
    ("[{kind: ce}, {kind: ce}]", "loss.terms[1].name: 'ce' is used twice"),
    ("[ce]", "loss.terms[0]: expected a mapping"),
])
def test_bad_terms_fail_at_load_naming_the_key(terms, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*BASE, f"loss.terms={terms}"])


def test_terms_and_shorthand_together_are_refused():
    with pytest.raises(ConfigError, match="set either loss.terms or the shorthand"):
        load_config(None, [*BASE, "loss.alpha=0.5", "loss.terms=[{kind: ce}]"])
