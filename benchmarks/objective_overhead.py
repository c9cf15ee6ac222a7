"""Step time of the objective's terms on the tiny default: logits + ce, then with hidden-state and
attention terms added, each in a fresh process (`distill run configs/tiny.yaml`).

The figure is the job's own `train/tokens_per_s` over the steps after a warm-up, converted to
milliseconds per step; the teacher (4 layers, width 192, 6 heads) and the student (2 layers, width
96, 3 heads) differ in every dimension, so the hidden term learns projections and the attention
term uses relations unless the student is given 6 heads (maps). Needs `distill prepare-tiny`.

    python benchmarks/objective_overhead.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = "{kind: logits, name: kd}, {kind: ce, weight: 0.1}"
SIX_HEADS = "student.architecture={num_hidden_layers: 2, hidden_size: 96, intermediate_size: 256, num_attention_heads: 6, num_key_value_heads: 6}"
OBJECTIVES = {
    "logits + ce": [f"loss.terms=[{BASE}]"],
    "+ hidden (mse, 3 pairs, projections)": [f"loss.terms=[{BASE}, {{kind: hidden, embeddings: true}}]"],
    "+ attention relations (3 q/k/v x 2 layers)": [f"loss.terms=[{BASE}, {{kind: attention, mode: relations, relation_heads: 3}}]"],
    "+ hidden + relations": [f"loss.terms=[{BASE}, {{kind: hidden, embeddings: true}}, {{kind: attention, mode: relations, relation_heads: 3}}]"],
    "logits + ce, 6 student heads": [f"loss.terms=[{BASE}]", SIX_HEADS],
    "+ attention maps (eager), 6 student heads": [f"loss.terms=[{BASE}, {{kind: attention, mode: maps}}]", SIX_HEADS],
}


def measure(name: str, steps: int, out: Path) -> dict:
    run_dir = out / str(list(OBJECTIVES).index(name))
    sets = [*OBJECTIVES[name], f"train.max_steps={steps}", f"train.log_every={steps // 2}", "train.eval_every=0", "train.save_every=0",
            "eval.at_end=false", "tracking.backend=none", f"output_dir={run_dir}"]
    argv = [sys.executable, "-m", "distill_launcher.cli", "run", str(REPO / "configs" / "tiny.yaml"), "--overwrite"]
    subprocess.run(argv + [a for s in sets for a in ("--set", s)], check=True, cwd=REPO, capture_output=True, text=True)
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]  # the second half: warm
    tokens_per_step = 16 * 127  # micro-batch 16 x 128 tokens (127 targets each) of configs/tiny.yaml
    return {"objective": name, "ms_per_step": 1000 * tokens_per_step / last["train/tokens_per_s"],
            "teacher_time_share": last["train/teacher_time_share"], "peak_memory_mb": last["train/peak_memory_bytes"] / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"{'objective':<44} {'ms/step':>8} {'x base':>7} {'teacher share':>14} {'peak MB':>8}")
    for name in OBJECTIVES:
        r = measure(name, args.steps, args.out / "objective_overhead_runs")
        results.append(r)
        six_base = next((x["ms_per_step"] for x in results if x["objective"] == "logits + ce, 6 student heads"), None)
        ref = six_base if name.endswith("6 student heads") else results[0]["ms_per_step"]
        r["relative"] = r["ms_per_step"] / ref
        print(f"{name:<44} {r['ms_per_step']:>8.1f} {r['relative']:>6.2f}x {r['teacher_time_share']:>13.1%} {r['peak_memory_mb']:>8.0f}")
    print(f"{args.steps} steps each, the last {args.steps // 2} measured; micro-batch 16 x 128 tokens, CPU")
    path = args.out / "objective_overhead.json"
    path.write_text(json.dumps({"steps": args.steps, "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
