"""``distill generate-teacher``: sequence-level distillation's data. The teacher completes the prompts of the
job's training rows (the prompt rule and sampling of ``rollout.*``) and the completions are written as a
dataset any job trains on (``data.train_files: [DIR]`` with ``data.prompt_field: prompt``, or a
``data.mixture`` source), content-addressed like the teacher store: ``identity.json`` names the teacher,
the tokenizer, the rows and the sampling; shards of ``--shard-rows`` rows are written whole or not at all,
shard ``i`` by process ``i % world_size``, each sampled from its own seed, so one process or many write
the same dataset and an interrupted build continues; ``manifest.json`` (with each shard's sha256) is
written last. ``--top-k K`` then builds a teacher store of the teacher's targets on those completions,
as a job reading the dataset tokenizes them, into ``DIR/store`` (``teacher.source: cache``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from distill.config import load_config
from distill.data import COMPLETIONS, completion_shards
from distill.errors import ConfigError, main_guard
from distill.generation import ENGINES
from distill.rollout import row_prompt
from distill.rundir import write_atomic
from distill.setup import Setup, tune_cpu_allocator
from distill.store import _claim, _sha256_file, _wait_for, cache_root, key_of, sequences_hash, teacher_identity

MANIFEST = "manifest.json"


def _shard_name(index: int) -> str:
    return f"completions-{index:08d}.jsonl"


def build(cfg, *, out: Path | None = None, shard_rows: int = 256, rank: int = 0, world_size: int = 1, device=None, log=print) -> Path:
    """Writes (or completes) the teacher's completions of the job's training prompts; returns the dataset's directory."""
    device = device or torch.device("cpu")
    if cfg.data.packing:
        raise ConfigError("generate-teacher completes the prompts of whole documents: set data.packing=false")
    tune_cpu_allocator(cfg.train.cpu_allocator, device)
    setup = Setup(cfg, device, load_teacher=True, load_student=False)
    tokenizer, r = setup.tokenizer, cfg.rollout
    sampling = {key: getattr(r, key) for key in ("max_new_tokens", "temperature", "top_p", "prompt_tokens")} | {"seed": cfg.train.seed}
    rows = [row for _, _, train, _ in setup.sources for row in train]  # every source's training rows, in order
    ident = {**teacher_identity(cfg, tokenizer), "kind": COMPLETIONS, "prompts": sequences_hash(rows), "sampling": sampling}
    key = key_of(ident)
    path = Path(os.path.expanduser(str(out or cache_root().parent / "completions" / key[:16])))
    _claim(path, ident, rank)
    engine = ENGINES["hf"](dataclasses.replace(r, engine="hf"), tokenizer=tokenizer, vocab=setup.task.width(setup.teacher, tokenizer))
    lead = int(tokenizer.bos_token_id is not None)
    count, start, done = max(1, -(-len(rows) // shard_rows)), time.perf_counter(), 0
    for index in range(rank, count, world_size):
        target = path / _shard_name(index)
        if target.exists():
            continue
        part = rows[index * shard_rows : (index + 1) * shard_rows]
        prompts = [row_prompt(row, lead=lead, prompt_tokens=r.prompt_tokens) for row in part]
        seed = int(hashlib.sha256(f"{key}/{index}".encode()).hexdigest()[:12], 16)
        written = []
        for j in range(0, len(prompts), cfg.train.micro_batch_size):
            batch = prompts[j : j + cfg.train.micro_batch_size]
            written += engine.generate(setup.teacher, batch, seed=seed + j)
        lines = []
        for prompt, completion in zip(prompts, written):
            finished = bool(completion) and completion[-1] == tokenizer.eos_token_id
            text = completion[:-1] if finished else completion  # a job's tokenizing adds the EOS again
            lines.append(json.dumps({"prompt": tokenizer.decode(prompt[lead:]), "text": tokenizer.decode(text), "finished": finished,
                                     "completion_tokens": len(completion)}) + "\n")
        write_atomic(target, "".join(lines))
        done += 1
    if done:
        log(f"generate-teacher: {done} shard(s) of completions written in {time.perf_counter() - start:.1f} s")
    if rank == 0:
        files = [path / _shard_name(i) for i in range(count)]
        _wait_for(lambda: all(f.exists() for f in files), "the other processes' shards")
        shards = [{"file": f.name, "rows": sum(1 for _ in open(f)), "sha256": _sha256_file(f)} for f in files]
        manifest = {"kind": COMPLETIONS, "key": key, "identity": ident, "shard_rows": shard_rows, "shards": shards}
        write_atomic(path / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    else:
        _wait_for(lambda: completion_shards(path) is not None, f"{path / MANIFEST} (written by rank 0)")
    return path


def completions_config(cfg, path: Path):
    """``cfg`` training on the completions at ``path`` (prompts masked), its validation data as before."""
    data = dataclasses.replace(cfg.data, train_files=[str(path)], dataset=None, mixture=[], prompt_field="prompt", text_field="text",
                               messages_field=None, augment=None, validation_files=cfg.data.validation_files or [])
    return dataclasses.replace(cfg, data=data)


def main(argv: list[str] | None = None) -> int:
    """``python -m distill.generate_teacher CONFIG [--out DIR] [--top-k K]``: one process (RANK/WORLD_SIZE from the launcher)."""
    parser = argparse.ArgumentParser(prog="distill generate-teacher")
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--shard-rows", type=int, default=256)
    args = parser.parse_args(argv)
    if args.shard_rows < 1 or (args.top_k is not None and args.top_k < 1):
        parser.error("--shard-rows and --top-k must be >= 1")

    def go(args):
        cfg = load_config(args.config, args.overrides)
        env = os.environ
        rank, world = int(env.get("RANK", env.get("SLURM_PROCID", 0))), int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
        local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        say = lambda line: print(line, file=sys.stderr)
        path = build(cfg, out=Path(args.out) if args.out else None, shard_rows=args.shard_rows, rank=rank, world_size=world, device=device, log=say)
        store = None
        if args.top_k:
            from distill.cache_teacher import build as build_store

            store = build_store(completions_config(cfg, path), k=args.top_k, out=path / "store", shard_rows=args.shard_rows, rank=rank,
                                world_size=world, device=device, log=say)
        if rank == 0:
            print(f"teacher completions: {path}" + (f"\nteacher store of them: {store}" if store else ""))
        return 0

    return main_guard(go, args)


if __name__ == "__main__":
    sys.exit(main())
