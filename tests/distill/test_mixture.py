"""data.mixture: named sources sampled by weight, a stream that is a function of (seed, samples
consumed), and validation reported per source."""

import json
import re

import pytest
import torch

from conftest import run_job
from distill import data
from distill.config import ConfigError, load_config


def _sources():
    a = [{"input_ids": [1, 100 + i], "labels": [1, 100 + i]} for i in range(50)]
    b = [{"input_ids": [2, 300 + i], "labels": [2, 300 + i]} for i in range(7)]
    return a, b


def _firsts(stream, batches):
    return [stream.next_batch()["input_ids"][:, 0].tolist() for _ in range(batches)]


def test_sampling_follows_the_weights():
    stream = data.MixtureStream(list(_sources()), [0.8, 0.2], micro_batch_size=50, seed=0, pad_id=0)
    drawn = torch.tensor(_firsts(stream, 200)).flatten()  # 10,000 samples, over two blocks
    assert (drawn == 2).float().mean().item() == pytest.approx(0.2, abs=0.015)


def test_the_stream_is_a_function_of_seed_and_position():
    """Resumed at any position, and split over 2 ranks, it gives the same samples."""
    make = lambda **kw: data.MixtureStream(list(_sources()), [0.6, 0.4], seed=3, pad_id=0, **kw)
    whole = make(micro_batch_size=4)
    reference = [whole.next_batch()["input_ids"].tolist() for _ in range(2000)]  # 8,000 samples: past one block
    resumed = make(micro_batch_size=4, samples_consumed=4 * 1500)
    assert [resumed.next_batch()["input_ids"].tolist() for _ in range(500)] == reference[1500:]
    ranks = [make(micro_batch_size=2, rank=r, world_size=2) for r in range(2)]
    for step in range(50):
        assert ranks[0].next_batch()["input_ids"].tolist() + ranks[1].next_batch()["input_ids"].tolist() == reference[step]
    # Every sample of the small source comes round before any repeats (a permutation per epoch).
    small = [row for batch in reference[:200] for row in batch if row[0] == 2]
    assert sorted(r[1] for r in small[:7]) == list(range(300, 307))


@pytest.mark.parametrize("mixture, message", [
    ("[{name: a, weight: 1, train_files: [x.txt], colour: red}]", "unknown config key: data.mixture[0].colour"),
    ("[{name: a, weight: 0, train_files: [x.txt]}]", "data.mixture[0].weight must be a number > 0"),
    ("[{name: a, train_files: [x.txt]}, {name: a, train_files: [y.txt]}]", "data.mixture[1].name: 'a' is used twice"),
    ("[{name: a}]", "data.mixture[0]: set exactly one of train_files and dataset"),
])
def test_bad_sources_fail_at_load(mixture, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["teacher.path=t", "student.architecture={num_hidden_layers: 1}", f"data.mixture={mixture}"])


def test_a_mixture_trains_and_reports_each_source(tiny, corpus, tmp_path):
    lines = tmp_path / "docs.jsonl"
    lines.write_text("".join(json.dumps({"body": p}) + "\n" for p in open(corpus["validation"]).read().split("\n\n") if p.strip()))
    mixture = (f"data.mixture=[{{name: code, weight: 3, train_files: [{corpus['train']}], validation_files: [{corpus['validation']}]}}, "
               f"{{name: docs, weight: 1, train_files: [{lines}], text_field: body, validation_split: 0.2}}]")
    run_dir, result = run_job(tiny, corpus, tmp_path / "run", mixture, "data.train_files=[]", "data.validation_files=[]", "eval.speed=false",
                              "train.max_steps=4")
    rows = {(r["source"], r["model"]): r for r in result["sources"]}
    assert set(rows) == {(s, m) for s in ("code", "docs", "weighted total") for m in ("teacher", "student")}
    for model in ("teacher", "student"):
        total = rows[("weighted total", model)]
        expected = (3 * rows[("code", model)]["perplexity"] + rows[("docs", model)]["perplexity"]) / 4
        assert total["perplexity"] == pytest.approx(expected)
    assert rows[("code", "student")]["kl_to_teacher"] > 0
    assert "Per source of the mixture" in (run_dir / "report.md").read_text()
