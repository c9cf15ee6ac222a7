"""The real-model example: a fine-tuned all-MiniLM-L6-v2 teacher, the 3-layer student trained on
labels only, and the same student distilled (logits + ce + hidden), on the held-out docstrings.

Both students start from teacher layers 1, 3, 5 (embeddings copied) and take the same steps on
the same data in the same order; only the objective differs. Runs `distill prepare-minilm` first
(cached) and `distill run configs/minilm_docstrings.yaml` twice.

    python benchmarks/minilm_example.py [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDENTS = {
    "labels only": ["loss.terms=[{kind: ce}]"],
    "distilled": [],  # the config's logits + ce + hidden
}


def distill(args: list[str], *, check: bool = True) -> None:
    subprocess.run([sys.executable, "-m", "distill_launcher.cli", *args], check=check, cwd=REPO)


def run(name: str, steps: int, out: Path) -> dict:
    run_dir = out / name.replace(" ", "_")
    sets = [*STUDENTS[name], f"train.max_steps={steps}", f"output_dir={run_dir}"]
    start = time.time()
    distill(["run", str(REPO / "configs" / "minilm_docstrings.yaml"), "--overwrite", *[a for s in sets for a in ("--set", s)]])
    return {"seconds": time.time() - start, **json.loads((run_dir / "eval.json").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    distill(["prepare-minilm"])
    results = {name: run(name, args.steps, args.out / "minilm_runs") for name in STUDENTS}
    rows = []
    teacher = {r["model"]: r for r in results["distilled"]["rows"]}["teacher"]
    rows.append({**teacher, "model": "teacher (MiniLM-L6, fine-tuned)"})
    for name, result in results.items():
        rows.append({**{r["model"]: r for r in result["rows"]}["student"], "model": f"3-layer student, {name}"})
    header = f"{'model':<34} {'params':>11} {'disk MB':>8} {'accuracy':>9} {'macro-F1':>9} {'latency ms':>11} {'seq/s':>8}"
    print(header)
    for r in rows:
        print(f"{r['model']:<34} {r['params']:>11,} {r['disk_bytes'] / 1e6:>8.1f} {r['accuracy']:>9.1%} {r['macro_f1']:>9.3f} "
              f"{r['latency_ms_per_sequence']:>11.2f} {r['throughput_sequences_per_s']:>8.1f}")
    validation = results["distilled"]["validation_tokens"]
    print(f"{validation} held-out docstrings, {args.steps} steps per student")
    path = args.out / "minilm_example.json"
    path.write_text(json.dumps({"steps": args.steps, "validation_sequences": validation, "rows": rows,
                                "seconds": {name: r["seconds"] for name, r in results.items()}}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
