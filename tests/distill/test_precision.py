"""bf16 mixed precision and bitsandbytes 8-bit AdamW run and learn."""

import math

from conftest import read_metrics, run_job


def test_bf16_and_8bit_adamw(tiny, corpus, tmp_path):
    run_dir, result = run_job(tiny, corpus, tmp_path / "run", "train.precision=bf16", "train.optimizer=adamw_8bit",
                              "train.max_steps=8", "eval.speed=false", "teacher.dtype=bfloat16")
    losses = [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["student"]["kl_to_teacher"] < rows["initial_student"]["kl_to_teacher"]


def test_optimizer_choice():
    import torch

    from distill.config import TrainConfig
    from distill.train import build_optimizer

    model = torch.nn.Linear(4, 4)
    assert type(build_optimizer(model, TrainConfig(optimizer="adamw_8bit"))).__name__ == "AdamW8bit"
    assert type(build_optimizer(model, TrainConfig())) is torch.optim.AdamW
