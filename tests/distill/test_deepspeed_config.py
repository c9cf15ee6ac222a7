"""The job fills the "auto" values it owns in a DeepSpeed config and refuses contradictions."""

import json

import pytest

from distill.config import ConfigError, load_config
from distill.job import deepspeed_config
from distill_launcher.launch import REPO_DS_CONFIGS

BASE = ["teacher.path=t", "student.architecture={num_hidden_layers: 1}", "data.train_files=[a.txt]",
        "train.micro_batch_size=3", "train.grad_accum=4", "train.max_grad_norm=0.5", "train.precision=bf16"]


@pytest.mark.parametrize("path", sorted(REPO_DS_CONFIGS.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_configs_are_filled(path):
    ds = deepspeed_config(str(path), load_config(None, BASE), world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert "auto" not in json.dumps({k: v for k, v in ds.items() if k != "zero_optimization"})


def test_contradictions_and_unsupported_combinations(tmp_path):
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=16 but the job has 3"):
        deepspeed_config(str(fixed), load_config(None, BASE), world_size=1)
    with pytest.raises(ConfigError, match="train.on_nonfinite=skip is not supported under DeepSpeed"):
        deepspeed_config(str(REPO_DS_CONFIGS / "zero2.json"), load_config(None, BASE + ["train.on_nonfinite=skip"]), world_size=1)
    with pytest.raises(ConfigError, match="adamw_8bit cannot be combined"):
        deepspeed_config(str(REPO_DS_CONFIGS / "zero3_offload.json"), load_config(None, BASE + ["train.optimizer=adamw_8bit"]), world_size=1)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        deepspeed_config(str(broken), load_config(None, BASE), world_size=1)
