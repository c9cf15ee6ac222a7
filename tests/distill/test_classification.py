"""task.kind=sequence_classification: a fine-tuned classifier teacher distilled into a smaller
classifier, end to end on tiny models saved and loaded back, with the errors that name the key."""

import json
import re

import pytest
import torch

from conftest import LABELS, classifier_job, few_labels, read_metrics, reset_accelerate
from distill import data
from distill.config import ConfigError, DataConfig

def _run(labelled, out, *extra):
    from distill.config import load_config
    from distill.job import run

    return run(load_config(None, classifier_job(labelled, out, *extra)))


def test_classifier_student_learns_from_the_teacher_and_eval_reproduces_the_report(labelled, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    terms = "loss.terms=[{kind: logits, weight: 0.5, temperature: 2.0}, {kind: ce, weight: 0.5}, {kind: hidden, weight: 1.0}]"
    result = _run(labelled, tmp_path / "run", terms)
    rows = {r["model"]: r for r in result["rows"]}
    teacher, initial, student = rows["teacher"], rows["initial_student"], rows["student"]
    assert teacher["accuracy"] > 0.5  # the fine-tuned teacher is far above chance (1/3)
    assert student["accuracy"] > initial["accuracy"] + 0.1
    assert student["kl_to_teacher"] < 0.75 * initial["kl_to_teacher"]
    assert student["top1_agreement"] > initial["top1_agreement"]
    assert 0 < student["macro_f1"] <= 1 and "perplexity" not in student
    assert student["latency_ms_per_sequence"] > 0 and "latency_ms_per_token" not in student
    report = (tmp_path / "run" / "report.md").read_text()
    assert "labelled sequences" in report and "macro-F1" in report and "ppl" not in report
    metrics = read_metrics(tmp_path / "run")
    hidden = [m["train/hidden_loss"] for m in metrics if "train/loss" in m]
    assert hidden[-1] < hidden[0]
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "student")
    assert saved.config.id2label == {0: "json", 1: "email", 2: "asyncio"} and saved.config.num_hidden_layers == 1
    assert (tmp_path / "run" / "objective" / "model.safetensors").is_file()  # the 32 -> 64 projection

    reset_accelerate()
    from distill.finished_run import evaluate_run

    again = {r["model"]: r for r in evaluate_run(tmp_path / "run")["rows"]}
    for key in ("accuracy", "macro_f1", "kl_to_teacher", "top1_agreement"):
        assert again["student"][key] == pytest.approx(student[key], abs=1e-6), key


def test_integer_labels_and_attention_relations(labelled, tmp_path):
    ids = tmp_path / "ids.jsonl"
    ids.write_text("".join(json.dumps({"text": r["text"], "label": LABELS.index(r["label"])}) + "\n"
                           for r in map(json.loads, open(labelled["train"]))))
    result = _run(labelled, tmp_path / "run", f"data.train_files=[{ids}]", "train.max_steps=6", "eval.initial=false", "eval.speed=false",
                  "loss.terms=[{kind: logits}, {kind: attention, name: att}]", "eval.quantize=[int8_dynamic]")
    rows = {r["model"]: r for r in result["rows"]}
    # Integer labels are the same classes as the names they index: the training targets are identical.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(labelled["teacher"])
    label_ids = {}
    for name, path in (("ids", ids), ("names", labelled["train"])):
        raw = data.load_raw(DataConfig(train_files=[str(path)], validation_files=[str(path)]))[0]
        label_ids[name] = [r["label"] for r in data.tokenize_labelled(raw, tokenizer, DataConfig(seq_len=48), "training", dict(zip(LABELS, range(3))))]
    assert label_ids["ids"] == label_ids["names"] and set(label_ids["ids"]) == {0, 1, 2}
    student = rows["student"]
    assert 0 <= student["accuracy"] <= 1 and student["accuracy"] * student["tokens"] == pytest.approx(round(student["accuracy"] * student["tokens"]))
    assert rows["student+int8_dynamic"]["accuracy"] == pytest.approx(rows["student"]["accuracy"], abs=0.05)
    assert all(m["train/att_loss"] > 0 for m in read_metrics(tmp_path / "run") if "train/loss" in m)


