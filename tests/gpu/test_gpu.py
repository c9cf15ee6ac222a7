"""The tiny default on one CUDA GPU: mixed precision, bitsandbytes' CUDA kernels, ZeRO over NCCL.

Marked ``gpu`` and skipped, with the reason, where no CUDA device is visible (CI and the dev
machines have none). On a GPU machine: ``pytest -m gpu``.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, job_overrides, read_metrics, run_job

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible)")]


def finite_and_decreasing(run_dir):
    losses = [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]
    return all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("precision, dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_mixed_precision_on_one_gpu(tiny, corpus, tmp_path, precision, dtype):
    run_dir, result = run_job(tiny, corpus, tmp_path / "run", f"train.precision={precision}", f"teacher.dtype={dtype}",
                              "train.max_steps=12", "eval.speed=true")
    assert finite_and_decreasing(run_dir)
    metrics = read_metrics(run_dir)
    # Peak CUDA memory (torch.cuda.max_memory_allocated), not the host's RSS.
    assert all(0 < m["train/peak_memory_bytes"] <= torch.cuda.get_device_properties(0).total_memory for m in metrics if "train/loss" in m)
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["student"]["kl_to_teacher"] < rows["initial_student"]["kl_to_teacher"]
    assert rows["student"]["throughput_tokens_per_s"] > 0


@pytest.mark.parametrize("bits, module", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_teacher_through_cuda_kernels(tiny, corpus, tmp_path, bits, module):
    run_dir, result = run_job(tiny, corpus, tmp_path / "run", f"teacher.quantization={bits}", "teacher.dtype=bfloat16",
                              "train.precision=bf16", "train.max_steps=12", "eval.speed=false")
    assert finite_and_decreasing(run_dir)
    teacher = next(r for r in result["rows"] if r["model"] == "teacher")
    assert teacher["quantization"] == bits and teacher["memory_bytes"] < result["teacher_full_memory_bytes"]
    # Quantization error is real but small: KL(full || quantized) per token.
    assert 0 < result["teacher_fidelity_kl"] < 0.1, result["teacher_fidelity_kl"]


@pytest.mark.parametrize("ds_config", ["zero2", "zero3"])
def test_zero_on_one_gpu_over_nccl(tiny, corpus, tmp_path, ds_config):
    out = tmp_path / "run"
    config = tmp_path / "job.yaml"
    config.write_text("{}\n")
    sets = [a for o in job_overrides(tiny, corpus, out, "train.precision=bf16", "teacher.dtype=bfloat16", "train.max_steps=12",
                                     "train.save_every=6") for a in ("--set", o)]
    result = subprocess.run([sys.executable, "-m", "distill_launcher.cli", "launch", str(config), *sets, "--launcher", "deepspeed",
                             "--nproc-per-node", "1", "--ds-config", ds_config], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "nccl" in (result.stdout + result.stderr).lower()
    assert finite_and_decreasing(out)
    # The gathered student loads back with plain from_pretrained and was evaluated.
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "student").cuda()
    assert torch.isfinite(student(torch.tensor([[1, 2, 3]], device="cuda")).logits).all()
    rows = {r["model"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}
    assert rows["student"]["kl_to_teacher"] < rows["initial_student"]["kl_to_teacher"]


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_feature_terms_with_a_quantized_teacher_in_bf16(tiny, corpus, tmp_path, bits):
    """Hidden states and q/k/v of a bitsandbytes teacher on CUDA, against a bf16 student with a projection."""
    terms = "loss.terms=[{kind: logits}, {kind: hidden, weight: 1.0}, {kind: attention, name: att, mode: relations, relation_heads: 2}]"
    run_dir, _ = run_job(tiny, corpus, tmp_path / "run", terms, f"teacher.quantization={bits}", "teacher.dtype=bfloat16",
                         "train.precision=bf16", "train.max_steps=12", "eval.speed=false")
    assert finite_and_decreasing(run_dir)
    assert all(m["train/hidden_loss"] > 0 and m["train/att_loss"] > 0 for m in read_metrics(run_dir) if "train/loss" in m)
    assert (run_dir / "objective" / "model.safetensors").is_file()


@pytest.mark.parametrize("bits", ["none", "4bit"])
def test_fused_loss_in_bf16_follows_full_logits(tiny, corpus, tmp_path, bits):
    from conftest import reset_accelerate

    curves = {}
    for fused in ("always", "never"):
        reset_accelerate()
        run_dir, _ = run_job(tiny, corpus, tmp_path / fused, "train.precision=bf16", "teacher.dtype=bfloat16", f"teacher.quantization={bits}",
                             f"loss.fused={fused}", "loss.alpha=0.2", "train.max_steps=8", "eval.at_end=false")
        metrics = [m for m in read_metrics(run_dir) if "train/loss" in m]
        assert all(m["train/teacher_time_share"] > 0 for m in metrics)  # synchronized: the teacher's CUDA work is timed
        curves[fused] = [m["train/loss"] for m in metrics]
    assert curves["always"] == pytest.approx(curves["never"], rel=2e-2)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("vllm"), reason="needs vLLM (pip install -e '.[vllm]')")
def test_the_vllm_engine_serves_the_builtin_engines_targets(tiny, corpus, tmp_path):
    """Both engines, the same teacher and batch: the same top-k ids (ties aside) and log-probabilities."""
    from distill import data
    from distill.config import load_config
    from distill.job import Setup
    from distill.serve import BuiltinEngine, VllmEngine

    cfg = load_config(None, job_overrides(tiny, corpus, tmp_path / "x", "teacher.dtype=float32"))
    setup = Setup(cfg, torch.device("cpu"), load_teacher=False, load_student=False)
    batch = data.collate(data.rows_at(setup.train_sequences, [0, 1, 2, 3]), setup.tokenizer.pad_token_id)
    batch = {name: batch[name] for name in ("input_ids", "attention_mask", "labels")}
    builtin, counts = BuiltinEngine(cfg, 8, torch.device("cuda")).targets(batch)
    served, served_counts = VllmEngine(cfg, 8, torch.device("cuda")).targets(batch)
    assert served_counts == counts
    same = (served.ids.long() == builtin.ids).float().mean().item()
    assert same > 0.98, same
    torch.testing.assert_close(served.logprobs.float()[:, 0], builtin.logprobs.float()[:, 0], rtol=0, atol=2e-2)
    torch.testing.assert_close(served.tail.exp(), builtin.tail.exp(), rtol=0, atol=2e-2)


def test_vllm_writes_the_students_completions_with_its_current_weights(tiny, corpus, tmp_path):
    """rollout.engine=vllm: a vLLM engine beside the student, given its weights every step. Greedy, so vLLM's completions
    equal transformers' generate on the same weights; and what it writes changes as the student trains."""
    pytest.importorskip("vllm", reason="needs vllm (pip install vllm)")
    on_policy = ("data.packing=false", "rollout.on_policy=1", "rollout.temperature=0", "rollout.max_new_tokens=16", "rollout.prompt_tokens=8",
                 "rollout.samples=2", "train.eval_every=3", "train.max_steps=6", "eval.at_end=false", "rollout.vllm_gpu_memory_utilization=0.2")
    fast, _ = run_job(tiny, corpus, tmp_path / "vllm", *on_policy, "rollout.engine=vllm")
    from conftest import reset_accelerate

    reset_accelerate()
    plain, _ = run_job(tiny, corpus, tmp_path / "hf", *on_policy, "rollout.engine=hf")
    read = lambda run: [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in read(fast)][:2] == [r["completion"] for r in read(plain)][:2]
    assert read(fast)[0]["completion"] != read(fast)[2]["completion"]
    assert finite_and_decreasing(fast)
