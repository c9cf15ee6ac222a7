"""Quality of the tiny default per objective: distillation vs the CE-only baseline.

Runs `distill run configs/tiny.yaml` once per objective (same steps, same student, same data)
and compares the distilled students on the validation set. Needs `distill prepare-tiny` first.

    python benchmarks/kd_objectives.py [--steps 300] [--objectives baseline forward_kl jsd ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = {
    "baseline": ["loss.alpha=1.0"],  # plain next-token training: no teacher
    "forward_kl": ["loss.kind=forward_kl"],
    "reverse_kl": ["loss.kind=reverse_kl"],
    "jsd": ["loss.kind=jsd", "loss.jsd_beta=0.5"],
    "skew_forward_kl": ["loss.kind=skew_forward_kl"],
    "tvd": ["loss.kind=tvd"],
    "forward_kl+ce": ["loss.kind=forward_kl", "loss.alpha=0.5"],
}


def run(name: str, steps: int, out: Path) -> dict:
    sets = [*OBJECTIVES[name], f"train.max_steps={steps}", "tracking.backend=none", "train.save_every=0", "train.eval_every=0",
            "eval.speed=false", f"output_dir={out / name}"]
    argv = [sys.executable, "-m", "distill_launcher.cli", "run", str(REPO / "configs" / "tiny.yaml")] + [a for s in sets for a in ("--set", s)]
    start = time.time()
    subprocess.run(argv, check=True, cwd=REPO, capture_output=True, text=True)
    rows = {r["model"]: r for r in json.loads((out / name / "eval.json").read_text())["rows"]}
    return {"objective": name, "seconds": time.time() - start, "student_ppl": rows["student"]["perplexity"],
            "kl_to_teacher": rows["student"]["kl_to_teacher"], "top1_agreement": rows["student"]["top1_agreement"],
            "teacher_ppl": rows["teacher"]["perplexity"], "initial_ppl": rows["initial_student"]["perplexity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--objectives", nargs="+", default=["baseline", "forward_kl", "reverse_kl", "jsd", "forward_kl+ce"], choices=list(OBJECTIVES))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"{'objective':<16} {'student ppl':>11} {'KL(T||S)':>9} {'top-1':>7} {'seconds':>8}")
    for name in args.objectives:
        r = run(name, args.steps, args.out / "kd_objectives_runs")
        results.append(r)
        print(f"{name:<16} {r['student_ppl']:>11.2f} {r['kl_to_teacher']:>9.4f} {r['top1_agreement']:>7.1%} {r['seconds']:>8.1f}")
    print(f"teacher ppl {results[0]['teacher_ppl']:.2f}, untrained student ppl {results[0]['initial_ppl']:.2f}, {args.steps} steps each")
    path = args.out / "kd_objectives.json"
    path.write_text(json.dumps({"steps": args.steps, "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
