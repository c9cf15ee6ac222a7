"""The launch command is built without starting anything; the launch function is replaceable."""

import json

import pytest

from distill_launcher.cli import cmd_launch, build_parser
from distill_launcher.launch import REPO_DS_CONFIGS, LaunchError, Topology, build_command, resolve_ds_config

SHIPPED = sorted(REPO_DS_CONFIGS.glob("*.json"))


def test_every_shipped_deepspeed_config_is_valid_json_with_auto_values():
    assert {p.stem for p in SHIPPED} == {"zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"}
    for path in SHIPPED:
        config = json.loads(path.read_text())
        assert config["zero_optimization"]["stage"] in (1, 2, 3)
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert config[key] == "auto", (path.name, key)
    assert "offload_optimizer" in json.loads((REPO_DS_CONFIGS / "zero2_offload.json").read_text())["zero_optimization"]
    assert "offload_param" in json.loads((REPO_DS_CONFIGS / "zero3_offload.json").read_text())["zero_optimization"]


def test_ds_config_names_resolve_to_shipped_files(tmp_path):
    assert resolve_ds_config("zero3") == str(REPO_DS_CONFIGS / "zero3.json")
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert resolve_ds_config(str(own)) == str(own)
    with pytest.raises(LaunchError, match="no such shipped config"):
        resolve_ds_config("zero4")
    with pytest.raises(LaunchError, match="file not found"):
        resolve_ds_config(str(tmp_path / "missing.json"))


def test_torchrun_command_on_cpu():
    cmd = build_command("torchrun", "job.yaml", ["train.lr=1e-3"], Topology(2, 2, 1, "10.0.0.1", 1234), cpu=True)
    assert cmd.argv == ["torchrun", "--nproc_per_node=2", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=1234",
                        "-m", "distill.job", "job.yaml", "--set", "train.lr=1e-3"]
    assert cmd.env == {"ACCELERATE_USE_CPU": "true"}


def test_deepspeed_command_multi_node_and_needs_config():
    cmd = build_command("deepspeed", "job.yaml", [], Topology(4, 2, 1, "node0", 29501), ds_config="/x/zero3.json", resume=True, cpu=False)
    assert cmd.argv[:5] == ["deepspeed", "--num_nodes=2", "--num_gpus=4", "--master_addr=node0", "--master_port=29501"]
    assert "--no_ssh" in cmd.argv and "--node_rank=1" in cmd.argv
    assert cmd.argv[-6:] == ["--module", "distill.job", "job.yaml", "--ds-config", "/x/zero3.json", "--resume"]
    with pytest.raises(LaunchError, match="needs --ds-config"):
        build_command("deepspeed", "job.yaml", [], Topology(2), cpu=True)


def test_accelerate_command_variants():
    gpu = build_command("accelerate", "job.yaml", [], Topology(8, 2, 0, "n0", 29500), cpu=False)
    assert "--num_processes=16" in gpu.argv and "--num_machines=2" in gpu.argv and "--multi_gpu" in gpu.argv and gpu.env == {}
    ds = build_command("accelerate", "job.yaml", [], Topology(2), ds_config="/x/zero2.json", cpu=True)
    assert "--use_deepspeed" in ds.argv and "--deepspeed_config_file=/x/zero2.json" in ds.argv and "--cpu" not in ds.argv
    cpu = build_command("accelerate", "job.yaml", [], Topology(2), cpu=True)
    assert "--multi_gpu" in cpu.argv and cpu.env["ACCELERATE_USE_CPU"] == "true"


@pytest.mark.parametrize("topology, message", [(Topology(0), "--nproc-per-node"), (Topology(1, 2, 2), "--node-rank"), (Topology(1, 1, 0, "a", 0), "--master-port")])
def test_bad_topology(topology, message):
    with pytest.raises(LaunchError, match=message):
        build_command("torchrun", "job.yaml", [], topology, cpu=True)


