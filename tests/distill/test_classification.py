"""task.kind=sequence_classification: a fine-tuned classifier teacher distilled into a smaller
classifier, end to end on tiny models saved and loaded back, with the errors that name the key."""

import json
import re

import pytest
import torch

from conftest import LABELS, read_metrics, reset_accelerate
from distill import data
from distill.config import ConfigError, DataConfig

def classifier_job(labelled, out, *extra):
    return ["task.kind=sequence_classification", f"teacher.path={labelled['teacher']}", "teacher.dtype=float32",
            "student.architecture={num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64, num_attention_heads: 2}",
            f"data.train_files=[{labelled['train']}]", f"data.validation_files=[{labelled['validation']}]",
            "data.seq_len=48", "data.max_validation_sequences=120", "train.micro_batch_size=16", "train.max_steps=40", "train.lr=3e-3",
            "train.log_every=5", "eval.speed_repeats=1", "eval.throughput_batch_size=4", "tracking.backend=none", f"output_dir={out}", *extra]


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


def test_a_classifier_has_no_token_targets_to_store_or_serve(labelled, tmp_path):
    """A store and a pool hold the top-k of vocabulary tokens; a classifier's teacher is refused by both in one line."""
    from distill.cache_teacher import build
    from distill.config import load_config
    from distill.serve import BuiltinEngine

    cfg = load_config(None, classifier_job(labelled, tmp_path / "run"))
    with pytest.raises(ConfigError, match="task.kind=sequence_classification: the teacher store holds token targets"):
        build(cfg, k=4, out=tmp_path / "store")
    assert not (tmp_path / "store").exists()
    with pytest.raises(ConfigError, match="task.kind=sequence_classification: the teacher service serves token targets"):
        BuiltinEngine(cfg, 4, torch.device("cpu"))
