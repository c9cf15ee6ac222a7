"""task.kind=sequence_classification: a fine-tuned classifier teacher distilled into a smaller
classifier, end to end on tiny models saved and loaded back, with the errors that name the key."""

import json
import re

import pytest
import torch

from conftest import read_metrics, reset_accelerate, stdlib_text
from distill.config import ConfigError

MODULES = ["json/decoder.py", "email/utils.py", "asyncio/locks.py"]
LABELS = ["json", "email", "asyncio"]


def _lines(module: str) -> list[str]:
    return [line.strip() for line in stdlib_text([module]).splitlines() if len(line.strip()) > 12]


@pytest.fixture(scope="session")
def labelled(tmp_path_factory, tiny) -> dict:
    """Source lines labelled by their module (3 classes, by name), and a Llama classifier teacher
    fine-tuned on them for a few seconds with a plain loop."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("labelled")
    rows = {"train": [], "validation": []}
    for label, module in zip(LABELS, MODULES):
        lines = _lines(module)[:240]
        rows["train"] += [{"text": t, "label": label} for t in lines[:200]]
        rows["validation"] += [{"text": t, "label": label} for t in lines[200:]]
    for split, items in rows.items():
        with open(root / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in items)

    tokenizer = tiny["tokenizer"]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id, num_labels=3,
                         id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    teacher = LlamaForSequenceClassification(config)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    texts, labels = [r["text"] for r in rows["train"]], torch.tensor([LABELS.index(r["label"]) for r in rows["train"]])
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        pick = torch.randint(0, len(texts), (32,), generator=g)
        batch = tokenizer([texts[i] for i in pick], padding=True, truncation=True, max_length=48, return_tensors="pt")
        loss = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels[pick]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    return {"root": root, "teacher": str(root / "teacher"), "train": str(root / "train.jsonl"), "validation": str(root / "validation.jsonl")}


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
                  "loss.terms=[{kind: logits}, {kind: attention, name: att}]")
    assert result["rows"][1]["accuracy"] is not None
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