def test_cli_builds_prints_and_calls_the_launch_function(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("teacher: {path: t}\nstudent: {architecture: {num_hidden_layers: 1}}\ndata: {train_files: [a.txt]}\n")
    args = build_parser().parse_args(["launch", str(config), "--launcher", "deepspeed", "--nproc-per-node", "2", "--ds-config", "zero2",
                                      "--set", "train.max_steps=3"])
    launched = []
    assert cmd_launch(args, launch_fn=lambda command: launched.append(command) or 7) == 7
    (command,) = launched
    printed = capsys.readouterr().out.strip()
    assert printed == command.shell()
    assert command.argv[0] == "deepspeed" and "train.max_steps=3" in command.argv


def test_dry_run_prints_and_does_not_launch(tmp_path):
    from conftest import distill_cli

    config = tmp_path / "job.yaml"
    config.write_text("teacher: {path: t}\nstudent: {architecture: {num_hidden_layers: 1}}\ndata: {train_files: [a.txt]}\n")
    result = distill_cli("launch", str(config), "--launcher", "torchrun", "--nproc-per-node", "2", "--dry-run")
    assert result.returncode == 0
    assert result.stdout.startswith("ACCELERATE_USE_CPU=true torchrun --nproc_per_node=2")
    bad = distill_cli("launch", str(config), "--launcher", "deepspeed", "--nproc-per-node", "2", "--dry-run")
    assert bad.returncode == 2 and "needs --ds-config" in bad.stderr
    bad_config = distill_cli("launch", str(config), "--set", "train.lr=x", "--dry-run")
    assert bad_config.returncode == 2 and "train.lr" in bad_config.stderr


def _job_config(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("teacher: {path: t}\nstudent: {architecture: {num_hidden_layers: 1}}\ndata: {train_files: [a.txt]}\n")
    return config


def test_invalid_or_job_owned_ds_config_is_refused_by_dry_run(tmp_path):
    from conftest import distill_cli

    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2},}')
    result = distill_cli("launch", str(_job_config(tmp_path)), "--launcher", "deepspeed", "--ds-config", str(bad), "--dry-run")
    assert result.returncode == 2 and result.stderr.strip().startswith(f"distill: error: --ds-config {bad}: not valid JSON")
    assert len(result.stderr.strip().splitlines()) == 1
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}))
    result = distill_cli("launch", str(_job_config(tmp_path)), "--launcher", "deepspeed", "--ds-config", str(own), "--dry-run")
    assert result.returncode == 2 and 'has an "optimizer" section' in result.stderr and "train.lr" in result.stderr


def test_accelerate_config_file_is_passed_with_only_the_given_topology(tmp_path):
    own = tmp_path / "cluster.yaml"
    own.write_text("compute_environment: LOCAL_MACHINE\nnum_processes: 8\n")
    cmd = build_command("accelerate", "job.yaml", [], Topology(nproc_per_node=1), cpu=False, accelerate_config=str(own), explicit=set())
    assert cmd.argv[:3] == ["accelerate", "launch", f"--config_file={own}"]
    assert not any(a.startswith(("--num_processes", "--num_machines", "--main_process")) for a in cmd.argv)
    cmd = build_command("accelerate", "job.yaml", [], Topology(nproc_per_node=4, master_port=2222), cpu=False, accelerate_config=str(own),
                        explicit={"nproc_per_node", "master_port"})
    assert "--num_processes=4" in cmd.argv and "--main_process_port=2222" in cmd.argv and "--num_machines=1" not in cmd.argv
    with pytest.raises(LaunchError, match="--accelerate-config is for --launcher accelerate"):
        build_command("torchrun", "job.yaml", [], Topology(), accelerate_config=str(own))
    captured = []
    args = build_parser().parse_args(["launch", str(_job_config(tmp_path)), "--config_file", str(own), "--nproc-per-node", "2",
                                    "--output-dir", str(tmp_path / "run")])
    assert cmd_launch(args, launch_fn=lambda command: captured.append(command) or 0) == 0
    assert f"--config_file={own}" in captured[0].argv and "--num_processes=2" in captured[0].argv


def _job():
    from distill.config import load_config

    return load_config(None, ["teacher.path=t", "student.path=s", "data.train_files=[a.txt]", "train.grad_accum=2"])


ACCELERATE = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}


