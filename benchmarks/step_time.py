"""Step time of the whole training step on the tiny default, side by side in one run, each in a
fresh process: a plain PyTorch loop (CE), this project's CE-only step, its online KD step, its KD
step from a teacher store, and TRL's GKDTrainer (lmbda=0, beta=0: forward KL, no generation); all
in float32, plus both KD steps in bf16 autocast (TRL's default, even on CPU).

This project's rows run with `train.cpu_allocator=cached` (its default: glibc keeps freed tensor
memory in the process); the plain loop and TRL run as their users run them, with glibc's defaults.
`--same-allocator` gives every row the same glibc settings, to separate that from the rest.

This project's step time is its own clock (train/tokens_per_s): the whole loop iteration,
collating the batch included; the plain loop and TRL (a callback from step begin to end) are
timed on batches already collated.

Same teacher (the one `distill prepare-tiny` built: recipe 2, 2 layers of width 256), same new student (2 layers, width 96, the
same seed), micro-batch 16 x 128 tokens, AdamW at the same learning rate and schedule. Step time
is the mean over the steps after the first fifth; peak memory is the process's peak RSS; quality
is the student's validation perplexity after the run (the same 64 sequences for every row).

The FLOP floor of the KD step is CE step x (1 + teacher forward FLOPs / (3 x student forward
FLOPs)), with forward FLOPs = 2 x (parameters outside the input embedding) x tokens + the
attention scores (4 x layers x seq_len x width per token).

Needs `distill prepare-tiny` and, for the TRL row, `pip install -e '.[bench]'`.

    python benchmarks/step_time.py [--steps 300] [--top-k 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
ROWS = ("plain_loop_ce", "distill_ce_only", "distill_kd", "distill_kd_store", "trl_gkd", "distill_kd_bf16", "trl_gkd_bf16", "ce_interleaved")
LOG_EVERY = 10  # a logged step also computes the zero-weight terms it reports; runs log every 25 by default


def _config(steps: int, out: Path, *extra: str):
    from distill.config import load_config

    return load_config(str(CONFIG), [f"train.max_steps={steps}", f"train.log_every={LOG_EVERY}", "train.eval_every=0", "train.save_every=0",
                                     "eval.at_end=false", "tracking.backend=none", f"output_dir={out}", *extra])


def _quality(student, cfg) -> dict:
    """The student's validation perplexity and KL to the teacher (the same sequences for every row)."""
    import torch

    from distill import evaluation, models
    from distill.setup import Setup, validation_sets

    class One:
        process_index, num_processes = 0, 1

    setup = Setup(cfg, torch.device("cpu"), load_teacher=False, load_student=False)
    batches = [b for bs in validation_sets(setup, cfg, One()).values() for b in bs]
    teacher = models.load_teacher(cfg.teacher, torch.device("cpu"))
    result = evaluation.quality(student, teacher, batches, vocab=min(len(setup.tokenizer), models.output_vocab(teacher)), device=torch.device("cpu"))
    return {"perplexity": result["perplexity"], "kl_to_teacher": result["kl_to_teacher"]}


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _mean_after_warmup(times: list[float]) -> float:
    kept = times[len(times) // 5:]
    return sum(kept) / len(kept)


def child_distill(name: str, steps: int, out: Path, store: str, overrides: list[str] = ()) -> dict:
    from transformers import AutoModelForCausalLM

    from distill.job import run

    extra = {"distill_ce_only": ["loss.alpha=1.0"], "distill_kd": [], "distill_kd_bf16": ["train.precision=bf16", "teacher.dtype=bfloat16"],
             "distill_kd_store": ["teacher.source=cache", f"teacher.cache={store}", f"teacher.cache_tail={os.environ.get('CACHE_TAIL', 'bucket')}"]}[name]
    cfg = _config(steps, out, *extra, *overrides)
    run(cfg, overwrite=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "train/step_seconds" in r]
    times = [r["train/step_seconds"] for r in records]  # each the mean of a window of LOG_EVERY steps
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    return {"seconds_per_step": _mean_after_warmup(times), "peak_rss_bytes": max(r["train/peak_memory_bytes"] for r in records),
            **_quality(student, cfg), "wall_seconds": LOG_EVERY * sum(times),
            "teacher_time_share": _mean_after_warmup([r["train/teacher_time_share"] for r in records])}


def _student_and_stream(cfg):
    import torch

    from distill import data
    from distill.setup import Setup

    setup = Setup(cfg, torch.device("cpu"), load_teacher=False)
    return setup, data.TrainStream(setup.train_sequences, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.data.seed,
                                   pad_id=setup.tokenizer.pad_token_id)


def _student_and_batches(cfg, steps: int):
    setup, stream = _student_and_stream(cfg)
    return setup, [stream.next_batch() for _ in range(steps)]


def _plain_step(model, optimizer, scheduler, batch: dict, max_norm: float) -> None:
    """The plain loop's step: the model's own loss, backward, clipping, AdamW, the schedule."""
    import torch

    x = batch["input_ids"]
    model(x, labels=x).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def child_plain(steps: int, out: Path) -> dict:
    from distill.train import build_optimizer, build_scheduler

    cfg = _config(steps, out)
    setup, batches = _student_and_batches(cfg, steps)
    model = setup.student.train()
    optimizer, times = build_optimizer(model, cfg.train), []
    scheduler = build_scheduler(optimizer, cfg.train)
    for batch in batches:
        start = time.perf_counter()
        _plain_step(model, optimizer, scheduler, batch, cfg.train.max_grad_norm)
        times.append(time.perf_counter() - start)
    return {"seconds_per_step": _mean_after_warmup(times), "peak_rss_bytes": _peak(), **_quality(model.eval(), cfg)}


def child_interleaved(steps: int, out: Path) -> dict:
    """This project's CE-only step and the plain loop's, alternating step by step in one process on
    the same batches (which goes first alternates too), so the machine's drift falls on both alike.
    This project's step is train_step on the collated batch, as the plain loop's is; its collation
    is timed apart (the loop around both, about 0.5 ms, is left out). Both models start from the same
    weights; both run under train.cpu_allocator."""
    import copy
    import statistics

    from distill.setup import make_accelerator, tune_cpu_allocator
    from distill.objective import Distillee, build_objective
    from distill.teacher_source import build_source
    from distill.train import build_optimizer, build_scheduler, train_step

    cfg = _config(steps, out, "loss.alpha=1.0")
    accelerator = make_accelerator(cfg)
    tune_cpu_allocator(cfg.train.cpu_allocator, accelerator.device)
    setup, stream = _student_and_stream(cfg)
    plain_model = copy.deepcopy(setup.student).train()
    task = setup.task
    objective = build_objective(cfg.loss, student=setup.student, teacher=None, causal=task.causal, task=task)
    model = Distillee(setup.student, objective, task, setup.vocab)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    plain_optimizer = build_optimizer(plain_model, cfg.train)
    plain_scheduler = build_scheduler(plain_optimizer, cfg.train)
    source = build_source("model", None, task, setup.vocab)
    times = {"distill": [], "plain": [], "collate": []}
    for step in range(steps):
        start = time.perf_counter()
        batch = stream.next_batch()
        times["collate"].append(time.perf_counter() - start)

        def ours():
            train_step(model, source, [batch], accelerator=accelerator, optimizer=optimizer, scheduler=scheduler, cfg=cfg, task=task,
                       objective=objective, report=(step + 1) % LOG_EVERY == 0)

        def plain():
            _plain_step(plain_model, plain_optimizer, plain_scheduler, batch, cfg.train.max_grad_norm)

        for name, fn in (("distill", ours), ("plain", plain)) if step % 2 == 0 else (("plain", plain), ("distill", ours)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    mean = {name: statistics.mean(t[len(t) // 5:]) for name, t in times.items()}
    ratios = [a / b for a, b in list(zip(times["distill"], times["plain"]))[steps // 5:]]
    return {"seconds_per_step": mean["distill"], "plain_seconds_per_step": mean["plain"], "collate_seconds": mean["collate"],
            "ratio_of_means": mean["distill"] / mean["plain"], "with_collation": (mean["distill"] + mean["collate"]) / mean["plain"],
            "median_step_ratio": statistics.median(ratios), "peak_rss_bytes": _peak(), "perplexity": float("nan")}


def child_trl(steps: int, out: Path, bf16: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distill import data, models

    cfg = _config(steps, out)
    setup, batches = _student_and_batches(cfg, steps)
    teacher = models.load_teacher(cfg.teacher, torch.device("cpu"))
    rows = [{"input_ids": b["input_ids"][i].tolist(), "labels": b["labels"][i].tolist()} for b in batches for i in range(len(b["input_ids"]))]
    times, marks = [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - marks["start"])

    args = GKDConfig(output_dir=str(out / "trl"), per_device_train_batch_size=cfg.train.micro_batch_size, max_steps=steps,
                     learning_rate=cfg.train.lr, lr_scheduler_type="cosine", warmup_steps=cfg.train.warmup_steps, adam_beta1=cfg.train.betas[0],
                     adam_beta2=cfg.train.betas[1], weight_decay=0.0, max_grad_norm=cfg.train.max_grad_norm, lmbda=0.0, beta=0.0, temperature=1.0,
                     seq_kd=False, report_to=[], save_strategy="no", logging_steps=50, use_cpu=True, dataloader_num_workers=0,
                     max_length=cfg.data.seq_len, seed=cfg.train.seed, data_seed=cfg.data.seed, disable_dropout=True,
                     bf16=bf16)  # TRL defaults to bf16 autocast, also on CPU: the fp32 row compares like with like
    trainer = GKDTrainer(model=setup.student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                         data_collator=lambda r: data.collate(r, setup.tokenizer.pad_token_id), processing_class=setup.tokenizer,
                         callbacks=[Clock()])
    trainer.train()
    return {"seconds_per_step": _mean_after_warmup(times), "peak_rss_bytes": _peak(), **_quality(trainer.model.eval(), cfg)}


def flop_floor_ratio() -> float:
    """1 + teacher forward FLOPs / (3 x student forward FLOPs) per token, from the two configs."""
    import torch

    from distill import models

    cfg = _config(100, Path("/tmp/unused"))

    def forward_flops(config, params: int) -> float:
        embed = config.vocab_size * config.hidden_size
        return 2 * (params - embed) + 4 * config.num_hidden_layers * cfg.data.seq_len * config.hidden_size

    teacher = models.load_teacher(cfg.teacher, torch.device("cpu"))
    student = models.build_student(cfg.student, cfg.teacher, seed=0, device=torch.device("cpu"))
    t = forward_flops(teacher.config, sum(p.numel() for p in teacher.parameters()))
    s = forward_flops(student.config, sum(p.numel() for p in student.parameters()))
    return 1 + t / (3 * s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="run every row this many times, in turn; each row reports its quickest round")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--child", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # more overrides of a child run (another seed)
    parser.add_argument("--same-allocator", action="store_true",
                        help="give every row glibc's settings of train.cpu_allocator=cached (through MALLOC_ variables), "
                             "not only this project's rows; writes step_time_same_allocator.json")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    work = args.out / "step_time_runs"
    if args.child:
        out = work / (args.name or args.child)
        if args.child == "plain_loop_ce":
            result = child_plain(args.steps, out)
        elif args.child == "ce_interleaved":
            result = child_interleaved(args.steps, out)
        elif args.child.startswith("trl_gkd"):
            result = child_trl(args.steps, out, bf16=args.child.endswith("bf16"))
        else:
            result = child_distill(args.child, args.steps, out, args.store, args.set)
        print(json.dumps(result))
        return
    store = work / f"store_k{args.top_k}"
    if "distill_kd_store" in args.rows and not (store / "manifest.json").is_file():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "distill_launcher.cli", "cache-teacher", str(CONFIG), "--top-k", str(args.top_k), "--out", str(store)],
                       check=True, cwd=REPO, capture_output=True)
        print(f"teacher store (k={args.top_k}) built in {time.perf_counter() - start:.0f} s")
    path = args.out / ("step_time_same_allocator.json" if args.same_allocator else "step_time.json")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if args.same_allocator:
        from distill.setup import HEAP_BLOCK_MAX, KEPT_FREE

        env.update(MALLOC_MMAP_THRESHOLD_=str(HEAP_BLOCK_MAX), MALLOC_TRIM_THRESHOLD_=str(KEPT_FREE))
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    results = earlier.get("results", {}) if earlier.get("steps") == args.steps else {}  # rows not rerun are kept
    # Rows in turn, --rounds times, each row keeping its quickest round: a shared machine's speed
    # drifts over minutes and other work only ever slows a run down.
    runs = {row: [] for row in args.rows}
    for _ in range(args.rounds):
        for row in args.rows:
            proc = subprocess.run([sys.executable, __file__, "--child", row, "--steps", str(args.steps), "--store", str(store), "--out", str(args.out)],
                                  capture_output=True, text=True, cwd=REPO, env=env)
            if proc.returncode != 0:
                results[row] = {"failed": proc.stderr.strip().splitlines()[-1][:300]}
                print(f"{row}: failed: {results[row]['failed']}")
                continue
            runs[row].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for row, measured in runs.items():
        if measured:
            results[row] = {**min(measured, key=lambda r: r["seconds_per_step"]), "seconds_per_step_rounds": [r["seconds_per_step"] for r in measured]}
    floor = flop_floor_ratio()
    ce = results.get("distill_ce_only", {}).get("seconds_per_step")
    trl = results.get("trl_gkd", {}).get("seconds_per_step")
    results = {row: results[row] for row in ROWS if row in results}
    interleaved = results.pop("ce_interleaved", None)
    print(f"{'step':<18} {'ms/step':>8} {'x TRL':>6} {'x CE-only':>9} {'steps/s':>8} {'peak RSS MB':>11} {'val ppl':>8}")
    for row, r in results.items():
        if "failed" in r:
            continue
        s = r["seconds_per_step"]
        vs_trl = f"{s / trl:.2f}" if trl else "-"
        vs_ce = f"{s / ce:.2f}" if ce else "-"
        print(f"{row:<18} {1000 * s:>8.1f} {vs_trl:>6} {vs_ce:>9} {1 / s:>8.2f} {r['peak_rss_bytes'] / 2**20:>11.0f} {r['perplexity']:>8.2f}")
    kd = results.get("distill_kd", {}).get("seconds_per_step")
    plain = results.get("plain_loop_ce", {}).get("seconds_per_step")
    summary = {"flop_floor_kd_over_ce": floor}
    if kd and ce:
        summary["kd_over_flop_floor"] = kd / (ce * floor)
    if ce and plain:
        summary["ce_only_over_plain_loop"] = ce / plain
    if kd and trl:
        summary["kd_over_trl"] = kd / trl
    if interleaved and "failed" not in interleaved:
        summary["ce_only_over_plain_loop_interleaved"] = interleaved["ratio_of_means"]
        summary["ce_only_with_collation_over_plain_loop_interleaved"] = interleaved["with_collation"]
        print(f"interleaved in one process, on the same collated batches: CE-only {1000 * interleaved['seconds_per_step']:.1f} ms, plain loop "
              f"{1000 * interleaved['plain_seconds_per_step']:.1f} ms (median step ratio {interleaved['median_step_ratio']:.3f}); "
              f"collation {1000 * interleaved['collate_seconds']:.1f} ms")
        results["ce_interleaved"] = interleaved
    store_s = results.get("distill_kd_store", {}).get("seconds_per_step")
    if store_s and trl:
        summary["store_steps_per_s_over_trl"] = trl / store_s
    for key, value in summary.items():
        print(f"{key}: {value:.2f}")
    print(f"{args.steps} steps each (the first fifth not timed), {args.rounds} round(s), tiny default, micro-batch 16 x 128, CPU ({os.cpu_count()} cores)")
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"steps": args.steps, "top_k": args.top_k, "rounds": args.rounds, "results": results, "summary": summary}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
