"""Objective terms with parameters under 2 real processes: the projections are partitioned with the
student under ZeRO-3, trained identically to one process, and gathered whole into objective/."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_metrics, reset_accelerate, run_job
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


def test_a_classifier_under_zero3_resumes_at_one_process(labelled, tiny, corpus, tmp_path):
    """sequence_classification with a hidden term: 2 ZeRO-3 ranks, then resumed at 1 (universal
    checkpoint), to the same accuracy that distill eval reproduces."""
    import json
    import shutil

    out = tmp_path / "run"
    sets = ("task.kind=sequence_classification", f"teacher.path={labelled['teacher']}", f"data.train_files=[{labelled['train']}]",
            f"data.validation_files=[{labelled['validation']}]", "data.seq_len=48", "data.max_validation_sequences=60",
            "loss.terms=[{kind: logits, weight: 0.5}, {kind: ce, weight: 0.5}, {kind: hidden}]", "train.save_every=2", "eval.initial=false")
    first = launch(tiny, corpus, out, "--launcher", "deepspeed", "--nproc-per-node", "2", "--ds-config", "zero3", sets=(*sets, "eval.at_end=false"))
    assert first.returncode == 0, first.stderr[-4000:]
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    shutil.rmtree(out / "student")
    second = launch(tiny, corpus, out, "--launcher", "deepspeed", "--nproc-per-node", "1", "--ds-config", "zero3", "--resume",
                    sets=(*sets, "train.micro_batch_size=4"))
    assert second.returncode == 0, second.stderr[-4000:]
    assert "(step 2)" in second.stderr
    student = {r["model"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}["student"]
    assert 0 < student["accuracy"] <= 1 and 0 < student["macro_f1"] <= 1
    from distill_launcher.cli import main

    assert main(["eval", str(out)]) == 0  # from the saved student alone, the same figures
    again = {r["model"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}["student"]
    assert (again["accuracy"], again["macro_f1"]) == pytest.approx((student["accuracy"], student["macro_f1"]), abs=1e-6)
    assert load_file(out / "objective" / "model.safetensors")["terms.2.projections.0.weight"].shape == (64, 32)


def test_a_classifier_with_a_projection_under_ddp(labelled, tiny, corpus, tmp_path):
    """torchrun, 2 CPU ranks: the projection's gradients are all-reduced with the student's (DDP
    would fail on a parameter left out of its forward)."""
    import json

    out = tmp_path / "run"
    sets = ("task.kind=sequence_classification", f"teacher.path={labelled['teacher']}", f"data.train_files=[{labelled['train']}]",
            f"data.validation_files=[{labelled['validation']}]", "data.seq_len=48", "data.max_validation_sequences=60",
            "loss.terms=[{kind: logits}, {kind: ce}, {kind: hidden, distance: cosine}]", "eval.initial=false")
    result = launch(tiny, corpus, out, "--launcher", "torchrun", "--nproc-per-node", "2", sets=sets)
    assert result.returncode == 0, result.stderr[-4000:]
    student = {r["model"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}["student"]
    assert 0 < student["macro_f1"] <= 1 and student["tokens"] == 60
    # The hidden term (through the projection) reached the loss at every step on the ranks that ran it.
    hidden = [m["train/hidden_loss"] for m in read_metrics(out) if "train/loss" in m]
    assert len(hidden) == 4 and all(0 < h < float("inf") for h in hidden)
    assert (out / "objective" / "model.safetensors").is_file()


def test_masked_lm_under_zero2(bert, tiny, corpus, tmp_path):
    """masked_lm with a cosine hidden term on 2 ZeRO-2 ranks: the masks are the data's, whatever the ranks."""
    import json

    out = tmp_path / "run"
    sets = ("task.kind=masked_lm", f"teacher.path={bert['teacher']}", "data.max_validation_sequences=32",
            "loss.terms=[{kind: logits, temperature: 2.0}, {kind: ce, weight: 0.5}, {kind: hidden, distance: cosine}]")
    result = launch(tiny, corpus, out, "--launcher", "deepspeed", "--nproc-per-node", "2", "--ds-config", "zero2", sets=sets)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {r["model"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}
    assert rows["student"]["kl_to_teacher"] < rows["initial_student"]["kl_to_teacher"]
    assert 0 < rows["student"]["accuracy"] < 1


def test_a_teacher_store_trains_two_zero3_ranks_like_one_process(tiny, corpus, tmp_path):
    """The store is read by each batch row's identity, so 2 ranks at micro-batch 2 follow 1 process at 4: its targets and its
    hidden states (reduced to 16 dimensions, into which the student's projection maps, partitioned by ZeRO-3)."""
    from conftest import job_overrides
    from distill.config import load_config
    from distill.cache_teacher import build

    store = build(load_config(None, job_overrides(tiny, corpus, tmp_path / "unused")), k=8, out=tmp_path / "store", shard_rows=32,
                  hidden_layers=[1, 2], hidden_dim=16)
    terms = "loss.terms=[{kind: logits, weight: 0.8}, {kind: ce, weight: 0.2}, {kind: hidden, weight: 1.0}]"
    sets = ("teacher.source=cache", f"teacher.cache={store}", terms, "eval.at_end=false")
    reset_accelerate()
    one, _ = run_job(tiny, corpus, tmp_path / "one", *sets, "train.max_steps=4", "train.micro_batch_size=4")
    two = launch(tiny, corpus, tmp_path / "two", "--launcher", "deepspeed", "--nproc-per-node", "2", "--ds-config", "zero3", sets=sets)
    assert two.returncode == 0, two.stderr[-4000:]
    assert "the teacher model is not loaded for training" in two.stderr
    assert losses(tmp_path / "two") == pytest.approx(losses(one), rel=1e-5)
    assert load_file(tmp_path / "two" / "objective" / "model.safetensors")["terms.2.projections.0.weight"].shape == (16, 32)


def test_a_teacher_of_another_tokenizer_trains_two_zero3_ranks_like_one_process(tiny, corpus, tmp_path):
    """A byte-level student of the tiny BPE teacher: each rank pairs its own rows' tokens, and the group sums over the global
    target count give 2 ZeRO-3 ranks at micro-batch 2 the losses of 1 process at 4, every term."""
    from pathlib import Path

    from distill.tiny import train_tokenizer

    train_tokenizer(Path(corpus["train"]), tmp_path / "bytes", vocab_size=259)
    terms = "loss.terms=[{kind: logits, name: kd, divergence: reverse_kl, weight: 0.5}, {kind: uld, name: uld, weight: 0.5}, {kind: ce, name: ce, weight: 0.5}]"
    sets = (f"student.tokenizer={tmp_path / 'bytes'}", terms, "eval.at_end=false")
    reset_accelerate()
    one, _ = run_job(tiny, corpus, tmp_path / "one", *sets, "train.max_steps=4", "train.micro_batch_size=4")
    two = launch(tiny, corpus, tmp_path / "two", "--launcher", "deepspeed", "--nproc-per-node", "2", "--ds-config", "zero3", sets=sets)
    assert two.returncode == 0, two.stderr[-4000:]
    assert "pairing: the teacher tokenizes differently" in two.stderr
    for term in ("train/loss", "train/kd_loss", "train/uld_loss", "train/ce_loss"):
        mine = [m[term] for m in read_metrics(tmp_path / "two") if term in m]
        theirs = [m[term] for m in read_metrics(one) if term in m]
        assert len(mine) == 4 and mine == pytest.approx(theirs, rel=1e-5), term
