"""Shared fixtures: tiny real models saved to disk and loaded back through the user's path."""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def stdlib_text(names: list[str]) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((root / n).read_text() for n in names)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """Real text: standard-library sources, split into train/validation files (txt and jsonl)."""
    root = tmp_path_factory.mktemp("corpus")
    train = stdlib_text(["textwrap.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py"])
    validation = stdlib_text(["glob.py", "colorsys.py"])
    (root / "train.txt").write_text(train)
    (root / "validation.txt").write_text(validation)
    paragraphs = [p for p in train.split("\n\n") if p.strip()]
    with open(root / "train.jsonl", "w") as f:
        for p in paragraphs:
            f.write(json.dumps({"text": p}) + "\n")
    return {"dir": root, "train": str(root / "train.txt"), "validation": str(root / "validation.txt"), "jsonl": str(root / "train.jsonl")}


def save_llama(path: Path, tokenizer, *, vocab_size: int | None = None, layers: int = 2, hidden: int = 64, heads: int = 4, seed: int = 0, max_positions: int = 256):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, corpus) -> dict:
    """A BPE tokenizer trained on the corpus, a 2-layer Llama teacher and a 1-layer student, on disk."""
    from distill.tiny import train_tokenizer

    root = tmp_path_factory.mktemp("models")
    tokenizer = train_tokenizer(Path(corpus["train"]), root / "tokenizer", vocab_size=320)
    save_llama(root / "teacher", tokenizer, layers=2, hidden=64, seed=1)
    save_llama(root / "student", tokenizer, layers=1, hidden=32, heads=2, seed=2)
    return {"root": root, "teacher": str(root / "teacher"), "student": str(root / "student"), "tokenizer": tokenizer}


def job_overrides(tiny: dict, corpus: dict, out: Path, *extra: str) -> list[str]:
    """A small, fast job on the tiny models; ``extra`` overrides win."""
    return [
        f"teacher.path={tiny['teacher']}", "teacher.dtype=float32",
        "student.architecture={num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64, num_attention_heads: 2}",
        f"data.train_files=[{corpus['train']}]", f"data.validation_files=[{corpus['validation']}]",
        "data.seq_len=64", "data.max_validation_sequences=16",
        "train.micro_batch_size=4", "train.max_steps=6", "train.lr=3e-3", "train.log_every=1",
        "eval.speed_repeats=1", "eval.latency_new_tokens=4", "eval.throughput_batch_size=2",
        "tracking.backend=none", f"output_dir={out}", *extra,
    ]


def run_job(tiny: dict, corpus: dict, out: Path, *extra: str, resume: bool = False):
    """Runs the job in this process, like `distill run`, and returns (run dir, result)."""
    from distill.config import load_config
    from distill.job import run

    result = run(load_config(None, job_overrides(tiny, corpus, out, *extra)), resume=resume)
    return out, result


def sweep_args(tiny, corpus, sweep_dir, *args, base=()):
    """`distill sweep` on the test's tiny models: an empty config file, everything from --set."""
    config = sweep_dir.parent / f"{sweep_dir.name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("{}\n")
    sets = [a for o in job_overrides(tiny, corpus, sweep_dir.parent / "unused", *base) for a in ("--set", o) if not o.startswith("output_dir=")]
    return ["sweep", str(config), *sets, "--sweep-dir", str(sweep_dir), *args]


def read_metrics(run_dir: Path) -> list[dict]:
    from distill.train import read_metrics as read

    assert (run_dir / "metrics.jsonl").is_file(), f"no metrics.jsonl in {run_dir}"
    return read(run_dir / "metrics.jsonl")


def distill_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None):
    """Runs the real `distill` command in a subprocess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "distill_launcher.cli", *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or REPO)


def reset_accelerate() -> None:
    """Each in-process job builds its own Accelerator; accelerate keeps a process-wide singleton."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate()


MODULES = ["json/decoder.py", "email/utils.py", "asyncio/locks.py"]
LABELS = ["json", "email", "asyncio"]


def _lines(module: str) -> list[str]:
    return [line.strip() for line in stdlib_text([module]).splitlines() if len(line.strip()) > 12]


@pytest.fixture(scope="session")
def labelled(tmp_path_factory, tiny) -> dict:
    """Source lines labelled by their module (3 classes, by name), and a Llama classifier teacher
    fine-tuned on them for a few seconds with a plain loop."""
    import torch
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


def few_labels(labelled, root, augment: str = "") -> list[str]:
    """A fifth of the training rows keep their label (one of them null), the rest are plain text without a label column:
    the data.mixture of a labelled source and an unlabelled one (``augment``: that source's data.augment, a YAML mapping)."""
    rows = [json.loads(line) for line in open(labelled["train"])]
    kept = [dict(r) for r in rows[::5]]
    kept[0]["label"] = None  # a row without a label inside the labelled file
    (root / "labelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for i, r in enumerate(rows) if i % 5))
    return ["data.train_files=[]", f"data.mixture=[{{name: labelled, weight: 0.4, train_files: [{root / 'labelled.jsonl'}]}}, "
                                   f"{{name: text, weight: 0.6, train_files: [{root / 'text.jsonl'}], label_field: ''{', augment: ' + augment if augment else ''}}}]"]


@pytest.fixture(scope="session")
def bert(tmp_path_factory, corpus) -> dict:
    """A WordPiece tokenizer trained on the corpus and a 2-layer BERT masked-LM teacher trained on it
    for a few seconds with a plain loop."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("bert")
    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.train([corpus["train"]], trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                                            show_progress=False))
    raw.post_processor = processors.BertProcessing(("[SEP]", raw.token_to_id("[SEP]")), ("[CLS]", raw.token_to_id("[CLS]")))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                        mask_token="[MASK]")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    teacher = BertForMaskedLM(config)
    paragraphs = [p for p in open(corpus["train"]).read().split("\n\n") if p.strip()]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        pick = torch.randint(0, len(paragraphs), (16,), generator=g).tolist()
        encoded = tokenizer([paragraphs[i] for i in pick], truncation=True, max_length=64)
        batch = collator([{"input_ids": ids} for ids in encoded["input_ids"]])
        teacher(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    return {"teacher": str(root / "teacher"), "tokenizer": tokenizer}


def read_wandb_records(run_dir: Path) -> list:
    """The records of a run's offline .wandb file (W&B's log format: a 7-byte header, then 32 KiB
    blocks of records, each a 7-byte header (crc32, length, type) and a piece of a protobuf Record)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    (path,) = list(offline.glob("*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    block = 32768
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # the block's tail is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records
