"""Task-specific distillation where labels are few: the MiniLM docstring example with a fraction of
the training labels kept (10% by default), over seeds.

- labels only: the 3-layer student trained with ce on the labelled rows alone;
- distilled: the same student on all the training text, labels where kept (data.mixture of the
  labelled rows and the rest as unlabelled text, ``label_field: ""``), with the example's
  logits + ce + hidden objective: ce on the labelled rows, the teacher's terms on every row;
- distilled + augmented: the same, plus a third source of the unlabelled text's rewritten copies
  (``data.augment`` with ``originals: false``: TinyBERT's word replacement from a masked LM fitted
  on MiniLM by ``distill prepare-minilm --masked-lm``), its weight taken from the text's;
- and, for reference (``--all-labels``), labels only and distilled with every label;
- ``--student pretrained``: every student starts from the same layers of MiniLM as it was before the teacher's fine-tuning
  (``student.init_from``, DistilBERT's start), a student further from its teacher than the fine-tuned layers are;
  ``--student new``: a new 3 x 192 student with random weights (lr 5e-4, logits + ce: no hidden term), further still;
- ``--scarce``: TinyBERT's own setting, where the labelled rows are all the text there is: the distilled student on them alone,
  and with ``--scarce-copies`` rewritten copies of each (half the draws).

Each run is `distill run configs/minilm_docstrings.yaml` with the same steps; the seed picks the
labelled rows (:func:`distill.minilm.few_label_split`) and the training order. Runs `distill
prepare-minilm --masked-lm` first (cached). Prints a table (mean and spread of accuracy over the
seeds) and writes JSON.

    python benchmarks/few_labels.py [--keep 0.1] [--seeds 0 1 2] [--steps 450] [--copies 4] [--student layers|pretrained|new] [--all-labels] [--scarce]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MINILM = Path("~/.cache/distill/minilm").expanduser()
LABELS_ONLY = "loss.terms=[{kind: ce}]"
# The students' start: the teacher's layers 1, 3, 5 (fine-tuned), the same layers of MiniLM before the fine-tuning, or none (3 x 192, random)
STUDENTS = {"layers": [], "pretrained": [f"student.init_from={MINILM / 'pretrained'}"],
            "new": ["student.init=random", "student.init_layers=[]", "train.lr=5e-4",
                    "student.architecture={num_hidden_layers: 3, hidden_size: 192, intermediate_size: 768, num_attention_heads: 6}",
                    # without the example's hidden term, which pulls a student with no start down (README: stored features)
                    "loss.terms=[{kind: logits, name: kd, divergence: forward_kl, temperature: 4.0, weight: 0.8}, {kind: ce, weight: 0.2}]"]}


def distill(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "distill_launcher.cli", *args], check=True, cwd=REPO)


REUSE = False  # --reuse: a run whose eval.json exists is read back, not run again


def run(name: str, sets: list[str], steps: int, seed: int, out: Path) -> float:
    run_dir = out / f"{name}-{seed}"
    if REUSE and (run_dir / "eval.json").is_file():
        print(f"{run_dir}: reused", file=sys.stderr)
        return next(r for r in json.loads((run_dir / "eval.json").read_text())["rows"] if r["model"] == "student")["accuracy"]
    sets = [*sets, f"train.max_steps={steps}", f"train.seed={seed}", f"data.seed={seed}", "eval.speed=false", "eval.initial=false",
            f"output_dir={run_dir}"]
    distill(["run", str(REPO / "configs" / "minilm_docstrings.yaml"), "--overwrite", *[a for s in sets for a in ("--set", s)]])
    student = next(r for r in json.loads((run_dir / "eval.json").read_text())["rows"] if r["model"] == "student")
    return student["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.1, help="fraction of the training labels kept")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--copies", type=int, default=4, help="augmented copies of each unlabelled row")
    parser.add_argument("--rate", type=float, default=0.3, help="share of the words each copy replaces")
    parser.add_argument("--augment-weight", type=float, default=0.3, help="the augmented copies' share of the draws (taken from the unlabelled text's)")
    parser.add_argument("--student", choices=list(STUDENTS), default="layers",
                        help="the students' start: the teacher's layers 1, 3, 5 (layers), MiniLM's before the teacher's fine-tuning (pretrained), "
                             "or a new 3 x 192 student with random weights (new, lr 5e-4, logits + ce)")
    parser.add_argument("--all-labels", action="store_true", help="also the two students with every label")
    parser.add_argument("--scarce", action="store_true", help="also the distilled student on the labelled rows alone, without and with augmented copies of them")
    parser.add_argument("--scarce-copies", type=int, default=8, help="augmented copies of each labelled row in the --scarce rows")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--reuse", action="store_true", help="read back runs already finished under --out instead of running them again")
    args = parser.parse_args()
    global REUSE
    REUSE = args.reuse
    suffix = "" if args.student == "layers" else f"_{args.student}"
    work = args.out / f"few_labels_runs{suffix}"
    work.mkdir(parents=True, exist_ok=True)
    distill(["prepare-minilm", "--masked-lm"])
    from distill.minilm import few_label_split
    results: dict[str, list[float]] = {}
    for seed in args.seeds:
        labelled, text = few_label_split(work / f"split-{seed}", keep=args.keep, seed=seed, train=MINILM / "train.jsonl")
        few = [f"data.train_files=[{labelled}]"]

        def train(name: str, sets: list[str]) -> float:
            """One row's run for this seed, of the chosen student."""
            return run(name, [*STUDENTS[args.student], *sets], args.steps, seed, work)

        def mixture(augmented: float = 0.0) -> list[str]:
            """The labelled rows, the unlabelled text and (weight ``augmented``, taken from the text's) its rewritten copies."""
            sources = [f"{{name: labelled, weight: {args.keep}, train_files: [{labelled}]}}",
                       f"{{name: text, weight: {1 - args.keep - augmented:g}, train_files: [{text}], label_field: ''}}"]
            if augmented:
                sources.append(f"{{name: augmented, weight: {augmented:g}, train_files: [{text}], label_field: '', augment: {{kind: word_replace, "
                               f"copies: {args.copies}, rate: {args.rate:g}, originals: false, model: {MINILM / 'mlm'}, seed: {seed}}}}}")
            return ["data.train_files=[]", f"data.mixture=[{', '.join(sources)}]"]

        rows = {f"labels only, {args.keep:.0%} labelled": train("labels", [*few, LABELS_ONLY]),
                f"distilled, all text, {args.keep:.0%} labelled": train("distilled", mixture()),
                f"distilled + augmented, {args.keep:.0%} labelled": train("augmented-source", mixture(args.augment_weight))}
        if args.scarce:  # TinyBERT's own setting: the labelled rows are all the text there is, and augmentation makes more
            copies = (f"{{name: labelled, weight: 0.5, train_files: [{labelled}]}}, {{name: augmented, weight: 0.5, train_files: [{labelled}], "
                      f"label_field: '', augment: {{kind: word_replace, copies: {args.scarce_copies}, rate: {args.rate:g}, originals: false, "
                      f"model: {MINILM / 'mlm'}, seed: {seed}}}}}")
            rows[f"distilled, the {args.keep:.0%} labelled rows only"] = train("small", few)
            rows[f"  + {args.scarce_copies} augmented copies of each"] = train(f"smallaug{args.scarce_copies}", ["data.train_files=[]", f"data.mixture=[{copies}]"])
        if args.all_labels:
            rows["labels only, all labelled"] = train("labels-all", [LABELS_ONLY])
            rows["distilled, all labelled"] = train("distilled-all", [])
        for name, accuracy in rows.items():
            results.setdefault(name, []).append(accuracy)
    print(f"\n| student (3 layers{'' if args.student == 'layers' else ', ' + args.student}, {args.steps} steps) | accuracy, mean | spread (min-max) | seeds |")
    print("|---|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.mean(values):.1%} | {min(values):.1%}-{max(values):.1%} | {len(values)} |")
    (args.out / f"few_labels{suffix}.json").write_text(json.dumps({"student": args.student, "keep": args.keep, "steps": args.steps, "seeds": args.seeds, "copies": args.copies, "rate": args.rate,
                                                         "augment_weight": args.augment_weight, "accuracy": results},
                                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
