"""The real-model example, shortened: all-MiniLM-L6-v2 from its PyPI package fine-tuned on the
docstring task, then its shipped config distilling a student of every other layer."""

import json

import pytest

from conftest import REPO, distill_cli

pytestmark = pytest.mark.slow


def test_docstring_task_is_real_and_split_the_same_everywhere():
    from distill import minilm

    rows = minilm.docstrings()
    labels = {r["label"] for r in rows}
    assert labels == set(minilm.PACKAGES) and len(rows) > 600
    assert len({r["text"] for r in rows}) == len(rows)  # no text in both splits
    assert [r["text"] for r in rows] == [r["text"] for r in minilm.docstrings()]


def test_minilm_example_runs_end_to_end(tmp_path):
    from distill import minilm

    cache = minilm.prepare(tmp_path / "minilm", steps=30)  # the recipe fine-tunes longer; this checks the path
    sets = [f"teacher.path={cache / 'teacher'}", f"data.train_files=[{cache / 'train.jsonl'}]", f"data.validation_files=[{cache / 'validation.jsonl'}]",
            "train.max_steps=12", "train.warmup_steps=2", "data.max_validation_sequences=64", "eval.speed_repeats=1", f"output_dir={tmp_path / 'run'}"]
    result = distill_cli("run", str(REPO / "configs" / "minilm_docstrings.yaml"), *[a for s in sets for a in ("--set", s)], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["model"]: r for r in json.loads((tmp_path / "run" / "eval.json").read_text())["rows"]}
    assert rows["teacher"]["params"] > 22_000_000 and rows["student"]["params"] < rows["teacher"]["params"]
    assert rows["teacher"]["accuracy"] > 1 / 6  # fine-tuned a little: above chance over 6 packages
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "run" / "student").num_hidden_layers == 3


def test_few_label_split_and_masked_lm_feed_the_augmentation(tmp_path):
    """prepare-minilm's few-label split (10% of the training rows labelled, the same every time) and the masked LM
    fitted on MiniLM (briefly here) that data.augment's word_replace predicts words with."""
    from distill import minilm, models
    from distill.augment import WordReplace, parse_augment

    minilm.write_task(tmp_path)
    labelled, text = minilm.few_label_split(tmp_path / "few_labels", keep=0.1, seed=0)
    rows = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    kept, rest = ([json.loads(line) for line in open(f)] for f in (labelled, text))
    assert len(kept) == round(0.1 * len(rows)) and len(kept) + len(rest) == len(rows)
    assert all("label" in r for r in kept) and all(set(r) == {"text"} for r in rest)
    assert {r["text"] for r in kept} | {r["text"] for r in rest} == {r["text"] for r in rows}
    again, _ = minilm.few_label_split(tmp_path / "again", keep=0.1, seed=0, train=tmp_path / "train.jsonl")
    assert again.read_text() == labelled.read_text()

    mlm = minilm.masked_lm(tmp_path, steps=3)
    spec = parse_augment({"kind": "word_replace", "copies": 2, "rate": 0.5, "model": str(mlm)}, "data.augment")
    augment = WordReplace(spec, "text", model=models.load_masked_lm(str(mlm), "data.augment.model", "cpu"),
                          tokenizer=models.load_tokenizer(str(mlm), "data.augment.model"))
    texts = [r["text"] for r in rest[:3]]
    copies = augment.rewrite(texts)
    assert all(len(c) == 2 for c in copies) and sum(c != t for t, cs in zip(texts, copies) for c in cs) >= 4