def test_a_student_with_other_labels_fails_before_training_naming_both(labelled, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(labelled["teacher"])
    config.id2label, config.label2id = {0: "json", 1: "email"}, {"json": 0, "email": 1}
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "student")
    AutoTokenizer.from_pretrained(labelled["teacher"]).save_pretrained(tmp_path / "student")
    with pytest.raises(ConfigError, match=re.escape("the student's labels ['json', 'email'] differ from the teacher's ['json', 'email', 'asyncio']")):
        _run(labelled, tmp_path / "run", f"student.path={tmp_path / 'student'}", "student.architecture={}")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("extra, message", [
    ("data.label_field=class", "data.label_field: column 'class' not in the training data (columns: text, label)"),
    ("data.text_pair_field=second", "data.text_pair_field: column 'second' not in the training data"),
])
def test_missing_columns_name_the_key(labelled, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _run(labelled, tmp_path / "run", extra)


def test_an_unknown_label_names_it(labelled, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "import os", "label": "xml"}) + "\n" + open(labelled["train"]).read())
    with pytest.raises(ConfigError, match=re.escape("data.label_field: label 'xml' in the training data is neither a class id 0..2 nor one of the teacher's labels (json, email, asyncio)")):
        _run(labelled, tmp_path / "run", f"data.train_files=[{bad}]")


def test_lora_on_a_pretrained_classifier_student(labelled, tmp_path):
    """peft's task type follows the task (SEQ_CLS): the classifier head trains in full beside the
    adapters, and distill eval loads the adapter onto its base as a classifier."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(labelled["teacher"])
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 1, 32, 64
    config.num_attention_heads = config.num_key_value_heads = 2
    torch.manual_seed(3)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(labelled["teacher"]).save_pretrained(tmp_path / "base")
    result = _run(labelled, tmp_path / "run", f"student.path={tmp_path / 'base'}", "student.architecture={}",
                  "student.lora={r: 4, target_modules: [q_proj, v_proj]}", "train.lr=1e-2", "eval.speed=false")
    adapter = json.loads((tmp_path / "run" / "student" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["student"]["kl_to_teacher"] < rows["initial_student"]["kl_to_teacher"]
    reset_accelerate()
    from distill.finished_run import evaluate_run

    again = {r["model"]: r for r in evaluate_run(tmp_path / "run")["rows"]}
    assert again["student"]["accuracy"] == pytest.approx(rows["student"]["accuracy"], abs=1e-6)


def test_text_pairs(labelled, tmp_path):
    """data.text_pair_field: both texts reach the model, through the tokenizer's pair encoding."""
    from transformers import AutoTokenizer

    from distill import data
    from distill.config import DataConfig

    pairs = tmp_path / "pairs.jsonl"
    rows = [json.loads(line) for line in open(labelled["train"])]
    pairs.write_text("".join(json.dumps({"first": r["text"], "second": rows[(i + 1) % len(rows)]["text"], "label": r["label"]}) + "\n"
                             for i, r in enumerate(rows)))
    result = _run(labelled, tmp_path / "run", f"data.train_files=[{pairs}]", "data.text_field=first", "data.text_pair_field=second",
                  f"data.validation_files=[{pairs}]", "data.max_validation_sequences=32", "train.max_steps=4", "eval.speed=false")
    teacher = result["rows"][0]
    # Every validation pair was scored, and the first text of each still carries its label: well above chance (1/3).
    assert teacher["model"] == "teacher" and teacher["tokens"] == 32 and teacher["accuracy"] > 0.5
    tokenizer = AutoTokenizer.from_pretrained(labelled["teacher"])
    raw = data.load_raw(DataConfig(train_files=[str(pairs)], validation_files=[str(pairs)], text_field="first"))[0]
    one = data.tokenize_labelled(raw.select([0]), tokenizer, DataConfig(text_field="first", text_pair_field="second", seq_len=512), "training",
                                 dict(zip(LABELS, range(3))))
    assert one[0]["input_ids"] == tokenizer(rows[0]["text"], rows[1]["text"], truncation=True, max_length=512)["input_ids"]


