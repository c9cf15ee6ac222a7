"""Sequence-level distillation: `distill generate-teacher` writes the teacher's completions of the data's
prompts as a content-addressed dataset (the same at any process count, continued when interrupted), with
its top-k targets on them in a store, and a job trains on it like any data."""

import json
import os
import re
import sys

import pytest

from conftest import distill_cli, job_overrides, read_metrics, reset_accelerate, run_job

SAMPLING = ("data.packing=false", "rollout.max_new_tokens=16", "rollout.prompt_tokens=8")


def _sets(tiny, corpus, tmp_path, *extra):
    return [a for o in job_overrides(tiny, corpus, tmp_path / "unused", *SAMPLING, *extra) for a in ("--set", o)]


def _config(tmp_path):
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    return str(config)


def test_the_teachers_completions_are_one_dataset_at_any_process_count_and_a_job_trains_on_them(tiny, corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    first = distill_cli("generate-teacher", _config(tmp_path), *_sets(tiny, corpus, tmp_path), "--out", str(one), "--shard-rows", "32", "--top-k", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    env = {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    second = distill_cli("generate-teacher", _config(tmp_path), *_sets(tiny, corpus, tmp_path), "--out", str(two), "--shard-rows", "32",
                         "--nproc-per-node", "2", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest == json.loads((two / "manifest.json").read_text()) and len(manifest["shards"]) > 2  # byte-identical shards, by sha256
    assert manifest["identity"]["sampling"] == {"max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "prompt_tokens": 8, "seed": 0}
    rows = [json.loads(line) for shard in manifest["shards"] for line in (one / shard["file"]).read_text().splitlines()]
    assert all(0 < r["completion_tokens"] <= 16 and r["prompt"] for r in rows) and len({r["text"] for r in rows}) > len(rows) // 2
    # Interrupted: a lost shard is written again, the others are kept.
    (one / "manifest.json").unlink()
    (one / manifest["shards"][1]["file"]).unlink()
    again = distill_cli("generate-teacher", _config(tmp_path), *_sets(tiny, corpus, tmp_path), "--out", str(one), "--shard-rows", "32")
    assert again.returncode == 0 and "1 shard(s) of completions written" in again.stderr
    assert json.loads((one / "manifest.json").read_text()) == manifest
    # A job trains on the completions (prompts masked), from the store of the teacher's targets on them: the store was built
    # for exactly the sequences the job makes of the dataset (else the job stops before step 0, naming the difference).
    from datasets import Dataset

    from distill import data
    from distill.config import DataConfig

    sequences = data.tokenize(Dataset.from_list(rows), tiny["tokenizer"], DataConfig(packing=False, prompt_field="prompt", seq_len=64), "training")
    prompt = len(tiny["tokenizer"](rows[0]["prompt"], add_special_tokens=False)["input_ids"])
    assert sequences[0]["labels"][: 1 + prompt] == [-100] * (1 + prompt) and -100 not in sequences[0]["labels"][1 + prompt :]
    out, _ = run_job(tiny, corpus, tmp_path / "run", *SAMPLING, f"data.train_files=[{one}]", "data.prompt_field=prompt", "teacher.source=cache",
                     f"teacher.cache={one / 'store'}", "eval.at_end=false", "train.max_steps=3")
    assert len(read_metrics(out)) == 3


def test_what_generate_teacher_cannot_do_is_one_line(tiny, corpus, tmp_path):
    result = distill_cli("generate-teacher", _config(tmp_path), *_sets(tiny, corpus, tmp_path, "data.packing=true"), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == \
        "distill: error: generate-teacher completes the prompts of whole documents: set data.packing=false"
    assert not (tmp_path / "x").exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    reset_accelerate()
    from distill.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(f"data.train_files: {plain} is a directory, not a data file nor a complete distill "
                                                    "generate-teacher dataset (no manifest.json)")):
        run_job(tiny, corpus, tmp_path / "run", f"data.train_files=[{plain}]")
