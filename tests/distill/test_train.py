"""The training loop's invariants: accumulation does not change the update; the teacher never moves."""

import hashlib
import subprocess
import sys

import pytest
import torch

from conftest import job_overrides, read_metrics, run_job
from distill import data
from distill.config import load_config
from distill.job import Setup, make_accelerator
from distill.objective import Distillee, build_objective
from distill.tasks import CausalLM
from distill.teacher_source import ModelSource
from distill.train import build_optimizer, build_scheduler, train_step


def test_accumulation_invariance(tiny, corpus, tmp_path):
    """Micro-batch 8 x 1 step and micro-batch 1 x 8 accumulation give the same loss and update.

    Unpacked, variable-length sequences: a per-micro-batch mean would differ, the step-wide
    token normalization must not.
    """
    common = ("data.packing=false", "data.seq_len=48", "train.max_steps=2", "train.max_grad_norm=0", "eval.at_end=false", "loss.alpha=0.3")
    big, _ = run_job(tiny, corpus, tmp_path / "big", *common, "train.micro_batch_size=8", "train.grad_accum=1")
    small, _ = run_job(tiny, corpus, tmp_path / "small", *common, "train.micro_batch_size=1", "train.grad_accum=8")
    big_metrics, small_metrics = read_metrics(big), read_metrics(small)
    assert len(big_metrics) == len(small_metrics) == 2
    for a, b in zip(big_metrics, small_metrics):
        for key in ("train/loss", "train/kd_loss", "train/ce_loss", "train/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    from safetensors.torch import load_file

    big_weights, small_weights = load_file(big / "student" / "model.safetensors"), load_file(small / "student" / "model.safetensors")
    for name in big_weights:
        torch.testing.assert_close(big_weights[name], small_weights[name], rtol=1e-4, atol=1e-6)


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_teacher_stays_frozen(tiny, corpus, tmp_path):
    cfg = load_config(None, job_overrides(tiny, corpus, tmp_path / "run", "train.lr=1e-2"))
    accelerator = make_accelerator(cfg)
    setup = Setup(cfg, accelerator.device)
    teacher, student = setup.teacher, setup.student
    before = _digest(teacher)
    task = CausalLM()
    model = Distillee(student, build_objective(cfg.loss), task, setup.vocab)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_params for group in optimizer.param_groups for p in group["params"])
    stream = data.TrainStream(setup.train_sequences, micro_batch_size=4, seed=0, pad_id=setup.tokenizer.pad_token_id)
    student_before = _digest(student)
    source = ModelSource(teacher, task, setup.vocab)
    for _ in range(3):
        train_step(model, source, [stream.next_batch()], accelerator=accelerator, optimizer=optimizer, scheduler=scheduler,
                   cfg=cfg, task=task, objective=accelerator.unwrap_model(model).objective)
    assert _digest(teacher) == before
    assert _digest(student) != student_before
    assert not teacher.training
    assert not any(p.requires_grad or p.grad is not None for p in teacher.parameters())


def test_kd_loss_falls_and_student_matches_teacher_better(tiny, corpus, tmp_path):
    run_dir, result = run_job(tiny, corpus, tmp_path / "run", "train.max_steps=25", "train.log_every=5", "eval.speed=false")
    metrics = [m for m in read_metrics(run_dir) if "train/loss" in m]
    assert metrics[-1]["train/kd_loss"] < 0.7 * metrics[0]["train/kd_loss"]
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["student"]["kl_to_teacher"] < 0.7 * rows["initial_student"]["kl_to_teacher"]
    assert rows["student"]["top1_agreement"] > rows["initial_student"]["top1_agreement"]


def test_train_stream_is_deterministic_and_resumable(tiny, corpus):
    cfg = load_config(None, job_overrides(tiny, corpus, "unused"))
    from distill.models import load_tokenizer

    tokenizer = load_tokenizer(tiny["teacher"], "teacher.path")
    raw, _ = data.load_raw(cfg.data)
    sequences = data.tokenize(raw, tokenizer, cfg.data, "training")
    full = data.TrainStream(sequences, micro_batch_size=3, seed=5, pad_id=0)
    batches = [full.next_batch()["input_ids"] for _ in range(len(sequences))]  # crosses an epoch boundary
    resumed = data.TrainStream(sequences, micro_batch_size=3, seed=5, pad_id=0, samples_consumed=3 * 7)
    torch.testing.assert_close(resumed.next_batch()["input_ids"], batches[7])
    # Two ranks together see what one rank sees at twice the micro-batch.
    rank0 = data.TrainStream(sequences, micro_batch_size=3, seed=5, pad_id=0, rank=0, world_size=2)
    rank1 = data.TrainStream(sequences, micro_batch_size=3, seed=5, pad_id=0, rank=1, world_size=2)
    double = data.TrainStream(sequences, micro_batch_size=6, seed=5, pad_id=0)
    torch.testing.assert_close(torch.cat([rank0.next_batch()["input_ids"], rank1.next_batch()["input_ids"]]), double.next_batch()["input_ids"])


ALLOCATION_PROBE = """
import ctypes, sys
import torch
from distill.job import tune_cpu_allocator

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
applied = tune_cpu_allocator(sys.argv[1], sys.argv[2])
mapped = libc.mallinfo2().hblkhd
chunk = torch.empty(2**21)  # 8 MiB, a chunk of logits
grown = libc.mallinfo2().hblkhd - mapped
del chunk
kept = libc.mallinfo2().fordblks
print(applied, grown, kept)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("mode, device, cached", [("cached", "cpu", True), ("system", "cpu", False), ("cached", "cuda", False)])
def test_cpu_allocator_keeps_freed_tensor_memory_in_the_process(mode, device, cached):
    """train.cpu_allocator=cached: an 8 MiB tensor comes from the heap and stays there when freed,
    where glibc's defaults map fresh pages for it and unmap them on free."""
    out = subprocess.run([sys.executable, "-c", ALLOCATION_PROBE, mode, device], capture_output=True, text=True, check=True).stdout.split()
    applied, grown, kept = out[-3] == "True", int(out[-2]), int(out[-1])
    assert applied == cached
    if cached:
        assert grown == 0 and kept >= 2**23  # not mapped; freed into the heap, kept for the next step
    else:
        assert grown >= 2**23  # its own mapping, returned to the kernel when freed
