"""Building and running the multi-process command: accelerate launch, deepspeed or torchrun.

:func:`build_command` is pure (tests call it without starting anything); :func:`launch` runs a
command, streams its output and returns its exit code, and is the one function tests replace.
Every launcher starts the same entry point, ``python -m distill.job``, on every process.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml  # already loaded with distill.config

from distill.config import read_ds_config
from distill.launched import PRECISION
from distill.errors import (
    EXIT_DIR_ENV,
    LaunchError,  # noqa: F401  (re-exported)
    launched_exit_code,
)


def shipped(name: str) -> Path:
    """A folder the project ships: inside the installed package (a wheel), or beside this
    package in the source tree (an editable install, or a checkout on the path)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / name, here.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the shipped {name}/ folder is missing from this install ({here}); reinstall distill")


REPO_DS_CONFIGS = shipped("ds_configs")
LAUNCHERS = ("accelerate", "deepspeed", "torchrun")


@dataclass
class Topology:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def check(self) -> None:
        if self.nproc_per_node < 1:
            raise LaunchError(f"--nproc-per-node must be >= 1 (got {self.nproc_per_node})")
        if self.nnodes < 1:
            raise LaunchError(f"--nnodes must be >= 1 (got {self.nnodes})")
        if not 0 <= self.node_rank < self.nnodes:
            raise LaunchError(f"--node-rank must be in [0, --nnodes) (got {self.node_rank} with {self.nnodes} nodes)")
        if not 0 < self.master_port < 65536:
            raise LaunchError(f"--master-port must be a TCP port (got {self.master_port})")


def resolve_ds_config(name_or_path: str | None) -> str | None:
    """``zero3`` -> the shipped ds_configs/zero3.json; anything else is a path that must exist."""
    if not name_or_path:
        return None
    shipped = REPO_DS_CONFIGS / f"{name_or_path}.json"
    if "/" not in name_or_path and not name_or_path.endswith(".json"):
        if not shipped.is_file():
            names = ", ".join(sorted(p.stem for p in REPO_DS_CONFIGS.glob("*.json")))
            raise LaunchError(f"--ds-config {name_or_path}: no such shipped config (shipped: {names}); or give a path to a JSON file")
        return str(shipped)
    path = Path(os.path.expanduser(name_or_path))
    if not path.is_file():
        raise LaunchError(f"--ds-config: file not found: {name_or_path}")
    read_ds_config(path)
    return str(path.resolve())


def job_arguments(config: str, overrides: list[str], *, ds_config: str | None, resume: bool, overwrite: bool = False) -> list[str]:
    """The arguments of ``python -m distill.job`` (the same for every launcher)."""
    args = [config]
    for item in overrides:
        args += ["--set", item]
    if ds_config:
        args += ["--ds-config", ds_config]
    if resume:
        args.append("--resume")
    if overwrite:
        args.append("--overwrite")
    return args


