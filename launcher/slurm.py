"""Rendering and submitting sbatch scripts (``distill submit``).

The templates in ``slurm/`` are plain bash with ``{{name}}`` placeholders; :func:`render_script`
fills them and :func:`submit` hands the result to ``sbatch``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from distill_launcher.launch import LaunchError, job_arguments, shipped

TEMPLATES = shipped("slurm")


@dataclass
class SlurmRequest:
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int | None = None  # processes per node; defaults to gpus_per_node
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    time: str = "01:00:00"
    launcher: str = "torchrun"
    ds_config: str | None = None
    signal_seconds: int = 120
    master_port: int = 29500
    job_name: str = "distill"
    extra: list = field(default_factory=list)  # more "#SBATCH" lines, verbatim

    def processes_per_node(self) -> int:
        n = self.nproc_per_node or self.gpus_per_node
        if n < 1:
            raise LaunchError("--nproc-per-node is required when --gpus-per-node is 0 (CPU processes)")
        return n

    def cpus(self) -> int:
        return self.cpus_per_task or max(2, 4 * self.processes_per_node())

    def check(self) -> None:
        if self.nodes < 1:
            raise LaunchError(f"--nodes must be >= 1 (got {self.nodes})")
        if self.gpus_per_node < 0:
            raise LaunchError(f"--gpus-per-node must be >= 0 (got {self.gpus_per_node})")
        if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", self.time):
            raise LaunchError(f"--time must be minutes, MM:SS, HH:MM:SS or D-HH:MM:SS (got {self.time!r})")
        if self.signal_seconds < 1:
            raise LaunchError(f"--signal-seconds must be >= 1 (got {self.signal_seconds})")
        self.processes_per_node()


def _directives(request: SlurmRequest) -> tuple[str, str]:
    gpus = (f"#SBATCH --gpus-per-node={request.gpus_per_node}\n# ^ GPUs per node, one job process each"
            if request.gpus_per_node else "# (no GPUs requested: CPU processes over gloo)")
    extra = []
    if request.partition:
        extra += [f"#SBATCH --partition={request.partition}", "# ^ the queue to run in"]
    if request.account:
        extra += [f"#SBATCH --account={request.account}", "# ^ the account charged for the allocation"]
    extra += list(request.extra)
    return gpus, "\n".join(extra)


def launch_command(config: str, overrides: list[str], request: SlurmRequest, *, python: str) -> list[str]:
    """``distill launch`` for one node, always with --resume (a requeued job continues)."""
    argv = [python, "-m", "distill_launcher.cli", "launch", "--launcher", request.launcher,
            "--nproc-per-node", str(request.processes_per_node())]
    if request.ds_config:
        argv += ["--ds-config", request.ds_config]
    return argv + job_arguments(config, overrides, ds_config=None, resume=True)


def _directive_value(value: str, what: str) -> str:
    """A value for an ``#SBATCH --opt=VALUE`` line, double-quoted (sbatch honours the quotes, so
    spaces survive); characters that sbatch cannot carry there are refused."""
    bad = [c for c in ('"', "\\", "\n", "\r") if c in value]
    if bad:
        raise LaunchError(f"{what} {value!r} contains {bad[0]!r}, which an #SBATCH line cannot carry; choose another")
    return f'"{value}"'


def render_script(config: str, overrides: list[str], request: SlurmRequest, run_dir: Path, *, python: str = sys.executable) -> str:
    """The sbatch script for ``request``: single_node.sbatch for one node, multi_node.sbatch otherwise."""
    request.check()
    gpus, extra = _directives(request)
    command = launch_command(str(Path(config).resolve()), overrides, request, python=python)
    if request.nodes == 1:  # several nodes get theirs from the script, with the node rank
        command[4:4] = ["--master-port", str(request.master_port)]
    node_args = '--nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"'
    values = {
        "job_name": _directive_value(request.job_name, "--job-name"),
        "nodes": str(request.nodes),
        "cpus_per_task": str(request.cpus()),
        "gpus_directive": gpus,
        "extra_directives": extra,
        "time": request.time,
        # %% is a literal % in sbatch file patterns; %j is the job id.
        "log": _directive_value(str(run_dir / "slurm").replace("%", "%%") + "/slurm-%j.out", "the run directory"),
        "signal_seconds": str(request.signal_seconds),
        "run_dir": shlex.quote(str(run_dir)),
        "master_port": str(request.master_port),
        "launch_command": shlex.join(command),
        "node_launch": shlex.quote(f"exec {shlex.join(command)} {node_args}"),
    }
    return fill_template("single_node.sbatch" if request.nodes == 1 else "multi_node.sbatch", values)


def fill_template(name: str, values: dict) -> str:
    """``slurm/NAME`` with its ``{{key}}`` placeholders filled, checked with ``bash -n``."""
    script = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], (TEMPLATES / name).read_text())
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    if check.returncode != 0:  # a bug in a template, not user input
        raise RuntimeError(f"rendered sbatch script does not parse: {check.stderr.strip()}")
    return script


def submit(script: str, run_dir: Path) -> tuple[str, Path]:
    """Writes the script into RUN_DIR/slurm/ and submits it; returns (job id, script path)."""
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch is not on PATH: run distill submit on a SLURM login node (or use distill launch)")
    slurm_dir = run_dir / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    path = slurm_dir / "job.sbatch"
    path.write_text(script)
    done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise LaunchError(f"sbatch refused the job: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return done.stdout.strip().split(";")[0], path
