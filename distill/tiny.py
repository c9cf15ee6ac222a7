"""The bundled tiny default: a real corpus, tokenizer and trained teacher with no download.

The corpus is this Python's own standard-library sources. A byte-level BPE tokenizer is trained
on it, and a small Llama teacher is trained on it with this project's own job (``loss.alpha=1``:
plain next-token training), so that distillation has something real to transfer. The build is
cached under a fingerprint of its recipe and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import sysconfig
from pathlib import Path

import yaml

from distill.config import load_config
from distill.rundir import RunDir
from distill.shared_build import build_once

RECIPE = {
    "version": 2,
    "corpus_bytes": 1_500_000,
    "validation_bytes": 120_000,
    "vocab_size": 1024,
    # Wide and shallow: at 300 steps of 2,048 tokens two layers of 256 reach validation perplexity
    # 37 where four of 192 reach 39, and 450 steps give 32; a long warm-up (100 steps) is what lets
    # either train at 2e-3 to 3e-3: with 20 steps the 4-layer teacher stalled at 55.
    "teacher": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2, "num_attention_heads": 8,
                "num_key_value_heads": 8, "max_position_embeddings": 512},
    "warmup": {"steps": 450, "lr": 3e-3, "micro_batch_size": 16, "seq_len": 128, "warmup_steps": 100},
    # The student of configs/tiny.yaml trained on the data alone (loss.alpha=1), for the report's baseline row.
    "baseline": ["student.architecture={num_hidden_layers: 2, hidden_size: 96, intermediate_size: 256, num_attention_heads: 3, "
                 "num_key_value_heads: 3}", "data.seq_len=128", "data.max_validation_sequences=64", "loss.alpha=1.0", "train.lr=3.0e-3",
                 "train.warmup_steps=20", "train.scheduler=cosine", "train.micro_batch_size=16", "train.max_steps=300"],
}


def _stdlib_files() -> list[Path]:
    """Top-level standard-library modules, sorted, so the corpus is the same on every run."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if not p.name.startswith(("test", "_")))


