"""Distilling across tokenizers: the tiny default's teacher (byte-level BPE, 1,024 ids) into students of other tokenizers,
compared on a measure every tokenizer shares: bits per byte of the validation text.

For each student tokenizer and seed, fresh `distill run`s of configs/tiny.yaml's student (2 x 96) with the same data
order, steps and learning rate:

    CE only              the data alone (ce)
    ULD                  ce + the sorted-probability distance of every group (uld), no vocabulary mapped
    aligned              ce + logits group by group: the shared tokens (unshared ones folded into the shared token they start
                         with), the group's text, the rest; ULD on what is left; tokens inside a teacher token compared too
    aligned, no folding  the same with fold: false
    aligned, no inside   the same with inside: false
    aligned, from a store  the aligned objective read from one store of the teacher's top-64 (cache-teacher --any-tokenizer,
                         built once for every student): the teacher's rows (data.seq_len of its tokens), the student's
                         tokens of the same text, each position's distribution rebuilt from the top 64 and its own token's;
                         its share is against "CE only, the teacher's rows" (the same rows, ce alone: a byte student's
                         rows hold about 3.5 times the text of its own rows, a BPE-2048 student's a little less)

and, as the reference, the same two rows with the teacher's own tokenizer (ce, and ce + logits position by position):
the gain the aligned student should recover a share of. Bits per byte are computed here the same way for every model
(each validation paragraph tokenized by the model's own tokenizer between its BOS and EOS, the negative log-likelihood
of the text's tokens over the text's UTF-8 bytes), on all of it and on its lines with three digits or more.

    python benchmarks/cross_tokenizer.py [--students bpe-2048 bytes] [--seeds 1] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = Path("~/.cache/distill/tiny").expanduser()
STUDENTS = {"bpe-2048": 2048, "bytes": 259}  # vocabulary sizes of tokenizers trained here on the tiny corpus
SETS = ["eval.baseline=", "train.eval_every=0", "train.save_every=0", "tracking.backend=none", "eval.speed=false", "eval.initial=false"]
ROWS = {
    "CE only": "{kind: ce, name: ce}",
    "ULD": "{kind: uld, name: uld, weight: 0.5}, {kind: ce, name: ce, weight: 0.5}",
    "aligned": "{kind: logits, name: kd, divergence: forward_kl, weight: 0.5}, {kind: ce, name: ce, weight: 0.5}",
    "aligned, no folding": "{kind: logits, name: kd, divergence: forward_kl, weight: 0.5, fold: false}, {kind: ce, name: ce, weight: 0.5}",
    "aligned, no inside": "{kind: logits, name: kd, divergence: forward_kl, weight: 0.5, inside: false}, {kind: ce, name: ce, weight: 0.5}",
}
REFERENCE = {"CE only": ROWS["CE only"], "same-tokenizer KD": ROWS["aligned"]}  # the same objective, position by position


def cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "distill_launcher.cli", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"distill {args[0]} failed: {proc.stderr.strip().splitlines()[-1]}")


def tokenizer_for(name: str, work: Path) -> Path:
    from distill.tiny import train_tokenizer

    out = work / f"tokenizer-{name}"
    if not (out / "tokenizer.json").is_file():
        train_tokenizer(TINY / "train.txt", out, vocab_size=STUDENTS[name])
    return out


STORE_ROWS = {"CE only, the teacher's rows": ROWS["CE only"], "aligned, from a store": ROWS["aligned"]}  # read with teacher.source=cache


def train(label: str, terms: str, tokenizer: Path | None, seed: int, steps: int, out: Path, store: Path | None = None) -> Path:
    run_dir = out / f"{label.replace(' ', '_').replace(',', '')}-seed{seed}"
    sets = [*SETS, f"loss.terms=[{terms}]", f"train.max_steps={steps}", f"train.seed={seed}", f"data.seed={seed}", f"output_dir={run_dir}"]
    if store is not None:
        sets += ["teacher.source=cache", f"teacher.cache={store}"]
    if tokenizer is not None:
        sets.append(f"student.tokenizer={tokenizer}")
    if not (run_dir / "eval.json").is_file():
        cli("run", str(REPO / "configs/tiny.yaml"), "--overwrite", *[a for s in sets for a in ("--set", s)])
    return run_dir / "student"


def bits_per_byte(model_dir: Path, paragraphs: list[str], limit: int = 512) -> dict:
    """(all text, lines with 3+ digits): the model's negative log-likelihood of each paragraph's tokens over its UTF-8 bytes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums = {"all": [0.0, 0], "digits": [0.0, 0]}
    for text in paragraphs:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"][: limit - 1], encoded["offset_mapping"][: limit - 1]
        if not ids:
            continue
        inputs = torch.tensor([[tokenizer.bos_token_id, *ids]])
        with torch.no_grad():
            log_p = torch.log_softmax(model(input_ids=inputs).logits[0, :-1].float(), dim=-1)
        nll = -log_p.gather(-1, inputs[0, 1:, None]).squeeze(-1)
        covered = text[: offsets[-1][1]]
        line_of = [covered.count("\n", 0, start) for start, _ in offsets]
        digit_lines = {i for i, line in enumerate(covered.split("\n")) if sum(c.isdigit() for c in line) >= 3}
        sums["all"][0] += float(nll.sum())
        sums["all"][1] += len(covered.encode())
        previous_end = 0
        for value, (_, end), line in zip(nll.tolist(), offsets, line_of):
            if line in digit_lines:  # a token is counted with the line it starts in, with the bytes it adds
                sums["digits"][0] += value
                sums["digits"][1] += len(covered[previous_end:end].encode())
            previous_end = max(previous_end, end)
    return {key: total / math.log(2) / max(count, 1) for key, (total, count) in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--paragraphs", type=int, default=300, help="validation paragraphs measured")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    cli("prepare-tiny")
    work = args.out / "cross_tokenizer_runs"
    paragraphs = [p for p in (TINY / "validation.txt").read_text().split("\n\n") if p.strip()][: args.paragraphs]
    measured = {}

    def measure(key: str, student: Path) -> dict:
        if key not in measured:
            measured[key] = bits_per_byte(student, paragraphs)
        return measured[key]

    teacher = measure("teacher", TINY / "teacher")
    store = work / "store"
    if not (store / "manifest.json").is_file():  # once, for students of every tokenizer
        cli("cache-teacher", str(REPO / "configs/tiny.yaml"), "--top-k", "64", "--any-tokenizer", "--out", str(store))
    table = {}
    for label, terms in REFERENCE.items():
        runs = [measure(f"same/{label}/{seed}", train(f"same-{label}", terms, None, seed, args.steps, work)) for seed in range(args.seeds)]
        table[f"teacher's tokenizer: {label}"] = runs
    for name in args.students:
        tokenizer = tokenizer_for(name, work)
        for label, terms in ROWS.items():
            runs = [measure(f"{name}/{label}/{seed}", train(f"{name}-{label}", terms, tokenizer, seed, args.steps, work)) for seed in range(args.seeds)]
            table[f"{name}: {label}"] = runs
        for label, terms in STORE_ROWS.items():
            runs = [measure(f"{name}/{label}/{seed}", train(f"{name}-{label.replace(chr(39), '')}", terms, tokenizer, seed, args.steps, work, store))
                    for seed in range(args.seeds)]
            table[f"{name}: {label}"] = runs

    mean = lambda runs, key: statistics.mean(r[key] for r in runs)
    print(f"\n{args.steps} steps, {args.seeds} seed(s); bits per byte of {len(paragraphs)} validation paragraphs (lower is better); "
          f"teacher {teacher['all']:.4f} (digit lines {teacher['digits']:.4f})")
    print(f"{'student':<40} {'bits/byte':>10} {'digit lines':>12} {'share of the KD gain':>21}")
    same_gain = mean(table["teacher's tokenizer: CE only"], "all") - mean(table["teacher's tokenizer: same-tokenizer KD"], "all")
    summary = {}
    for row, runs in table.items():
        name = row.split(":")[0]
        base = table.get(f"{name}: CE only") if not row.startswith("teacher's") else table["teacher's tokenizer: CE only"]
        if row.endswith("from a store"):
            base = table[f"{name}: CE only, the teacher's rows"]
        share = (mean(base, "all") - mean(runs, "all")) / same_gain if same_gain else None
        summary[row] = {"bits_per_byte": mean(runs, "all"), "digit_lines": mean(runs, "digits"), "by_seed": [r["all"] for r in runs],
                        "share_of_same_tokenizer_gain": share}
        print(f"{row:<40} {mean(runs, 'all'):>10.4f} {mean(runs, 'digits'):>12.4f} {'' if share is None or 'CE only' in row else f'{share:.0%}':>21}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "cross_tokenizer.json"
    path.write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "paragraphs": len(paragraphs), "teacher": teacher,
                                "same_tokenizer_gain": same_gain, "rows": summary}, indent=2) + "\n")
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
