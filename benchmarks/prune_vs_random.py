"""Minitron at small scale: a student pruned from the trained teacher vs one of the same shape
initialized at random, both distilled for the same number of steps on the tiny default.

Needs `distill prepare-tiny`. Prints a table and writes benchmarks/results/prune_vs_random.json.

    python benchmarks/prune_vs_random.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# About half of the tiny teacher's 2.16M parameters (4 layers, hidden 192, 6 heads of 32, MLP 512).
SHAPE = {"num_hidden_layers": 3, "hidden_size": 144, "intermediate_size": 384, "num_attention_heads": 6}
STUDENTS = {
    "pruned from teacher": ["student.architecture={}", "student.prune=" + json.dumps(SHAPE)],
    # head_dim pinned to the teacher's 32, as pruning keeps it: the same shape exactly.
    "random init": ["student.architecture=" + json.dumps({**SHAPE, "head_dim": 32, "num_key_value_heads": 6})],
}


def run(name: str, steps: int, out: Path) -> dict:
    run_dir = out / name.replace(" ", "_")
    sets = [*STUDENTS[name], f"train.max_steps={steps}", "tracking.backend=none", "train.save_every=0", "train.eval_every=0",
            f"output_dir={run_dir}"]
    argv = [sys.executable, "-m", "distill_launcher.cli", "run", str(REPO / "configs" / "tiny.yaml")] + [a for s in sets for a in ("--set", s)]
    start = time.time()
    subprocess.run(argv, check=True, cwd=REPO, capture_output=True, text=True)
    rows = {r["model"]: r for r in json.loads((run_dir / "eval.json").read_text())["rows"]}
    return {"student": name, "params": rows["student"]["params"], "teacher_params": rows["teacher"]["params"],
            "ppl_before": rows["initial_student"]["perplexity"], "ppl_after": rows["student"]["perplexity"],
            "kl_after": rows["student"]["kl_to_teacher"], "top1_after": rows["student"]["top1_agreement"],
            "teacher_ppl": rows["teacher"]["perplexity"], "seconds": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run(name, args.steps, args.out / "prune_vs_random_runs") for name in STUDENTS]
    print(f"{'student':<20} {'params':>9} {'ppl before':>10} {'ppl after':>9} {'KL(T||S)':>9} {'top-1':>6}")
    for r in results:
        print(f"{r['student']:<20} {r['params']:>9,} {r['ppl_before']:>10.2f} {r['ppl_after']:>9.2f} {r['kl_after']:>9.4f} {r['top1_after']:>6.1%}")
    print(f"teacher: {results[0]['teacher_params']:,} parameters, ppl {results[0]['teacher_ppl']:.2f}; {args.steps} distillation steps each")
    path = args.out / "prune_vs_random.json"
    path.write_text(json.dumps({"steps": args.steps, "shape": SHAPE, "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