def write_corpus(out: Path) -> tuple[Path, Path]:
    """Writes train.txt and validation.txt (disjoint files of the standard library)."""
    texts = []
    for path in _stdlib_files():
        try:
            texts.append((path.name, path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    # Every 10th module goes to validation, so both splits cover the alphabet of modules.
    validation = [t for i, (_, t) in enumerate(texts) if i % 10 == 5]
    train = [t for i, (_, t) in enumerate(texts) if i % 10 != 5]
    train_text = "\n\n".join(train)[: RECIPE["corpus_bytes"]]
    validation_text = "\n\n".join(validation)[: RECIPE["validation_bytes"]]
    (out / "train.txt").write_text(train_text)
    (out / "validation.txt").write_text(validation_text)
    return out / "train.txt", out / "validation.txt"


def train_tokenizer(corpus: Path, out: Path, *, vocab_size: int = RECIPE["vocab_size"]):
    """A byte-level BPE tokenizer (no unknown tokens) with <pad>, <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # start-up time: tokenizers loads only when this runs
    from transformers import PreTrainedTokenizerFast  # start-up time: transformers loads only when this runs

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([str(corpus)], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    wrapped.save_pretrained(out)
    return wrapped


LM_EVAL_TASK = "stdlib_next_word"


def write_lm_eval_task(text_file: Path, out: Path, *, name: str = LM_EVAL_TASK, examples: int = 200, seed: int = 0) -> Path:
    """A small multiple-choice cloze task built from local text, for offline benchmarks.

    Each example shows a line of ``text_file`` up to one of its words, after the six lines before
    it (indentation kept), and asks which of four words comes next: the real one, or three words
    drawn from elsewhere in the file. Written as ``OUT/NAME.yaml`` (lm-eval's task format, data by
    absolute path) and ``OUT/NAME.jsonl``; pass OUT as ``eval.lm_eval.include_path``.
    """

    lines = Path(text_file).read_text().splitlines()
    words = re.compile(r"[A-Za-z_][A-Za-z_0-9]{2,}")
    sites = [(i, m) for i in range(6, len(lines)) for m in words.finditer(lines[i]) if m.start() > len(lines[i]) - len(lines[i].lstrip())]
    vocabulary = sorted({m.group() for _, m in sites})
    rng = random.Random(seed)
    rows = []
    for i, match in rng.sample(sites, min(examples, len(sites))):
        word = match.group()
        choices = [word, *rng.sample([w for w in vocabulary if w != word], 3)]
        rng.shuffle(choices)
        context = "\n".join(lines[i - 6 : i]) + "\n" + lines[i][: match.start()]
        rows.append({"context": context, "choices": choices, "gold": choices.index(word)})
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "gold",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }

    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train_baseline(out: Path) -> Path:
    """OUT/baseline: the tiny default's student trained on the data alone, the same steps; configs/tiny.yaml's eval.baseline."""
    from distill.job import run  # loads torch: this module stays torch-free until it is needed

    print(f"training the CE-only baseline student ({RECIPE['baseline'][-1]}; done once, then cached)")
    overrides = [f"teacher.path={out / 'teacher'}", "teacher.dtype=float32", f"data.train_files=[{out / 'train.txt'}]",
                 f"data.validation_files=[{out / 'validation.txt'}]", *RECIPE["baseline"], "train.log_every=50", "eval.speed=false",
                 "eval.initial=false", "tracking.backend=none", f"output_dir={out / 'baseline'}"]
    from accelerate.state import AcceleratorState, GradientState  # start-up time: accelerate loads only when this runs

    AcceleratorState._reset_state(True)  # the teacher's training, in this process, set accelerate's singleton up
    GradientState._reset_state()
    run(load_config(None, overrides))
    shutil.rmtree(RunDir(out / "baseline").checkpoints, ignore_errors=True)
    return out / "baseline"


def _fingerprint() -> str:
    blob = json.dumps({"recipe": RECIPE, "python": sys.version_info[:2]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare(directory: str | os.PathLike = "~/.cache/distill/tiny", *, force: bool = False) -> Path:
    """Builds (or reuses) ``DIR/{train,validation}.txt`` and ``DIR/teacher``; concurrent calls build it once (:func:`build_once`)."""

    out = Path(os.path.expanduser(str(directory)))

    def ready(path: Path) -> bool:
        stamp = path / "fingerprint.txt"
        return not force and stamp.is_file() and stamp.read_text().strip() == _fingerprint() and (path / "teacher" / "config.json").is_file()

    def finish(path: Path) -> None:  # these record the final paths (the lm-eval task's data, the baseline's config)
        write_lm_eval_task(path / "validation.txt", path / "lm_eval")
        train_baseline(path)
        (path / "fingerprint.txt").write_text(_fingerprint())

    if build_once(out, ready=ready, build=_build_teacher, finish=finish, what="prepare-tiny"):
        print(f"tiny teacher and corpus ready in {out}")
    else:
        if not (out / "lm_eval" / f"{LM_EVAL_TASK}.yaml").is_file():
            write_lm_eval_task(out / "validation.txt", out / "lm_eval")
        print(f"tiny teacher and corpus ready in {out} (cached)")
    return out


def _build_teacher(out: Path) -> None:
    """The corpus, the tokenizer and the trained teacher, into the empty folder ``out``."""
    import torch  # this module stays free of torch until it is needed
    from transformers import LlamaConfig, LlamaForCausalLM  # start-up time: transformers loads only when this runs

    from distill.job import run  # loads torch: this module stays torch-free until it is needed

    train_file, validation_file = write_corpus(out)
    init_dir = out / "teacher-init"
    tokenizer = train_tokenizer(train_file, init_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **RECIPE["teacher"])
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(init_dir)
    warm = RECIPE["warmup"]
    overrides = [
        f"teacher.path={init_dir}", f"student.path={init_dir}", "teacher.dtype=float32",
        f"data.train_files=[{train_file}]", f"data.validation_files=[{validation_file}]", f"data.seq_len={warm['seq_len']}",
        "loss.alpha=1.0", f"train.max_steps={warm['steps']}", f"train.lr={warm['lr']}", f"train.warmup_steps={warm['warmup_steps']}",
        f"train.micro_batch_size={warm['micro_batch_size']}", "train.log_every=50", "eval.at_end=false",
        "tracking.backend=none", f"output_dir={out / 'warmup-run'}",
    ]
    print(f"training the tiny teacher on {train_file} ({warm['steps']} steps; done once, then cached)")
    run(load_config(None, overrides))
    os.rename(RunDir(out / "warmup-run").student, out / "teacher")
    shutil.rmtree(out / "warmup-run")
    shutil.rmtree(init_dir)
