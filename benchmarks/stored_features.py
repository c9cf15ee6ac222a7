"""The teacher's hidden states from the store: a feature term trained from `distill cache-teacher --hidden-layers`
against the same term with the teacher in the process, on the tiny LM and on the real MiniLM example.

For each example and seed, five fresh `distill run`s with the same student, data order and steps:

    logits only, online                 the teacher in the process
    logits + hidden, online             the same, with the example's hidden term
    logits only, store                  the store's targets
    logits + hidden, store raw          the store's targets and the raw hidden states in float16
    logits + hidden, store int8 R       the store's targets and the states reduced to R dimensions (PCA), int8 + a scale a position

The hidden term's gain is the quality it adds over the logits-only student of the same teacher source; the
store's share is its gain over the online gain. Bytes a token are the hidden states' bytes in the training
shards over their positions, every stored layer. Step time: the mean of train/step_seconds after the first fifth.

    python benchmarks/stored_features.py [--example tiny minilm minilm-pretrained minilm-new] [--seeds 3] [--steps 300 150 150]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# MiniLM-L6 teacher (6 x 384), the student its layers 1, 3, 5: as wide as the teacher, compared in the store's R coordinates unprojected
MINILM = {"config": "configs/minilm_few_labels.yaml", "layers": [2, 4, 6], "dim": 32, "targets": [], "metric": "accuracy",
          "logits": "{kind: logits, name: kd, divergence: forward_kl, temperature: 4.0, weight: 0.8}, {kind: ce, weight: 0.2}",
          "hidden": "{kind: hidden, name: feat, layers: uniform, distance: cosine, weight: 1.0}",
          "sets": ["train.save_every=0", "eval.speed_repeats=1"]}
EXAMPLES = {
    # teacher 2 x 256 (Llama), new student 2 x 96: the projection maps 96 into the teacher's 256 (online) or into R (store)
    "tiny": {"config": "configs/tiny.yaml", "layers": [1, 2], "dim": 24, "targets": ["--targets", "mixed", "--top-k", "64"], "metric": "perplexity",
             "logits": "{kind: logits, name: kd, divergence: forward_kl}",
             "hidden": "{kind: hidden, name: feat, layers: uniform, distance: cosine, weight: 1.0}",
             "sets": ["eval.baseline=", "train.eval_every=0", "train.save_every=0", "tracking.backend=none", "eval.speed_repeats=1"]},
    "minilm": MINILM,
    # The teacher's layers 1, 3, 5 as MiniLM had them before the teacher's fine-tuning (DistilBERT starts from the pretrained BERT,
    # not the fine-tuned one): the features it has still differ from the teacher's, and the hidden term has something to teach
    "minilm-pretrained": {**MINILM, "sets": [*MINILM["sets"], "student.init_from=~/.cache/distill/minilm/pretrained"]},
    # The same data and teacher, a new student (3 x 192, random weights): what the teacher's features teach a student that does not
    # start from them; the projection maps 192 into the teacher's 384 (online) or into R (store)
    "minilm-new": {**MINILM, "sets": [*MINILM["sets"], "student.init=random", "student.init_layers=[]", "train.lr=5e-4",
                                      "student.architecture={num_hidden_layers: 3, hidden_size: 192, intermediate_size: 768, num_attention_heads: 6}"]},
}
ROWS = ["logits only, online", "logits + hidden, online", "logits only, store", "logits + hidden, store raw", "logits + hidden, store int8"]


def cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "distill_launcher.cli", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"distill {args[0]} failed: {proc.stderr.strip().splitlines()[-1]}")


def store(example: dict, out: Path, dim: int | None, dtype: str) -> dict:
    from safetensors import safe_open

    if not (out / "manifest.json").is_file():
        cli("cache-teacher", str(REPO / example["config"]), *example["targets"], "--hidden-layers", ",".join(map(str, example["layers"])),
            "--hidden-dtype", dtype, *(["--hidden-dim", str(dim)] if dim else []), "--out", str(out))
    hidden = positions = 0
    for shard in sorted((out / "training").rglob("shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if name.startswith("hidden.") or name.startswith("hidden_scale."):
                    tensor = f.get_slice(name)
                    shape = tensor.get_shape()
                    hidden += (1 if tensor.get_dtype() in ("I8", "U8") else 2) * (shape[0] * (shape[1] if len(shape) > 1 else 1))
            positions += int(f.get_tensor("hidden_offsets")[-1])
    return {"path": str(out), "hidden_bytes_per_position": hidden / positions, "positions": positions}


def train(example: dict, name: str, row: str, seed: int, steps: int, stores: dict, out: Path) -> dict:
    run_dir = out / f"{name}-{row.replace(' ', '_').replace(',', '').replace('+', 'plus')}-seed{seed}"
    hidden = "hidden" in row
    terms = f"loss.terms=[{example['logits']}{', ' + example['hidden'] if hidden else ''}]"
    sets = [*example["sets"], terms, f"train.max_steps={steps}", f"train.seed={seed}", f"data.seed={seed}", f"output_dir={run_dir}"]
    if "store" in row:
        sets += ["teacher.source=cache", f"teacher.cache={stores['int8' if 'int8' in row else 'raw']['path']}"]
    if not (run_dir / "eval.json").is_file():
        cli("run", str(REPO / example["config"]), "--overwrite", *[a for s in sets for a in ("--set", s)])
    result = json.loads((run_dir / "eval.json").read_text())
    student = {r["model"]: r for r in result["rows"]}["student"]
    seconds = [m["train/step_seconds"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if "train/step_seconds" in m and m["step"] > steps // 5]
    return {"row": row, "seed": seed, "quality": student[example["metric"]], "kl_to_teacher": student["kl_to_teacher"],
            "step_seconds": statistics.mean(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", nargs="+", default=list(EXAMPLES), choices=list(EXAMPLES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 150, 150], help="per example, in --example's order")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    work = args.out / "stored_features_runs"
    path = args.out / "stored_features.json"
    report = json.loads(path.read_text()) if path.is_file() else {}  # an example run alone keeps the other's figures
    for name, steps in zip(args.example, args.steps + args.steps[-1:] * len(args.example)):
        example = EXAMPLES[name]
        if name == "tiny":
            cli("prepare-tiny")
        else:
            cli("prepare-minilm")
        held = name.split("-")[0]  # the stores hold the teacher's signal: one for every student of an example's teacher and data
        stores = {"raw": store(example, work / f"{held}-store-raw", None, "fp16"), "int8": store(example, work / f"{held}-store-int8", example["dim"], "int8")}
        runs = [train(example, name, row, seed, steps, stores, work) for seed in range(args.seeds) for row in ROWS]
        lower_better = example["metric"] == "perplexity"
        table = []
        for row in ROWS:
            mine = [r for r in runs if r["row"] == row]
            table.append({"row": row, "quality": statistics.mean(r["quality"] for r in mine), "by_seed": [r["quality"] for r in mine],
                          "kl_to_teacher": statistics.mean(r["kl_to_teacher"] for r in mine), "step_seconds": statistics.mean(r["step_seconds"] for r in mine)})
        by = {t["row"]: t for t in table}

        def gain(with_hidden: str, without: str) -> list[float]:
            a, b = by[with_hidden]["by_seed"], by[without]["by_seed"]
            return [(y - x) if lower_better else (x - y) for x, y in zip(a, b)]

        online = gain("logits + hidden, online", "logits only, online")
        shares = {}
        for kind in ("raw", "int8"):
            cached = gain(f"logits + hidden, store {kind}", "logits only, store")
            shares[kind] = {"gain_by_seed": cached, "share_of_online_gain": statistics.mean(cached) / statistics.mean(online) if statistics.mean(online) else None}
        raw_fp16 = stores["raw"]["hidden_bytes_per_position"]  # the raw store is float16 already
        print(f"\n{name}: {steps} steps, {args.seeds} seeds; hidden layers {example['layers']}, R = {example['dim']}; {example['metric']} "
              f"({'lower' if lower_better else 'higher'} is better)")
        print(f"{'row':<34} {example['metric']:>11} {'by seed':>30} {'KL to teacher':>14} {'ms/step':>8} {'hidden B/token':>15}")
        for t in table:
            size = stores["int8"]["hidden_bytes_per_position"] if "int8" in t["row"] else raw_fp16 if "store raw" in t["row"] else None
            seeds = ", ".join(f"{q:.4g}" for q in t["by_seed"])
            print(f"{t['row']:<34} {t['quality']:>11.4g} {seeds:>30} {t['kl_to_teacher']:>14.4f} {t['step_seconds'] * 1e3:>8.1f} "
                  f"{'' if size is None else f'{size:.1f}':>15}")
        print(f"online hidden gain by seed: {', '.join(f'{g:+.4g}' for g in online)}")
        for kind, share in shares.items():
            print(f"store {kind}: gain by seed {', '.join(f'{g:+.4g}' for g in share['gain_by_seed'])}; share of the online gain "
                  f"{share['share_of_online_gain'] if share['share_of_online_gain'] is None else format(share['share_of_online_gain'], '.0%')}")
        print(f"int8 R={example['dim']}: {stores['int8']['hidden_bytes_per_position']:.1f} bytes a token against {raw_fp16:.1f} raw float16 "
              f"(1/{raw_fp16 / stores['int8']['hidden_bytes_per_position']:.1f})")
        report[name] = {"steps": steps, "seeds": args.seeds, "layers": example["layers"], "dim": example["dim"], "metric": example["metric"],
                        "table": table, "online_gain_by_seed": online, "store": shares, "stores": stores}
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