@dataclass
class Command:
    argv: list[str]
    env: dict = field(default_factory=dict)  # added to the inherited environment

    def shell(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (prefix + " " if prefix else "") + shlex.join(self.argv)


def build_command(launcher: str, config: str, overrides: list[str], topology: Topology, *, ds_config: str | None = None,
                  resume: bool = False, overwrite: bool = False, cpu: bool | None = None, accelerate_config: str | None = None,
                  explicit: set | None = None, precision: str | None = None) -> Command:
    """The exact command that starts ``topology.nproc_per_node`` job processes on this node.

    Args:
        cpu: force CPU processes (gloo); by default, CPU when no CUDA device is visible.
        accelerate_config: the user's ``accelerate config`` file (accelerate only); then only the
            topology fields named in ``explicit`` are passed, so the file decides the rest.
        precision: the job's ``train.precision``, passed to accelerate launch without a config file.
    """
    if launcher not in LAUNCHERS:
        raise LaunchError(f"--launcher must be one of {', '.join(LAUNCHERS)} (got {launcher!r})")
    if accelerate_config and launcher != "accelerate":
        raise LaunchError(f"--accelerate-config is for --launcher accelerate (got --launcher {launcher})")
    topology.check()
    cpu = (not _cuda_visible()) if cpu is None else cpu
    job = job_arguments(config, overrides, ds_config=ds_config, resume=resume, overwrite=overwrite)
    env = {}
    t = topology
    if launcher == "torchrun":
        argv = ["torchrun", f"--nproc_per_node={t.nproc_per_node}", f"--nnodes={t.nnodes}", f"--node_rank={t.node_rank}",
                f"--master_addr={t.master_addr}", f"--master_port={t.master_port}", "-m", "distill.job", *job]
        if cpu and not ds_config:
            # Otherwise accelerate treats each CPU process as world size 1. Under DeepSpeed the job
            # registers the CPU ranks itself, and accelerate's CPU state has no DeepSpeed precision.
            env["ACCELERATE_USE_CPU"] = "true"
    elif launcher == "deepspeed":
        if not ds_config:
            raise LaunchError("--launcher deepspeed needs --ds-config (e.g. --ds-config zero2)")
        argv = ["deepspeed", f"--num_nodes={t.nnodes}", f"--num_gpus={t.nproc_per_node}", f"--master_addr={t.master_addr}",
                f"--master_port={t.master_port}"]
        if t.nnodes > 1:
            # One launcher per node (as under SLURM), not DeepSpeed's own pdsh fan-out.
            argv += ["--no_ssh", f"--node_rank={t.node_rank}"]
        argv += ["--no_local_rank", "--module", "distill.job", *job]
    elif accelerate_config:
        argv, env = _accelerate_with_config_file(accelerate_config, t, explicit or set(), ds_config, cpu)
        argv += ["-m", "distill.job", *job]
    else:
        argv = ["accelerate", "launch", f"--num_processes={t.nproc_per_node * t.nnodes}", f"--num_machines={t.nnodes}",
                f"--machine_rank={t.node_rank}", f"--main_process_ip={t.master_addr}", f"--main_process_port={t.master_port}"]
        if ds_config:
            # DeepSpeed picks its CPU accelerator (and gloo) by itself when no GPU is visible.
            argv += ["--use_deepspeed", f"--deepspeed_config_file={ds_config}"]
        elif t.nproc_per_node * t.nnodes > 1:
            # --multi_gpu is accelerate's torchrun-based launcher; with ACCELERATE_USE_CPU its
            # processes run on CPU over gloo (`--cpu` alone starts a single process).
            argv += ["--multi_gpu"]
        if cpu and not ds_config:
            env["ACCELERATE_USE_CPU"] = "true"
        if precision:  # the job's train.precision, so that accelerate's default ("no") does not disagree with it
            argv.append(f"--mixed_precision={PRECISION[precision]}")
        argv += ["-m", "distill.job", *job]
    return Command(argv=argv, env=env)


def _accelerate_with_config_file(path: str, t: Topology, explicit: set, ds_config: str | None, cpu: bool) -> tuple[list[str], dict]:
    """``accelerate launch --config_file FILE`` plus only the topology options given on the command line.

    accelerate starts the processes of a CPU config (``distributed_type: MULTI_CPU``, or several
    processes without a GPU) only through mpirun; without an ``mpirun_hostfile`` it would start one.
    Then the command asks for its torchrun-based launcher (``--multi_gpu``) with ACCELERATE_USE_CPU,
    which starts them all on CPU over gloo.
    """
    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise LaunchError(f"--accelerate-config: file not found: {path}")
    try:
        settings = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise LaunchError(f"--accelerate-config {path}: not valid YAML ({err})") from None
    if not isinstance(settings, dict):
        raise LaunchError(f"--accelerate-config {path}: expected accelerate's config (a mapping)")
    argv = ["accelerate", "launch", f"--config_file={file.resolve()}"]
    processes = t.nproc_per_node * t.nnodes if {"nproc_per_node", "nnodes"} & explicit else int(settings.get("num_processes") or 1)
    if "nproc_per_node" in explicit or "nnodes" in explicit:
        argv.append(f"--num_processes={processes}")
    flags = {"nnodes": f"--num_machines={t.nnodes}", "node_rank": f"--machine_rank={t.node_rank}",
             "master_addr": f"--main_process_ip={t.master_addr}", "master_port": f"--main_process_port={t.master_port}"}
    argv += [flag for name, flag in flags.items() if name in explicit]
    env = {}
    if ds_config:
        argv += ["--use_deepspeed", f"--deepspeed_config_file={ds_config}"]
    kind = str(settings.get("distributed_type", "NO"))
    on_cpu = cpu or bool(settings.get("use_cpu")) or kind == "MULTI_CPU"
    if not ds_config and kind in ("NO", "MULTI_CPU") and on_cpu and processes > 1 and not settings.get("mpirun_hostfile"):
        argv.append("--multi_gpu")
        env["ACCELERATE_USE_CPU"] = "true"
    return argv, env


def _cuda_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def _signal_job_processes(launcher_pid: int, signum: int) -> None:
    """Sends ``signum`` to the job processes under the launcher, not to the launcher itself.

    SIGUSR1 asks each job process to checkpoint and stop; torchrun's and DeepSpeed's launchers
    do not handle it and would die of it, orphaning the processes that are saving.
    """
    import psutil  # start-up time: the command line stays free of psutil until a command needs it

    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for child in children:
        try:
            if "distill.job" in " ".join(child.cmdline()):
                child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def launch(command: Command) -> int:
    """Runs ``command``, streaming its output, and returns its exit code.

    SIGINT and SIGTERM go to the launcher's whole process group; SIGUSR1 (checkpoint and stop)
    goes to the job processes.
    """

    exit_dir = tempfile.mkdtemp(prefix="distill-exit-")
    env = {**os.environ, **command.env, EXIT_DIR_ENV: exit_dir}
    # The launcher starts with SIGUSR1 ignored (an ignored signal stays ignored across exec): under
    # srun, Slurm signals every process of the step, and torchrun, deepspeed and accelerate would
    # die of it. The job processes install their own handler first thing (distill.signals).
    usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        proc = subprocess.Popen([executable(command.argv[0]), *command.argv[1:]], env=env, start_new_session=True)
    finally:
        signal.signal(signal.SIGUSR1, usr1)

    def forward(signum, _frame):
        if signum == signal.SIGUSR1:
            _signal_job_processes(proc.pid, signum)
        else:
            os.killpg(proc.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        code = proc.wait()
        # torchrun and deepspeed exit 1 whatever failed; report the job's own code (distill.errors).
        return launched_exit_code(exit_dir, code) if code else 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        shutil.rmtree(exit_dir, ignore_errors=True)


def executable(name: str) -> str:
    """The launcher program: on PATH, or beside this Python (a virtual environment not activated)."""
    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if found is None:
        hint = {"deepspeed": "pip install 'distill[deepspeed]'", "accelerate": "pip install accelerate", "torchrun": "pip install torch"}[name]
        raise LaunchError(f"{name} is not on PATH; {hint} (or choose another --launcher)")
    return found


def run_launch(command: Command, *, dry_run: bool, launch_fn=launch) -> int:
    """Prints the command; runs it unless ``dry_run``; returns the exit code."""
    print(command.shell(), flush=True)
    if dry_run:
        return 0
    return launch_fn(command)

