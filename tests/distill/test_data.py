"""Data: every supported source, prompt masking, packing."""

import json

import pytest

from distill import data
from distill.config import load_config
from distill.losses import IGNORE_INDEX
from distill.models import load_tokenizer


def paragraphs(corpus) -> list[str]:
    return [p for p in open(corpus["train"]).read().split("\n\n") if p.strip()]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "save_to_disk"])
def test_every_source_gives_sequences(tiny, corpus, tmp_path, fmt):
    import datasets

    ds = datasets.Dataset.from_list([{"text": p} for p in paragraphs(corpus)])
    if fmt == "save_to_disk":
        ds.save_to_disk(str(tmp_path / "saved"))
        source = [f"data.dataset={tmp_path / 'saved'}", "data.train_files=[]"]
    else:
        path = tmp_path / f"train.{fmt}"
        {"jsonl": lambda: ds.to_json(path), "json": lambda: path.write_text(json.dumps([{"text": p} for p in paragraphs(corpus)])),
         "parquet": lambda: ds.to_parquet(path), "csv": lambda: ds.to_csv(path)}[fmt]()
        source = [f"data.train_files=[{path}]"]
    cfg = load_config(None, ["teacher.path=t", "student.architecture={num_hidden_layers: 1}", "data.seq_len=64", "data.validation_split=0.1", *source])
    train, validation = data.load_raw(cfg.data)
    assert len(train) > 0 and len(validation) > 0
    tokenizer = load_tokenizer(tiny["teacher"], "teacher.path")
    sequences = data.tokenize(train, tokenizer, cfg.data, "training")
    assert len(sequences) > 5 and all(len(s["input_ids"]) == 64 for s in sequences)


def test_prompt_tokens_are_masked_and_padding_too(tiny, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "def add(a, b):", "completion": " return a + b"}, {"prompt": "x = ", "completion": "[1, 2, 3] + [4]"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["teacher.path=t", "student.architecture={num_hidden_layers: 1}", f"data.train_files=[{path}]",
                             "data.prompt_field=prompt", "data.text_field=completion", "data.packing=false", "data.seq_len=64",
                             f"data.validation_files=[{path}]"])
    tokenizer = load_tokenizer(tiny["teacher"], "teacher.path")
    train, _ = data.load_raw(cfg.data)
    sequences = data.tokenize(train, tokenizer, cfg.data, "training")
    batch = data.collate([sequences[0], sequences[1]], tokenizer.pad_token_id)
    for i, row in enumerate(rows):
        n_prompt = 1 + len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])  # BOS + prompt
        n_completion = len(tokenizer(row["completion"], add_special_tokens=False)["input_ids"]) + 1  # + EOS
        labels, ids, mask = batch["labels"][i], batch["input_ids"][i], batch["attention_mask"][i]
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert (labels[n_prompt:n_prompt + n_completion] == ids[n_prompt:n_prompt + n_completion]).all()
        assert (labels[n_prompt + n_completion:] == IGNORE_INDEX).all() and (mask[n_prompt + n_completion:] == 0).all()
