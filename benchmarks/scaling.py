"""Training throughput of the same tiny job at 1 and 2 processes through each launcher.

Runs `distill launch configs/tiny.yaml` (needs `distill prepare-tiny`) for a fixed number of
steps at a fixed global batch (the micro-batch is halved at 2 processes), and reports the mean
`train/tokens_per_s` over the logged steps after the first (which includes warm-up).

    python benchmarks/scaling.py [--steps 60] [--configs torchrun deepspeed:zero2 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from distill.train import read_metrics

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ["torchrun", "accelerate", "deepspeed:zero1", "deepspeed:zero2", "deepspeed:zero3", "accelerate:zero2"]


def run(spec: str, nproc: int, steps: int, global_batch: int, out: Path) -> dict:
    launcher, _, ds_config = spec.partition(":")
    run_dir = out / f"{spec.replace(':', '-')}-{nproc}"
    sets = [f"train.max_steps={steps}", f"train.micro_batch_size={global_batch // nproc}", "train.log_every=5", "train.save_every=0",
            "train.eval_every=0", "eval.at_end=false", "tracking.backend=none", f"output_dir={run_dir}"]
    argv = [sys.executable, "-m", "distill_launcher.cli", "launch", str(REPO / "configs" / "tiny.yaml"), "--launcher", launcher,
            "--nproc-per-node", str(nproc)] + (["--ds-config", ds_config] if ds_config else []) + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start = time.time()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"launcher": spec, "processes": nproc, "error": done.stderr.strip().splitlines()[-1][:200]}
    records = read_metrics(run_dir / "metrics.jsonl")
    rates = [r["train/tokens_per_s"] for r in records[1:]]
    return {"launcher": spec, "processes": nproc, "tokens_per_s": sum(rates) / len(rates), "wall_seconds": time.time() - start,
            "final_loss": records[-1]["train/loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--configs", nargs="+", default=DEFAULT, help="launcher or launcher:ds_config")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'launcher':<18} {'procs':>5} {'tokens/s':>10} {'wall s':>7} {'final loss':>10}")
    for spec in args.configs:
        for nproc in (1, 2):
            r = run(spec, nproc, args.steps, args.global_batch, args.out / "scaling_runs")
            rows.append(r)
            if "error" in r:
                print(f"{spec:<18} {nproc:>5} failed: {r['error']}")
            else:
                print(f"{spec:<18} {nproc:>5} {r['tokens_per_s']:>10,.0f} {r['wall_seconds']:>7.1f} {r['final_loss']:>10.4f}")
    path = args.out / "scaling.json"
    path.write_text(json.dumps({"steps": args.steps, "global_batch": args.global_batch, "cpus": os.cpu_count(), "results": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
