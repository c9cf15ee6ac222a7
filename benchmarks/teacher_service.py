"""The teacher as a service on the tiny default: a student's step time with a remote teacher pool
against the teacher in-process and against the teacher store; the pool's throughput as concurrent
students grow; bytes on the wire per target token.

Step times are the mean `train/step_seconds` of a fresh `distill run configs/tiny.yaml` (forward
KL, the first logged window left out), each row its own process. On this 2-core machine a pool
and a student share the cores, so the comparison that says whether remote targets cost more than
stored ones gives each its own core: the student (and the store and in-process rows) on core 0
with one torch thread, the pool on core 1. The unpinned rows show the two sharing both cores. On
the tiny default the teacher's forward on one core takes longer than the student's step, so the
pool cannot keep up; the last rows train a student of the teacher's own shape, whose step
outlasts the teacher's forward: a pool that keeps up.

Throughput: N students (1, 2, 4) are threads of this process, each asking for the targets of one
training micro-batch (16 x 128 tokens) after another for --seconds, as a student's prefetch does;
tokens/s are the pool's target tokens answered per wall-clock second, with the mean rows per
teacher forward (dynamic batching) and the mean time a request queued.

    python benchmarks/teacher_service.py [--steps 100] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
TOP_K = 64


def pinned(core: int | None) -> list[str]:
    return ["taskset", "-c", str(core)] if core is not None and shutil.which("taskset") else []


def start_pool(work: Path, core: int | None, threads: int | None) -> tuple[subprocess.Popen, str]:
    address = work / f"pool-{time.monotonic_ns()}.url"
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen([*pinned(core), sys.executable, "-m", "distill_launcher.cli", "serve-teacher", str(CONFIG), "--port", "0",
                             "--top-k", str(TOP_K), "--address-file", str(address)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(work / "pool.log", "a"))
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the pool exited {proc.returncode}; see {work / 'pool.log'}")
        if address.is_file():
            url = address.read_text().strip()
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        time.sleep(0.3)
    raise SystemExit("the pool was not ready in 600 s")


def run_student(name: str, work: Path, steps: int, sets: list[str], core: int | None, threads: int | None) -> dict:
    out = work / name
    argv = [*pinned(core), sys.executable, "-m", "distill_launcher.cli", "run", str(CONFIG), "--overwrite",
            *[a for o in [f"output_dir={out}", f"train.max_steps={steps}", "train.log_every=10", "train.eval_every=0", "eval.at_end=false",
                          "train.save_every=0", "tracking.backend=none", *sets] for a in ("--set", o)]]
    env = {**os.environ, "WANDB_MODE": "disabled", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: {proc.stderr.strip().splitlines()[-1]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in line][1:]
    seconds = sum(r["train/step_seconds"] * 10 for r in records) / (10 * len(records))
    share = sum(r["train/teacher_time_share"] for r in records) / len(records)
    return {"seconds_per_step": seconds, "teacher_share": share, "final_loss": records[-1]["train/loss"]}


def throughput(url: str, students: int, seconds: float, batch) -> dict:
    from distill.service import Client

    client = Client([url], None, timeout=60)
    stop, answered, wire = time.monotonic() + seconds, [0] * students, [0] * students

    def student(i: int) -> None:
        while time.monotonic() < stop:
            targets, size = client.targets(batch)
            answered[i] += len(targets)
            wire[i] += size

    before = _metrics(client, url)
    start = time.perf_counter()
    threads = [threading.Thread(target=student, args=(i,)) for i in range(students)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = _metrics(client, url)
    client.close()
    delta = {k: after[k] - before[k] for k in after}
    return {"students": students, "tokens_per_second": sum(answered) / wall, "rows_per_forward": delta["distill_teacher_rows_total"] / max(delta["distill_teacher_batches_total"], 1),
            "queue_ms_per_request": 1000 * delta["distill_teacher_queue_seconds_total"] / max(delta["distill_teacher_requests_total"], 1),
            "answer_bytes_per_target": sum(wire) / max(sum(answered), 1)}


def _metrics(client, url: str) -> dict:
    text = client.http.get(url + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#") and "{" not in line}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    work = args.out / "teacher_service_runs"
    work.mkdir(parents=True, exist_ok=True)
    built = subprocess.run([sys.executable, "-m", "distill_launcher.cli", "cache-teacher", str(CONFIG), "--top-k", str(TOP_K)],
                           cwd=REPO, capture_output=True, text=True, check=True)
    store = built.stdout.strip().splitlines()[-1].split("teacher store: ")[-1]
    kd = ["loss.alpha=0"]
    # The teacher's own shape: a student whose step outlasts the teacher's forward, so a one-core pool keeps up.
    large = ["student.architecture={num_hidden_layers: 2, hidden_size: 256, intermediate_size: 768, num_attention_heads: 8, num_key_value_heads: 8}"]
    setups = (("tiny default, one core each", 0, 1, []), ("tiny default, sharing 2 cores", None, None, []),
              ("student as large as the teacher, one core each", 0, 1, large))
    rows = {}
    for i, (label, core, threads, student) in enumerate(setups):
        sources = {"in-process teacher": [], f"store, top-{TOP_K}": ["teacher.source=cache", f"teacher.cache={store}"]}
        for source, sets in sources.items():
            rows[f"{source} ({label})"] = run_student(f"{i}_{source.split()[0].strip(',')}", work, args.steps, [*kd, *student, *sets], core, threads)
        pool, url = start_pool(work, 1 if core is not None else None, threads)
        try:
            rows[f"remote pool, top-{TOP_K} ({label})"] = run_student(f"{i}_remote", work, args.steps,
                                                                       [*kd, *student, "teacher.source=remote", f"teacher.url={url}"], core, threads)
        finally:
            pool.terminate()
            pool.wait()
    print(f"{'student step':<70} {'ms/step':>8} {'x store':>8} {'teacher share':>13}")
    for name, r in rows.items():
        label = name.split("(")[-1]
        store_row = next(v for k, v in rows.items() if k.startswith("store") and k.endswith(label))
        r["over_store"] = r["seconds_per_step"] / store_row["seconds_per_step"]
        print(f"{name:<70} {1000 * r['seconds_per_step']:>8.1f} {r['over_store']:>8.2f} {r['teacher_share']:>13.1%}")

    from distill import data
    from distill.config import load_config
    from distill.setup import Setup

    import torch

    cfg = load_config(str(CONFIG), [])
    setup = Setup(cfg, torch.device("cpu"), load_teacher=False, load_student=False)
    batch = data.collate([setup.train_sequences[i] for i in range(cfg.train.micro_batch_size)], setup.tokenizer.pad_token_id)
    pool, url = start_pool(work, 1, None)
    try:
        scaling = [throughput(url, n, args.seconds, batch) for n in (1, 2, 4)]
    finally:
        pool.terminate()
        pool.wait()
    request_bytes = 3 * 4  # input_ids, attention_mask and labels as int32 per input token
    print()
    print(f"{'students':>8} {'tokens/s':>9} {'rows/forward':>12} {'queue ms':>9} {'answer B/token':>14}")
    for s in scaling:
        print(f"{s['students']:>8} {s['tokens_per_second']:>9.0f} {s['rows_per_forward']:>12.1f} {s['queue_ms_per_request']:>9.1f} {s['answer_bytes_per_target']:>14.1f}")
    vocab = 1024
    print(f"wire: answers {scaling[0]['answer_bytes_per_target']:.1f} B per target token (top-{TOP_K}: int16 ids, float16 log-probs, float32 tail; "
          f"dense float16 logits would be {2 * vocab} B), requests {request_bytes} B per input token; pool pinned to one core")
    path = args.out / "teacher_service.json"
    path.write_text(json.dumps({"steps": args.steps, "top_k": TOP_K, "rows": rows, "scaling": scaling, "request_bytes_per_token": request_bytes}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