def test_a_classifier_store_holds_every_class_and_trains_unlabelled_rows_as_the_teacher_does(labelled, tmp_path, capsys):
    """A store of a classifier holds the teacher's distribution over its classes for every row, labelled
    or not; a student trained from it follows the in-process teacher's curve. A pool still refuses it."""
    from distill.cache_teacher import build
    from distill.config import load_config
    from distill.serve import BuiltinEngine
    from distill.store import Store

    mixture = few_labels(labelled, tmp_path)
    common = [*mixture, "loss.kind=forward_kl", "loss.alpha=0.5", "loss.temperature=2.0", "train.max_steps=6", "train.log_every=1", "eval.at_end=false"]
    cfg = load_config(None, classifier_job(labelled, tmp_path / "run", *common))
    with pytest.raises(ConfigError, match=re.escape("--top-k 4 must be between 1 and the number of classes (3)")):
        build(cfg, k=4, out=tmp_path / "bad")
    store = build(cfg, out=tmp_path / "store", log=lambda line: None)
    opened = Store(store)
    assert (opened.k, opened.vocab) == (3, 3)
    targets = opened.rows("training", "text", [0, 1, 2])  # the unlabelled source has targets too: one per row
    assert targets.ids.shape == (3, 3) and torch.allclose(targets.logprobs.float().exp().sum(-1), torch.ones(3), atol=1e-2)

    reset_accelerate()
    _run(labelled, tmp_path / "model", *common)
    reset_accelerate()
    _run(labelled, tmp_path / "cached", *common, "teacher.source=cache", f"teacher.cache={store}")
    assert f"teacher: store {store} (top-3 of 3 ids, fp16)" in capsys.readouterr().err
    model, cached = ([m for m in read_metrics(tmp_path / name) if "train/loss" in m] for name in ("model", "cached"))
    assert len(model) == len(cached) == 6
    for a, b in zip(model, cached):  # float16 log-probabilities: the same curve to about 1e-3
        assert b["train/kd_loss"] == pytest.approx(a["train/kd_loss"], rel=5e-3)
        assert b["train/unlabelled_rows"] == a["train/unlabelled_rows"]
    with pytest.raises(ConfigError, match="task.kind=sequence_classification: the teacher service serves token targets"):
        BuiltinEngine(cfg, 4, torch.device("cpu"))
    with pytest.raises(ConfigError, match="teacher.source=remote serves token targets of language models; task.kind=sequence_classification needs"):
        load_config(None, classifier_job(labelled, tmp_path / "run", "teacher.source=remote", "teacher.url=http://127.0.0.1:1"))


def test_unlabelled_rows_train_the_teachers_terms_and_are_counted(labelled, tmp_path, capsys):
    """The teacher's terms train on every row, ce on the labelled ones; the run says how many of each it had and saw."""
    mixture = few_labels(labelled, tmp_path)
    result = _run(labelled, tmp_path / "run", *mixture, "loss.kind=forward_kl", "loss.alpha=0.5", "loss.temperature=2.0", "train.max_steps=20")
    err = capsys.readouterr().err
    assert "data: 119 labelled and 481 unlabelled training rows; the unlabelled ones train the teacher's terms only" in err
    assert result["train_rows_labelled"] + result["train_rows_unlabelled"] == 20 * 16  # every row the 20 steps drew, counted once
    assert result["train_rows_unlabelled"] > result["train_rows_labelled"] > 0
    metrics = [m for m in read_metrics(tmp_path / "run") if "train/loss" in m]
    assert sum(m["train/unlabelled_rows"] for m in metrics) == result["train_rows_unlabelled"]
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["student"]["accuracy"] > rows["initial_student"]["accuracy"]
    # Only the labelled source is validated (accuracy needs labels); the weighted total is then its own figures.
    by_source = {(r["source"], r["model"]): r for r in result["sources"]}
    assert {source for source, _ in by_source} == {"labelled", "weighted total"}
    assert by_source[("weighted total", "student")]["accuracy"] == pytest.approx(by_source[("labelled", "student")]["accuracy"])


def test_an_objective_of_labels_alone_refuses_unlabelled_rows(labelled, tmp_path):
    with pytest.raises(ConfigError, match=re.escape("481 of 600 training rows have no label (labelled: 1 of 120, text: 480 of 480), and the "
                                                    "objective uses hard labels only")):
        _run(labelled, tmp_path / "run", *few_labels(labelled, tmp_path), "loss.alpha=1.0")


def test_cross_entropy_gives_an_unlabelled_target_nothing():
    from distill.losses import UNLABELED, cross_entropy

    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, UNLABELED, 2, UNLABELED])
    loss = cross_entropy(logits, None, labels)
    assert loss[1] == 0 and loss[3] == 0 and loss[0] > 0 and loss[2] > 0
    loss.sum().backward()
    assert torch.all(logits.grad[[1, 3]] == 0) and torch.any(logits.grad[[0, 2]] != 0)


def test_unlabelled_validation_rows_are_left_out_and_an_unlabelled_source_is_not_validated(labelled, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(labelled["teacher"])
    raw = data.load_raw(DataConfig(train_files=[labelled["train"]]))[0].select(range(10))
    raw = raw.map(lambda row, i: {"label": None if i % 2 else row["label"]}, with_indices=True)
    label2id = {n: i for i, n in enumerate(LABELS)}
    training = data.tokenize_labelled(raw, tokenizer, DataConfig(), "training", label2id)
    assert [row["label"] for row in training].count(-1) == 5
    assert len(data.tokenize_labelled(raw, tokenizer, DataConfig(), "validation", label2id, keep_unlabelled=False)) == 5
    assert len(data.tokenize_labelled(raw, tokenizer, DataConfig(label_field=""), "validation", label2id, keep_unlabelled=False)) == 0