def test_the_launchers_request_is_read_from_its_environment(tmp_path):
    """What each launcher sets, as the real ones set it (the end-to-end runs: tests/distributed/test_launchers.py)."""
    from distill.launched import request

    cfg = _job()
    alone = request(cfg, None, {})
    assert (alone.world_size, alone.launcher, alone.ds_config, alone.notes) == (1, "no launcher", None, [])
    # accelerate config's DeepSpeed answers (no file): a config the job fills, and what it overrides, said.
    inline = request(cfg, None, {**ACCELERATE, "WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                                 "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    assert inline.world_size == 2 and inline.ds_source == "accelerate's deepspeed_config"
    assert inline.ds_config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}, "stage3_gather_16bit_weights_on_model_save": True}
    assert inline.notes == ["DeepSpeed: accelerate's config has gradient_accumulation_steps=4, train.grad_accum is 2: train.grad_accum wins "
                            "(the job owns the step)"]
    # The job's own --ds-config wins over accelerate's file, and says so; a missing file is one line.
    own = tmp_path / "own.json"
    own.write_text("{}")
    theirs = request(cfg, str(own), {**ACCELERATE, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "/x/zero3.json"})
    assert theirs.ds_config == str(own) and theirs.notes == [f"DeepSpeed config: the job's --ds-config {own} wins over accelerate's /x/zero3.json"]
    with pytest.raises(LaunchError, match="accelerate's deepspeed_config_file /x/zero3.json does not exist"):
        request(cfg, None, {**ACCELERATE, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "/x/zero3.json"})
    # The deepspeed launcher without a DeepSpeed config trains plain DDP, and says so.
    bare = request(cfg, None, {"WORLD_SIZE": "2", "RANK": "0", "CROSS_RANK": "0", "LOCAL_SIZE": "2"})
    assert bare.launcher == "deepspeed" and "without a DeepSpeed config" in bare.notes[0]
    # accelerate's simple launcher asked for several processes started one: refused, not trained alone.
    with pytest.raises(LaunchError, match="accelerate launch started one process for a config of several"):
        request(cfg, None, {**ACCELERATE, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})


@pytest.mark.parametrize("launcher, ours, wins, note", [
    ("bf16", "fp32", "bf16", "precision: accelerate launch asks for bf16, train.precision is fp32: the launcher's bf16 wins"),
    ("no", "bf16", "bf16", "precision: accelerate launch's mixed_precision is 'no' (its default), train.precision is bf16: train.precision=bf16 wins"),
    ("bf16", "bf16", "bf16", None),
    ("no", "fp32", "fp32", None),
])
def test_the_launchers_precision_wins_unless_it_is_accelerates_default(launcher, ours, wins, note):
    from distill.launched import request

    cfg = _job()
    cfg.train.precision = ours
    result = request(cfg, None, {**ACCELERATE, "ACCELERATE_MIXED_PRECISION": launcher})
    assert cfg.train.precision == wins and result.notes == ([note] if note else [])


def test_fp8_from_the_launcher_is_one_line():
    from distill.launched import request

    with pytest.raises(LaunchError, match="asks for mixed precision fp8"):
        request(_job(), None, {**ACCELERATE, "ACCELERATE_MIXED_PRECISION": "fp8"})


def test_distill_launch_passes_the_jobs_precision_and_starts_a_cpu_configs_processes(tmp_path):
    cmd = build_command("accelerate", "job.yaml", [], Topology(2), cpu=True, precision="bf16")
    assert "--mixed_precision=bf16" in cmd.argv
    multi_cpu = tmp_path / "multi_cpu.yaml"
    multi_cpu.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\nuse_cpu: true\n")
    cmd = build_command("accelerate", "job.yaml", [], Topology(), cpu=True, accelerate_config=str(multi_cpu), explicit=set())
    assert "--multi_gpu" in cmd.argv and cmd.env == {"ACCELERATE_USE_CPU": "true"}
    with_mpi = tmp_path / "mpi.yaml"
    with_mpi.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\nmpirun_hostfile: hosts\n")  # accelerate's own way: left to it
    assert "--multi_gpu" not in build_command("accelerate", "job.yaml", [], Topology(), cpu=True, accelerate_config=str(with_mpi), explicit=set()).argv


def test_a_deepspeed_configs_own_precision_wins_and_says_so(tmp_path):
    from distill.launched import request
    from distill.setup import deepspeed_config

    cfg = _job()
    ds = tmp_path / "bf16.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    result = request(cfg, str(ds), {"WORLD_SIZE": "2", "CROSS_RANK": "0", "LOCAL_SIZE": "2"})
    assert cfg.train.precision == "bf16"
    assert result.notes == ["precision: the DeepSpeed config has bf16.enabled=true, train.precision is fp32: the DeepSpeed config's bf16 wins"]
    assert deepspeed_config(str(ds), cfg, 2)["bf16"]["enabled"] is True  # and the config the engine gets agrees
    cfg.train.precision = "bf16"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}))
    assert request(cfg, str(ds), {}).notes == [] and cfg.train.precision == "bf16"  # "auto": the job's


def test_under_mpirun_the_world_size_is_the_mpis():
    from distill.launched import request

    assert request(_job(), None, {**ACCELERATE, "MASTER_ADDR": "n0", "PMI_SIZE": "4", "PMI_RANK": "0"}).world_size == 4
