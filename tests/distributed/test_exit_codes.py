"""Every entry point ends a failed job with the same line and the same exit code (distill.errors):
in-process `distill run`, `python -m distill.job`, and the job under each launcher."""

import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, job_overrides


@pytest.fixture(scope="module")
def nan_teacher(tiny, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("nan") / "teacher"
    shutil.copytree(tiny["teacher"], path)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # poisons the KD loss from the first step
    model.save_pretrained(path)
    return path


ENTRY_POINTS = {
    "distill run": ["-m", "distill_launcher.cli", "run"],
    "python -m distill.job": ["-m", "distill.job"],
    "launch torchrun": ["-m", "distill_launcher.cli", "launch", "--launcher", "torchrun", "--nproc-per-node", "1", "--master-port", "29611"],
    "launch deepspeed": ["-m", "distill_launcher.cli", "launch", "--launcher", "deepspeed", "--nproc-per-node", "1", "--ds-config", "zero2",
                         "--master-port", "29612"],
}


@pytest.mark.slow
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_nonfinite_loss_exits_3_everywhere(tiny, corpus, tmp_path, nan_teacher, entry):
    config = tmp_path / "job.yaml"
    config.write_text("{}\n")
    out = tmp_path / "run"
    sets = [a for o in job_overrides(tiny, corpus, out, f"teacher.path={nan_teacher}", "train.max_steps=3", "eval.at_end=false")
            for a in ("--set", o)]
    argv = [sys.executable, *ENTRY_POINTS[entry]]
    argv = argv[:3] + [str(config)] + sets + argv[3:] if entry == "python -m distill.job" else argv + [str(config)] + sets
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, (entry, result.stderr[-3000:])
    assert "distill: error: non-finite loss at step 1; lower train.lr, check the data, or set train.on_nonfinite=skip" in result.stderr
