"""Real processes through each launcher, 2 CPU ranks over gloo: ZeRO stages, DDP, world sizes, failures."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, job_overrides, read_metrics, run_job, reset_accelerate

pytestmark = pytest.mark.slow
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tiny, corpus, out: Path, *args: str, sets: tuple = (), env: dict | None = None, timeout: float = 600):
    """`distill launch` through the real command, every option given by --set."""
    overrides = job_overrides(tiny, corpus, out, f"train.max_steps={STEPS}", "train.micro_batch_size=2", "eval.speed=false", *sets)
    config = out.parent / f"{out.name}.yaml"
    config.write_text("{}\n")
    argv = [sys.executable, "-m", "distill_launcher.cli", "launch", str(config), "--master-port", str(free_port()), *args]
    argv += [a for o in overrides for a in ("--set", o)]
    # The launchers (deepspeed, torchrun, accelerate) live beside this interpreter.
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {})}
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


def losses(run_dir: Path) -> list[float]:
    return [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]


@pytest.fixture(scope="module")
def one_process_reference(tiny, corpus, tmp_path_factory):
    """One process at micro-batch 4: what 2 processes at micro-batch 2 must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_job(tiny, corpus, out, f"train.max_steps={STEPS}", "train.micro_batch_size=4", "eval.at_end=false")
    reset_accelerate()
    return losses(out)


@pytest.mark.parametrize("launcher, ds_config", [
    ("torchrun", None), ("accelerate", None), ("torchrun", "zero2"), ("deepspeed", "zero1"), ("deepspeed", "zero2"), ("accelerate", "zero2"),
    ("deepspeed", "zero3"), ("accelerate", "zero3"), ("deepspeed", "zero2_offload"), ("accelerate", "zero3_offload"),
])
def test_two_processes_follow_the_one_process_loss_curve(tiny, corpus, tmp_path, one_process_reference, launcher, ds_config):
    out = tmp_path / "run"
    args = ["--launcher", launcher, "--nproc-per-node", "2"] + (["--ds-config", ds_config] if ds_config else [])
    result = launch(tiny, corpus, out, *args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # Rank 0 alone logs: one record per step, not one per process.
    assert losses(out) == pytest.approx(one_process_reference, rel=1e-5)
    # The plan every run prints: what the launcher started, how, and the batch it makes.
    name = {"accelerate": "accelerate launch"}.get(launcher, launcher)
    backend = f"DeepSpeed ZeRO-{ds_config[4]} (cpu, gloo)" if ds_config else "DDP (cpu, gloo)"
    assert f"distill: launch: 2 processes ({name}), {backend}" in result.stderr, result.stderr[-3000:]
    assert "micro-batch 2 x grad_accum 1 x 2 processes = 4 sequences of up to 64 tokens (256 tokens) a step" in result.stderr
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "student").config.num_hidden_layers == 1
    rows = {r["model"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}
    assert rows["student"]["kl_to_teacher"] < rows["initial_student"]["kl_to_teacher"]
    if ds_config and not torch.cuda.is_available():  # DeepSpeed's CPU all-reduce buffers (66 MB of RAM each) are not left behind
        port = result.args[result.args.index("--master-port") + 1]
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def test_quantized_teacher_beside_a_zero3_student(tiny, corpus, tmp_path):
    out = tmp_path / "run"
    result = launch(tiny, corpus, out, "--launcher", "deepspeed", "--nproc-per-node", "2", "--ds-config", "zero3",
                    sets=("teacher.quantization=4bit",))
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["rows"][0]["quantization"] == "4bit" and report["teacher_fidelity_kl"] > 0


def test_zero3_run_saved_at_two_processes_resumes_at_one(tiny, corpus, tmp_path, one_process_reference):
    out = tmp_path / "run"
    first = launch(tiny, corpus, out, "--launcher", "deepspeed", "--nproc-per-node", "2", "--ds-config", "zero3",
                   sets=("train.save_every=2", "eval.at_end=false"))
    assert first.returncode == 0, first.stderr[-4000:]
    # As if killed after the step-2 checkpoint.
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    shutil.rmtree(out / "student")
    second = launch(tiny, corpus, out, "--launcher", "deepspeed", "--nproc-per-node", "1", "--ds-config", "zero3", "--resume",
                    sets=("train.save_every=2", "eval.at_end=false", "train.micro_batch_size=4"))
    assert second.returncode == 0, second.stderr[-4000:]
    assert "universal-step_00000002 (step 2)" in second.stderr
    assert losses(out) == pytest.approx(one_process_reference, rel=1e-5)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_one_rank_raising_ends_every_rank(tiny, corpus, tmp_path, launcher):
    out = tmp_path / "run"
    args = ["--launcher", launcher, "--nproc-per-node", "2"] + (["--ds-config", "zero2"] if launcher == "deepspeed" else [])
    # Bounded by the timeout: a rank left waiting in a collective would hang the launcher past it.
    result = launch(tiny, corpus, out, *args, sets=("train.max_steps=50", "train.log_every=1"), env={"DISTILL_FAULT": "1:3"}, timeout=240)
    assert result.returncode != 0
    assert "injected fault on rank 1 at step 3" in result.stdout + result.stderr
    # Rank 0 stopped with it: it logged no step past the fault and wrote no student.
    assert max((m["step"] for m in read_metrics(out)), default=0) <= 3 and not (out / "student").exists()
    leftover = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.strip()
    assert not leftover, leftover


@pytest.mark.parametrize("launcher, ds_config", [("deepspeed", "zero2"), ("accelerate", "zero3")])
def test_lora_student_under_zero(tiny, corpus, tmp_path, launcher, ds_config):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    result = launch(tiny, corpus, out, "--launcher", launcher, "--nproc-per-node", "2", "--ds-config", ds_config,
                    sets=(f"student.path={tiny['student']}", "student.architecture={}", "student.lora={r: 4, merge: true}", "train.lr=1e-2"))
    assert result.returncode == 0, result.stderr[-4000:]
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(v.numel() and v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # gathered, and trained
    merged = AutoModelForCausalLM.from_pretrained(out / "student")
    base = AutoModelForCausalLM.from_pretrained(tiny["student"])
    assert merged.config.num_hidden_layers == base.config.num_hidden_layers
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def accelerate_launch(tiny, corpus, out: Path, accelerate_args: list[str], *sets: str, env: dict | None = None, timeout: float = 600):
    """The user's own `accelerate launch ... -m distill.job CONFIG`, not distill's launcher."""
    overrides = job_overrides(tiny, corpus, out, f"train.max_steps={STEPS}", "train.micro_batch_size=2", "eval.speed=false", *sets)
    config = out.parent / f"{out.name}.yaml"
    config.write_text("{}\n")
    argv = [str(Path(sys.executable).parent / "accelerate"), "launch", "-q", *accelerate_args, "--main_process_port", str(free_port()),
            "-m", "distill.job", str(config), *[a for o in overrides for a in ("--set", o)]]
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {})}
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


