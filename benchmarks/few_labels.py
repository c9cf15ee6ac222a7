"""Task-specific distillation where labels are few: the MiniLM docstring example with a fraction of
the training labels kept (10% by default), over seeds.

- labels only: the 3-layer student trained with ce on the labelled rows alone;
- distilled: the same student on all the training text, labels where kept (data.mixture of the
  labelled rows and the rest as unlabelled text, ``label_field: ""``), with the example's
  logits + ce + hidden objective: ce on the labelled rows, the teacher's terms on every row;
- and, for reference, both with every label.

Each run is `distill run configs/minilm_docstrings.yaml` with the same steps; the seed picks the
labelled rows and the training order. Runs `distill prepare-minilm` first (cached). Prints a table
(mean and spread of accuracy over the seeds) and writes JSON.

    python benchmarks/few_labels.py [--keep 0.1] [--seeds 0 1 2] [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MINILM = Path("~/.cache/distill/minilm").expanduser()
LABELS_ONLY = "loss.terms=[{kind: ce}]"


def distill(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "distill_launcher.cli", *args], check=True, cwd=REPO)


def split(keep: float, seed: int, out: Path) -> tuple[Path, Path]:
    """The training rows, a ``keep`` fraction of them labelled (picked by ``seed``), the rest as text alone."""
    rows = [json.loads(line) for line in open(MINILM / "train.jsonl")]
    picked = set(random.Random(seed).sample(range(len(rows)), max(1, round(keep * len(rows)))))
    labelled, text = out / f"labelled-{seed}.jsonl", out / f"text-{seed}.jsonl"
    labelled.write_text("".join(json.dumps(r) + "\n" for i, r in enumerate(rows) if i in picked))
    text.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for i, r in enumerate(rows) if i not in picked))
    return labelled, text


def run(name: str, sets: list[str], steps: int, seed: int, out: Path) -> float:
    run_dir = out / f"{name}-{seed}"
    sets = [*sets, f"train.max_steps={steps}", f"train.seed={seed}", f"data.seed={seed}", "eval.speed=false", "eval.initial=false",
            f"output_dir={run_dir}"]
    distill(["run", str(REPO / "configs" / "minilm_docstrings.yaml"), "--overwrite", *[a for s in sets for a in ("--set", s)]])
    student = next(r for r in json.loads((run_dir / "eval.json").read_text())["rows"] if r["model"] == "student")
    return student["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.1, help="fraction of the training labels kept")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--all-labels", action="store_true", help="also the two students with every label")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    work = args.out / "few_labels_runs"
    work.mkdir(parents=True, exist_ok=True)
    distill(["prepare-minilm"])
    results: dict[str, list[float]] = {}
    for seed in args.seeds:
        labelled, text = split(args.keep, seed, work)
        few = [f"data.train_files=[{labelled}]"]
        mixture = ["data.train_files=[]", f"data.mixture=[{{name: labelled, weight: {args.keep}, train_files: [{labelled}]}}, "
                                          f"{{name: text, weight: {1 - args.keep}, train_files: [{text}], label_field: ''}}]"]
        rows = {f"labels only, {args.keep:.0%} labelled": run("labels", [*few, LABELS_ONLY], args.steps, seed, work),
                f"distilled, all text, {args.keep:.0%} labelled": run("distilled", mixture, args.steps, seed, work)}
        if args.all_labels:
            rows["labels only, all labelled"] = run("labels-all", [LABELS_ONLY], args.steps, seed, work)
            rows["distilled, all labelled"] = run("distilled-all", [], args.steps, seed, work)
        for name, accuracy in rows.items():
            results.setdefault(name, []).append(accuracy)
    print(f"\n| student (3 layers, {args.steps} steps) | accuracy, mean | spread (min-max) | seeds |")
    print("|---|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.mean(values):.1%} | {min(values):.1%}-{max(values):.1%} | {len(values)} |")
    (args.out / "few_labels.json").write_text(json.dumps({"keep": args.keep, "steps": args.steps, "seeds": args.seeds, "accuracy": results},
                                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
