"""Objective terms with parameters under 2 real processes: the projections are partitioned with the
student under ZeRO-3, trained identically to one process, and gathered whole into objective/."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import reset_accelerate, run_job
from test_launchers import STEPS, launch, losses

pytestmark = pytest.mark.slow
HIDDEN_TERMS = "loss.terms=[{kind: logits, weight: 1.0}, {kind: ce, weight: 0.1}, {kind: hidden, weight: 1.0, embeddings: true}]"


def test_hidden_term_under_zero3_matches_one_process(tiny, corpus, tmp_path):
    reference = tmp_path / "reference"
    run_job(tiny, corpus, reference, HIDDEN_TERMS, f"train.max_steps={STEPS}", "train.micro_batch_size=4", "eval.at_end=false")
    reset_accelerate()
    out = tmp_path / "zero3"
    result = launch(tiny, corpus, out, "--launcher", "deepspeed", "--nproc-per-node", "2", "--ds-config", "zero3",
                    sets=(HIDDEN_TERMS, "eval.at_end=false"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)
    expected, got = load_file(reference / "objective" / "model.safetensors"), load_file(out / "objective" / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key].shape == expected[key].shape == (64, 32)  # gathered whole, not a ZeRO-3 shard
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    assert not any("projection" in k for k in load_file(out / "student" / "model.safetensors"))