MULTI_CPU = "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nmixed_precision: 'no'\nnum_machines: 1\nnum_processes: 2\nuse_cpu: true\n"


def test_a_multi_cpu_accelerate_config_runs_two_processes_or_says_why_not(tiny, corpus, tmp_path, one_process_reference):
    """accelerate starts a MULTI_CPU config's processes only through mpirun: alone it starts one. Then the job
    refuses in one line instead of training alone; distill launch starts them all."""
    config = tmp_path / "multi_cpu.yaml"
    config.write_text(MULTI_CPU)
    alone = accelerate_launch(tiny, corpus, tmp_path / "alone", ["--config_file", str(config)])
    assert alone.returncode != 0 and "distill: error: accelerate launch started one process for a config of several" in alone.stderr
    assert "distill launch --accelerate-config FILE" in alone.stderr and not (tmp_path / "alone").exists()
    out = tmp_path / "run"
    result = launch(tiny, corpus, out, "--accelerate-config", str(config))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "--multi_gpu" in result.stdout and "distill: launch: 2 processes (accelerate launch), DDP (cpu, gloo)" in result.stderr
    assert losses(out) == pytest.approx(one_process_reference, rel=1e-5)


def test_deepspeed_and_precision_come_from_accelerates_config(tiny, corpus, tmp_path, one_process_reference):
    """`accelerate launch` with a DEEPSPEED config file (ZeRO-2 from its deepspeed_config_file, bf16): the job
    runs DeepSpeed on both processes in the launcher's precision, and says that it overrode train.precision."""
    config = tmp_path / "deepspeed.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nmixed_precision: bf16\nnum_machines: 1\n"
                      f"num_processes: 2\ndeepspeed_config:\n  deepspeed_config_file: {REPO / 'ds_configs' / 'zero2.json'}\n"
                      "  zero3_init_flag: false\n")
    out = tmp_path / "run"
    result = accelerate_launch(tiny, corpus, out, ["--config_file", str(config)], env={"ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "distill: precision: accelerate launch asks for bf16, train.precision is fp32: the launcher's bf16 wins" in result.stderr
    assert ("distill: launch: 2 processes (accelerate launch), DeepSpeed ZeRO-2 (cpu, gloo) from accelerate's deepspeed_config_file, "
            "precision bf16") in result.stderr
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["precision"] == "bf16"
    assert losses(out) == pytest.approx(one_process_reference, rel=0.05)  # bf16 rounding, the same descent


def test_unlabelled_rows_under_zero_follow_the_one_process_curve(labelled, bert, tmp_path):
    """A classifier trained on labelled and unlabelled rows (ce skips the unlabelled ones) and a masked LM's rewritten copies of
    the unlabelled ones: 2 ZeRO-2 processes at micro-batch 2 follow 1 process at micro-batch 4, and count the same rows."""
    from conftest import classifier_job, few_labels

    augment = f"{{kind: word_replace, copies: 1, rate: 0.3, model: {bert['teacher']}}}"

    def overrides(out, micro):
        return classifier_job(labelled, out, *few_labels(labelled, tmp_path, augment), "loss.alpha=0.5", f"train.max_steps={STEPS}",
                              f"train.micro_batch_size={micro}", "train.log_every=1", "eval.speed=false", "eval.initial=false")

    run_job_sets = overrides(tmp_path / "one", 4)
    from distill.config import load_config
    from distill.job import run

    reference = run(load_config(None, run_job_sets))
    reset_accelerate()
    out = tmp_path / "two"
    config = tmp_path / "two.yaml"
    config.write_text("{}\n")
    argv = [sys.executable, "-m", "distill_launcher.cli", "launch", str(config), "--launcher", "deepspeed", "--nproc-per-node", "2",
            "--ds-config", "zero2", "--master-port", str(free_port()), *[a for o in overrides(out, 2) for a in ("--set", o)]]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert losses(out) == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert [m["train/unlabelled_rows"] for m in read_metrics(out) if "train/loss" in m] == \
           [m["train/unlabelled_rows"] for m in read_metrics(tmp_path / "one") if "train/loss" in m]
    two = json.loads((out / "eval.json").read_text())
    assert two["train_rows_unlabelled"] == reference["train_rows_unlabelled"] > 0


@pytest.mark.parametrize("launcher, ds_config", [("torchrun", None), ("deepspeed", "zero3")])
def test_on_policy_rollouts_on_two_processes_follow_one(tiny, corpus, tmp_path, launcher, ds_config):
    """The student's greedy completions (rollout.on_policy=1, temperature 0): under DDP and ZeRO-3 (each layer gathered
    collectively, every process running as many forwards) 2 processes at micro-batch 2 follow 1 process at micro-batch 4."""
    on_policy = ("data.packing=false", "rollout.on_policy=1", "rollout.temperature=0", "rollout.max_new_tokens=16", "rollout.prompt_tokens=8",
                 "eval.at_end=false")
    run_job(tiny, corpus, tmp_path / "one", f"train.max_steps={STEPS}", "train.micro_batch_size=4", *on_policy)
    reset_accelerate()
    out = tmp_path / "two"
    args = ["--launcher", launcher, "--nproc-per-node", "2"] + (["--ds-config", ds_config] if ds_config else [])
    result = launch(tiny, corpus, out, *args, sets=on_policy)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert losses(out) == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    lengths = lambda run: [m["train/completion_length"] for m in read_metrics(run) if "train/loss" in m]
    assert lengths(out) == pytest.approx(lengths(tmp_path / "one"))
