"""The teacher store on the tiny default: what it costs to build, its size per token, the step time
it gives, and the student it trains, against the online teacher (dense logits) and CE only.

Each training row is a fresh `distill run` of configs/tiny.yaml for the same steps (forward KL,
T=1); the store rows train from `distill cache-teacher --top-k K` stores, with the tail mass as
one bucket or spread evenly (`teacher.cache_tail`), from `--targets sampled` stores (k ids
drawn from the teacher, kept with their frequencies) and from `--targets mixed` stores (the top k/2
exactly, k/2 drawn from the rest), and from stores in the compact encodings (`--encoding q8|q4`: quantized
exact log-probabilities, drawn ids as counts, bit-packed ids; `--encoded METHOD:K:ENCODING`). The build time is set
against the teacher's share of a dense-KD run (train/teacher_time_share x its wall time).
Bytes per token are the store's training shards over their targets, against dense float16
logits (2 x vocabulary bytes), here and as they would be at V=32,000 (int16 ids) and V=128,256 (int32 ids);
for every store, bytes per token at V=128,256 (the ids' width grows; a sampled id's count does not) and what
1T tokens of it would take.

    python benchmarks/teacher_cache.py [--steps 300] [--top-k 8 64] [--seeds 3] [--encoded mixed:32:q8 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
STEP_TIME = Path(__file__).with_name("step_time.py")


def build_store(k: int, out: Path, method: str = "top_k", encoding: str = "fp16") -> dict:
    import math

    from safetensors.torch import load_file

    from distill.encodings.base import width_of
    from distill.store import Store

    if not (out / "manifest.json").is_file():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "distill_launcher.cli", "cache-teacher", str(CONFIG), "--top-k", str(k), "--targets", method,
                        "--encoding", encoding, "--out", str(out)], check=True, cwd=REPO, capture_output=True)
        (out / "build_seconds.txt").write_text(f"{time.perf_counter() - start}\n")
    shards = sorted((out / "training").rglob("shard-*.safetensors"))
    targets = sum(int(load_file(str(f))["offsets"][-1]) for f in shards)
    size = sum(f.stat().st_size for f in shards)
    vocab = json.loads((out / "manifest.json").read_text())["identity"]["targets"]["vocab"]
    store = Store(out)
    ids = store.k  # ids a token holds (padding of ids never drawn is not stored by q8/q4)
    if encoding != "fp16":
        held = [store.rows("training", "data", [row]).logprobs for row in range(0, 256, 8)]
        ids = sum(float((h > -math.inf).sum()) for h in held) / sum(len(h) for h in held)
    at_128k = size / targets + (ids * (width_of(128_255) - width_of(vocab - 1)) / 8 if encoding != "fp16" else k * 2)
    return {"k": k, "method": method, "encoding": encoding, "build_seconds": float((out / "build_seconds.txt").read_text()), "bytes": size,
            "targets": targets, "bytes_per_token": size / targets, "dense_fp16_bytes_per_token": 2 * vocab, "vocab": vocab, "ids_per_token": ids,
            "bytes_per_token_at_128256": at_128k, "terabytes_per_1t_tokens_at_128256": at_128k}


def train(row: str, name: str, steps: int, store: Path | None, out: Path, tail: str = "bucket", seed: int = 0) -> dict:
    argv = [sys.executable, str(STEP_TIME), "--child", row, "--name", name, "--steps", str(steps), "--out", str(out)]
    if seed:  # another student initialization and data order
        argv += ["--set", f"train.seed={seed}", "--set", f"data.seed={seed}"]
    if store is not None:
        argv += ["--store", str(store)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled", "CACHE_TAIL": tail})
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--top-k", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--sampled", type=int, nargs="*", default=[64], help="also stores of this many sampled ids per token (Sparse Logit Sampling)")
    parser.add_argument("--mixed", type=int, nargs="*", default=[64], help="also stores of the top k/2 ids and k/2 sampled from the rest")
    parser.add_argument("--encoded", nargs="*", default=["sampled:64:q8", "mixed:64:q8", "mixed:32:q8", "mixed:32:q4", "mixed:64:q4", "top_k:64:q8"],
                        help="also stores in a compact encoding, as METHOD:K:ENCODING")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train CE, dense, top-k (bucket tail), sampled and mixed students from this many seeds; their mean ratios to dense are reported")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    work = args.out / "teacher_cache_runs"
    stores = {k: build_store(k, work / f"store_k{k}") for k in args.top_k}
    sampled = {k: build_store(k, work / f"store_sampled_k{k}", "sampled") for k in args.sampled}
    mixed = {k: build_store(k, work / f"store_mixed_k{k}", "mixed") for k in args.mixed}
    specs = [(method, int(k), encoding) for method, k, encoding in (spec.split(":") for spec in args.encoded)]
    held = {"top_k": lambda k: f"top-{k}", "sampled": lambda k: f"{k} sampled", "mixed": lambda k: f"top-{k // 2} + {k - k // 2} sampled"}
    encoded = {f"store, {held[m](k)}, {e}": (m, k, e, work / f"store_{m}_k{k}_{e}") for m, k, e in specs}
    encoded_stores = {name: build_store(k, path, m, e) for name, (m, k, e, path) in encoded.items()}
    # Each training row: (step_time.py row, store, run name, tail); the uniform-tail rows are trained from seed 0 only.
    kinds = {"CE only": ("distill_ce_only", None, "ce_only", "bucket"), "online teacher (dense)": ("distill_kd", None, "dense", "bucket"),
             **{f"store, top-{k}, {tail} tail": ("distill_kd_store", work / f"store_k{k}", f"store_k{k}_{tail}", tail)
                for k in args.top_k for tail in ("bucket", "uniform")},
             **{f"store, {k} sampled": ("distill_kd_store", work / f"store_sampled_k{k}", f"store_sampled_k{k}", "bucket") for k in args.sampled},
             **{f"store, top-{k // 2} + {k - k // 2} sampled": ("distill_kd_store", work / f"store_mixed_k{k}", f"store_mixed_k{k}", "bucket")
                for k in args.mixed},
             **{name: ("distill_kd_store", path, path.name, "bucket") for name, (_, _, _, path) in encoded.items()}}
    rows = {name: train(row, label, args.steps, store, args.out, tail) for name, (row, store, label, tail) in kinds.items()}
    ce, dense = rows["CE only"], rows["online teacher (dense)"]
    print(f"{'training':<30} {'ms/step':>8} {'x CE-only':>9} {'val ppl':>8} {'x dense':>8} {'KL to T':>8} {'x dense':>8}")
    for name, r in rows.items():
        print(f"{name:<30} {1000 * r['seconds_per_step']:>8.1f} {r['seconds_per_step'] / ce['seconds_per_step']:>9.2f} "
              f"{r['perplexity']:>8.2f} {r['perplexity'] / dense['perplexity']:>8.3f} {r['kl_to_teacher']:>8.4f} {r['kl_to_teacher'] / dense['kl_to_teacher']:>8.3f}")
    seeds = {}
    if args.seeds > 1:  # one seed's student differs from another's by a few percent: the quality goals are means
        import statistics

        runs = {name: [rows[name]] + [train(row, f"{label}_seed{seed}", args.steps, store, args.out, tail, seed=seed) for seed in range(1, args.seeds)]
                for name, (row, store, label, tail) in kinds.items() if tail == "bucket"}
        print(f"\nmeans over {args.seeds} seeds (train.seed = data.seed = 0..{args.seeds - 1})")
        print(f"{'training':<30} {'val ppl':>8} {'x dense':>8} {'KL to T':>8} {'x dense':>8}  per seed: ppl x dense, KL x dense")
        for name, results in runs.items():
            ppl = [r["perplexity"] / d["perplexity"] for r, d in zip(results, runs["online teacher (dense)"])]
            kl = [r["kl_to_teacher"] / d["kl_to_teacher"] for r, d in zip(results, runs["online teacher (dense)"])]
            seeds[name] = {"perplexity": statistics.mean(r["perplexity"] for r in results), "kl_to_teacher": statistics.mean(r["kl_to_teacher"] for r in results),
                           "perplexity_vs_dense": statistics.mean(ppl), "kl_vs_dense": statistics.mean(kl), "per_seed": results}
            print(f"{name:<30} {seeds[name]['perplexity']:>8.2f} {statistics.mean(ppl):>8.3f} {seeds[name]['kl_to_teacher']:>8.4f} {statistics.mean(kl):>8.3f}  "
                  + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(ppl, kl)))
    teacher_seconds = dense["teacher_time_share"] * dense["wall_seconds"]
    print()
    print(f"{'store':<10} {'bytes/token':>11} {'dense fp16':>10} {'ratio':>8} {'@32k':>8} {'@128k':>8} {'build s':>8} {'x dense teacher s':>17}")
    for k, s in stores.items():
        at = lambda vocab: (k * (2 if vocab <= 32767 else 4) + k * 2 + 4) / (2 * vocab)
        s.update(ratio=s["bytes_per_token"] / s["dense_fp16_bytes_per_token"], ratio_at_32000=at(32000), ratio_at_128256=at(128256),
                 build_over_dense_teacher_seconds=s["build_seconds"] / max(teacher_seconds, 1e-9))
        print(f"top-{k:<6} {s['bytes_per_token']:>11.1f} {s['dense_fp16_bytes_per_token']:>10} {s['ratio']:>8.4f} "
              f"{s['ratio_at_32000']:>8.5f} {s['ratio_at_128256']:>8.5f} {s['build_seconds']:>8.0f} {s['build_over_dense_teacher_seconds']:>17.2f}")
    print(f"\n{'store':<36} {'bytes/token':>11} {'ids/token':>9} {'@128k':>8} {'TB at 1T tokens, 128k':>22} {'val ppl x dense':>16} {'KL x dense':>11}")
    every = {**{f"store, top-{k}, bucket tail": s for k, s in stores.items()}, **{f"store, {k} sampled": s for k, s in sampled.items()},
             **{f"store, top-{k // 2} + {k - k // 2} sampled": s for k, s in mixed.items()}, **encoded_stores}
    for name, s in every.items():
        quality = seeds.get(name) or {}
        if not quality and name in rows:
            quality = {"perplexity_vs_dense": rows[name]["perplexity"] / dense["perplexity"], "kl_vs_dense": rows[name]["kl_to_teacher"] / dense["kl_to_teacher"]}
        s.update({f"quality_{key}": value for key, value in quality.items() if key.endswith("vs_dense")})
        print(f"{name:<36} {s['bytes_per_token']:>11.1f} {s['ids_per_token']:>9.1f} {s['bytes_per_token_at_128256']:>8.1f} "
              f"{s['terabytes_per_1t_tokens_at_128256']:>22.1f} {quality.get('perplexity_vs_dense', float('nan')):>16.3f} {quality.get('kl_vs_dense', float('nan')):>11.3f}")
    print(f"{args.steps} steps each, tiny default (V={stores[args.top_k[0]]['vocab']}), CPU; the dense run's teacher time: {teacher_seconds:.0f} s "
          f"(it sees {args.steps * 16} sequences; the store covers all training and validation sequences)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "teacher_cache.json"
    path.write_text(json.dumps({"steps": args.steps, "rows": rows, "stores": stores, "sampled_stores": sampled, "mixed_stores": mixed, "encoded_stores": encoded_stores, "seeds": args.seeds, "means_over_seeds": seeds},
                               indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
