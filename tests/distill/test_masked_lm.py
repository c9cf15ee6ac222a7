"""task.kind=masked_lm: a BERT teacher distilled into a smaller BERT at masked positions (DistilBERT's
objective), with masking that is a fixed function of (seed, split, row)."""

import re

import pytest
import torch

from conftest import reset_accelerate
from distill import data
from distill.config import ConfigError, DataConfig


def mlm_job(bert, corpus, out, *extra):
    from distill.config import load_config

    return load_config(None, [
        "task.kind=masked_lm", f"teacher.path={bert['teacher']}", "teacher.dtype=float32",
        "student.architecture={num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64, num_attention_heads: 2}",
        f"data.train_files=[{corpus['train']}]", f"data.validation_files=[{corpus['validation']}]", "data.seq_len=64",
        "data.max_validation_sequences=48", "train.micro_batch_size=8", "train.max_steps=30", "train.lr=3e-3", "train.log_every=5",
        "eval.speed_repeats=1", "eval.throughput_batch_size=2", "tracking.backend=none", f"output_dir={out}", *extra])


def test_masking_is_a_function_of_seed_split_and_row(bert):
    from datasets import Dataset

    texts = Dataset.from_dict({"text": ["def f(x): return x + 1", "class A: pass", "import os, sys"] * 20})
    cfg = DataConfig(seq_len=32)
    first = data.tokenize_masked(texts, bert["tokenizer"], cfg, "training", rate=0.3, seed=7)
    again = data.tokenize_masked(texts, bert["tokenizer"], cfg, "training", rate=0.3, seed=7)
    assert first[:] == again[:]
    other_seed = data.tokenize_masked(texts, bert["tokenizer"], cfg, "training", rate=0.3, seed=8)
    assert other_seed["input_ids"] != first["input_ids"]
    tokenizer, special = bert["tokenizer"], set(bert["tokenizer"].all_special_ids)
    masked = kept = replaced = 0
    for ids, labels in zip(first["input_ids"], first["labels"]):
        assert any(t != -100 for t in labels)  # at least one target per sequence
        for token, label in zip(ids, labels):
            if label == -100:
                continue
            assert label not in special
            masked += token == tokenizer.mask_token_id
            kept += token == label
            replaced += token not in (label, tokenizer.mask_token_id)
    total = masked + kept + replaced
    assert masked / total > 0.6 and kept > 0 and replaced > 0


def test_masked_rows_do_not_depend_on_the_world_size(bert, corpus, tmp_path):
    """The stream at 2 ranks sees, between them, exactly the sequences (and masks) of 1 rank."""
    from datasets import Dataset

    texts = Dataset.from_dict({"text": [p for p in open(corpus["train"]).read().split("\n\n") if p.strip()][:40]})
    sequences = data.tokenize_masked(texts, bert["tokenizer"], DataConfig(seq_len=32), "training", rate=0.15, seed=0)
    one = data.TrainStream(sequences, micro_batch_size=4, seed=0, pad_id=0)
    two = [data.TrainStream(sequences, micro_batch_size=2, seed=0, pad_id=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        whole = one.next_batch()
        halves = [s.next_batch() for s in two]
        width = whole["input_ids"].shape[1]
        joined = torch.cat([torch.nn.functional.pad(h["labels"], (0, width - h["labels"].shape[1]), value=-100) for h in halves])
        assert torch.equal(joined, whole["labels"])


def test_student_learns_the_masked_distribution_and_eval_reproduces_the_report(bert, corpus, tmp_path):
    from transformers import AutoModelForMaskedLM

    from distill.job import run

    terms = "loss.terms=[{kind: logits, weight: 1.0, temperature: 2.0}, {kind: ce, weight: 0.5}, {kind: hidden, distance: cosine, weight: 1.0}]"
    result = run(mlm_job(bert, corpus, tmp_path / "run", terms))
    rows = {r["model"]: r for r in result["rows"]}
    teacher, initial, student = rows["teacher"], rows["initial_student"], rows["student"]
    assert student["kl_to_teacher"] < 0.6 * initial["kl_to_teacher"]
    assert student["accuracy"] > initial["accuracy"] and student["perplexity"] < initial["perplexity"]
    assert teacher["accuracy"] > student["accuracy"] > 0
    assert "masked tokens" in (tmp_path / "run" / "report.md").read_text()
    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "student").config.hidden_size == 32
    reset_accelerate()
    from distill.finished_run import evaluate_run

    again = {r["model"]: r for r in evaluate_run(tmp_path / "run")["rows"]}
    for key in ("accuracy", "perplexity", "kl_to_teacher", "top1_agreement"):
        assert again["student"][key] == pytest.approx(student[key], rel=1e-5), key


def test_a_teacher_of_another_kind_is_named(tiny, corpus, tmp_path):
    from distill.job import run

    cfg = mlm_job({"teacher": tiny["teacher"]}, corpus, tmp_path / "run")
    with pytest.raises(ConfigError, match=re.escape("task.kind=masked_lm needs a model that AutoModelForMaskedLM can load; teacher.path is a llama model")):
        run(cfg)


def test_a_tokenizer_without_a_mask_token_is_named(tiny):
    from datasets import Dataset

    with pytest.raises(ConfigError, match=re.escape("task.kind=masked_lm needs a tokenizer with a mask token")):
        data.tokenize_masked(Dataset.from_dict({"text": ["x"]}), tiny["tokenizer"], DataConfig(), "training", rate=0.15, seed=0)
