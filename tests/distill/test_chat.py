"""Conversations (``data.messages_field``): rendered with the chat template, targets on the
assistant turns only (KD and CE alike), multi-turn included."""

import json
import re

import pytest

from conftest import read_metrics, run_job
from distill import data
from distill.config import ConfigError, DataConfig
from distill.losses import IGNORE_INDEX

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CONVERSATION = [
    {"role": "system", "content": "You answer questions about Python."},
    {"role": "user", "content": "What does shlex.split do?"},
    {"role": "assistant", "content": "It splits a string like a shell would."},
    {"role": "user", "content": "And glob?"},
    {"role": "assistant", "content": "It finds path names matching a pattern."},
]


def test_only_assistant_turns_are_targets(tiny):
    tokenizer = tiny["tokenizer"]
    ids, labels = data._conversation_ids(tokenizer, CONVERSATION, TEMPLATE, 0)
    targets = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert targets == "It splits a string like a shell would.</s>\nIt finds path names matching a pattern.</s>\n"
    masked = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
    for message in CONVERSATION:
        assert (message["content"] in masked) == (message["role"] != "assistant")


def test_a_tokenizer_without_a_template_is_named(tiny):
    from datasets import Dataset

    rows = Dataset.from_list([{"messages": CONVERSATION}])
    with pytest.raises(ConfigError, match=re.escape("data.messages_field: the tokenizer has no chat template; set data.chat_template")):
        data.tokenize(rows, tiny["tokenizer"], DataConfig(messages_field="messages"), "training")


def test_a_job_distills_conversations(tiny, corpus, tmp_path):
    lines = [line.strip() for line in open(corpus["train"]) if len(line.strip()) > 20][:400]
    path = tmp_path / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(0, len(lines) - 3, 4):
            messages = [{"role": "user", "content": lines[i]}, {"role": "assistant", "content": lines[i + 1]},
                        {"role": "user", "content": lines[i + 2]}, {"role": "assistant", "content": lines[i + 3]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    template_file = tmp_path / "template.jinja"
    template_file.write_text(TEMPLATE)
    run_dir, result = run_job(tiny, corpus, tmp_path / "run", f"data.train_files=[{path}]", f"data.validation_files=[{path}]",
                              "data.messages_field=messages", f"data.chat_template={template_file}", "data.packing=false",
                              "eval.speed=false", "train.max_steps=12")
    assert all(m["train/kd_loss"] > 0 for m in read_metrics(run_dir) if "train/loss" in m)
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["student"]["kl_to_teacher"] < rows["initial_student"]["kl_to_teacher"]
    # Evaluated on the assistant turns only: fewer targets than tokens.
    sequences = data.tokenize(data.load_raw(DataConfig(train_files=[str(path)], validation_files=[str(path)], messages_field="messages"))[1],
                              tiny["tokenizer"], DataConfig(messages_field="messages", chat_template=TEMPLATE, packing=False, seq_len=64), "validation")
    targets = sum(sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in sequences)
    assert targets < sum(len(row["input_ids"]) for row in sequences) / 2
