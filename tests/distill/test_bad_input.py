"""Each bad input ends with one line naming the problem and the option, a non-zero exit, and no damage."""

import shutil
import tempfile
from pathlib import Path

import torch

from conftest import distill_cli, job_overrides, reset_accelerate
from distill import checkpoint
from distill_launcher.cli import main


EMPTY_CONFIG = Path(tempfile.mkdtemp()) / "empty.yaml"
EMPTY_CONFIG.write_text("{}\n")


def cli_run(tiny, corpus, out, *extra) -> list[str]:
    """argv of `distill run` with every option given by --set."""
    sets = [a for o in job_overrides(tiny, corpus, out, *extra) for a in ("--set", o)]
    return ["run", str(EMPTY_CONFIG), *sets]


def expect_error(capsys, argv, *fragments, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    last = err[-1]
    assert last.startswith("distill: error: "), last
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


def test_missing_data_file(tiny, corpus, tmp_path, capsys):
    expect_error(capsys, cli_run(tiny, corpus, tmp_path / "r", f"data.train_files=[{tmp_path}/nope.txt]"),
                 "data.train_files", "file not found")


def test_missing_teacher(tiny, corpus, tmp_path, capsys):
    expect_error(capsys, cli_run(tiny, corpus, tmp_path / "r", f"teacher.path={tmp_path}/no-teacher"), "teacher.path", "not found")


def test_empty_dataset(tiny, corpus, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    expect_error(capsys, cli_run(tiny, corpus, tmp_path / "r", f"data.train_files=[{empty}]"), "data.train_files", "empty")


def test_data_too_short_for_one_sequence(tiny, corpus, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    expect_error(capsys, cli_run(tiny, corpus, tmp_path / "r", f"data.train_files=[{short}]"), "data.seq_len")


def test_sequence_length_above_model_maximum(tiny, corpus, tmp_path, capsys):
    expect_error(capsys, cli_run(tiny, corpus, tmp_path / "r", "data.seq_len=1024"), "data.seq_len=1024", "256")


def test_unknown_text_field(tiny, corpus, tmp_path, capsys):
    expect_error(capsys, cli_run(tiny, corpus, tmp_path / "r", f"data.train_files=[{corpus['jsonl']}]", "data.text_field=body",
                                 "data.validation_files=[]"), "data.text_field", "'body'")


def test_a_student_of_another_tokenizer_cannot_keep_the_teachers_layers(tiny, corpus, tmp_path, capsys):
    from distill.tiny import train_tokenizer

    other_corpus = tmp_path / "other.txt"
    other_corpus.write_text("completely different text, other merges entirely; " * 200 + "zzzz qqqq " * 100)
    train_tokenizer(other_corpus, tmp_path / "tok", vocab_size=300)
    expect_error(capsys, cli_run(tiny, corpus, tmp_path / "r", f"student.tokenizer={tmp_path / 'tok'}", "student.init=teacher_layers",
                                 "student.architecture={num_hidden_layers: 1}"),
                 "tokenizers differ at id", "student.init=teacher_layers keeps the teacher's embeddings", "use student.init=random")


def test_unknown_architecture_field(tiny, corpus, tmp_path, capsys):
    expect_error(capsys, cli_run(tiny, corpus, tmp_path / "r", "student.architecture={num_layerz: 2}"), "student.architecture.num_layerz")


def test_malformed_yaml_and_unknown_key_through_the_real_command(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  path: [x\n")
    result = distill_cli("run", str(bad))
    assert result.returncode == 2 and "malformed YAML" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    bad.write_text("teacher:\n  path: x\n  colour: red\n")
    result = distill_cli("run", str(bad))
    assert result.returncode == 2 and result.stderr.strip() == "distill: error: unknown config key: teacher.colour"


def test_nonfinite_loss_stops_with_step_and_keeps_checkpoints(tiny, corpus, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(cli_run(tiny, corpus, out, "train.max_steps=2", "train.save_every=2", "eval.at_end=false")) == 0
    saved = checkpoint.latest(out / "checkpoints")
    snapshot = {p.name: p.read_bytes() for p in saved.iterdir()}
    reset_accelerate()
    # A teacher whose output layer holds NaN poisons the KD loss from the first step after resume.
    poisoned = tmp_path / "nan-teacher"
    shutil.copytree(tiny["teacher"], poisoned)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(poisoned)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    model.save_pretrained(poisoned)
    argv = cli_run(tiny, corpus, out, "train.max_steps=4", "train.save_every=1", "eval.at_end=false", f"teacher.path={poisoned}") + ["--resume"]
    expect_error(capsys, argv, "non-finite loss at step 3", "train.on_nonfinite", code=3)
    assert checkpoint.latest(out / "checkpoints") == saved
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == snapshot

    reset_accelerate()
    # With train.on_nonfinite=skip the run finishes and the steps are marked skipped.
    argv = cli_run(tiny, corpus, tmp_path / "skip", "train.max_steps=3", "eval.at_end=false", "train.on_nonfinite=skip", f"teacher.path={poisoned}")
    assert main(argv) == 0
    from conftest import read_metrics

    assert all(m["train/skipped"] for m in read_metrics(tmp_path / "skip"))


def test_garbage_parquet(tiny, corpus, tmp_path, capsys):
    garbage = tmp_path / "data.parquet"
    garbage.write_bytes(bytes(range(256)) * 8)
    expect_error(capsys, cli_run(tiny, corpus, tmp_path / "r", f"data.train_files=[{garbage}]", "data.validation_files=[]"),
                 "data.train_files", "cannot read", "as parquet")


def test_csv_text_column_holding_numbers(tiny, corpus, tmp_path, capsys):
    numbers = tmp_path / "numbers.csv"
    numbers.write_text("text\n" + "".join(f"{i * 7}\n" for i in range(100)))
    expect_error(capsys, cli_run(tiny, corpus, tmp_path / "r", f"data.train_files=[{numbers}]", "data.validation_files=[]"),
                 "data.text_field", "holds int64, not text")


def test_hub_dataset_offline(tiny, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network, whatever this one has
    expect_error(capsys, cli_run(tiny, corpus, tmp_path / "r", "data.train_files=[]", "data.validation_files=[]",
                                 "data.dataset=some-org/some-dataset"), "data.dataset 'some-org/some-dataset': cannot load it")


def test_missing_tiny_teacher_says_to_prepare_it(tiny, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expect_error(capsys, cli_run(tiny, corpus, tmp_path / "r", "teacher.path=~/.cache/distill/tiny/teacher"),
                 "teacher.path", "distill prepare-tiny")


def test_prune_heads_that_do_not_divide_the_hidden_size(tiny, tmp_path, capsys):
    assert main(["prune", tiny["teacher"], str(tmp_path / "pruned"), "--calibration", str(EMPTY_CONFIG), "--heads", "3"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("distill: error: prune num_attention_heads=3: hidden_size 64 is not a multiple of it") and "1, 2, 4" in line


def test_eval_of_a_run_whose_student_weights_are_truncated(tiny, corpus, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(cli_run(tiny, corpus, out, "train.max_steps=2", "eval.at_end=false")) == 0
    weights = out / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    reset_accelerate()
    expect_error(capsys, ["eval", str(out)], "student.path", "truncated or corrupt")
