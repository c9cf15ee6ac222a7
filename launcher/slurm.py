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
    teacher_nodes: int = 0  # > 0: a teacher pool (distill serve-teacher) on this many nodes, the students on the others
    teacher_gpus: int | None = None  # GPUs of each pool node the pool uses (default: all of --gpus-per-node)
    teacher_colocated: bool = False  # the pool runs on the first student nodes instead of nodes of its own
    teacher_port: int = 8765
    teacher_top_k: int = 64
    teacher_extra: tuple = ()  # the pool's other serve-teacher options (its hidden states)
    teacher_engine: str = "builtin"

    def processes_per_node(self) -> int:
        # Students beside a colocated pool get the GPUs it leaves.
        n = self.nproc_per_node or (self.gpus_per_node - self.pool_gpus() if self.teacher_nodes and self.teacher_colocated else self.gpus_per_node)
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
        if self.teacher_nodes < 0:
            raise LaunchError(f"--teacher-nodes must be >= 0 (got {self.teacher_nodes})")
        if self.teacher_nodes:
            if self.teacher_colocated and self.teacher_nodes > self.nodes:
                raise LaunchError(f"--teacher-colocated puts the pool on the student nodes: --teacher-nodes {self.teacher_nodes} is more than --nodes {self.nodes}")
            gpus = self.pool_gpus()
            if not 0 <= gpus <= self.gpus_per_node:
                raise LaunchError(f"--teacher-gpus must be in [0, --gpus-per-node={self.gpus_per_node}] (got {gpus})")
            if self.teacher_colocated and self.gpus_per_node and gpus >= self.gpus_per_node and not self.nproc_per_node:
                raise LaunchError(f"--teacher-colocated with --teacher-gpus {gpus} leaves no GPU of the {self.gpus_per_node} for the students; lower --teacher-gpus")
            if not 0 < self.teacher_port < 65536 or self.teacher_port == self.master_port:
                raise LaunchError(f"--teacher-port must be a free port other than --master-port (got {self.teacher_port})")
        elif self.teacher_gpus is not None or self.teacher_colocated:
            raise LaunchError("--teacher-gpus and --teacher-colocated need --teacher-nodes")
        self.processes_per_node()

    def pool_gpus(self) -> int:
        return self.gpus_per_node if self.teacher_gpus is None else self.teacher_gpus


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


def _job_values(request: SlurmRequest, run_dir: Path) -> dict:
    """The placeholders every job's template shares: its directives, log and run directory."""
    gpus, extra = _directives(request)
    return {
        "job_name": _directive_value(request.job_name, "--job-name"),
        "cpus_per_task": str(request.cpus()),
        "gpus_directive": gpus,
        "extra_directives": extra,
        "time": request.time,
        # %% is a literal % in sbatch file patterns; %j is the job id.
        "log": _directive_value(str(run_dir / "slurm").replace("%", "%%") + "/slurm-%j.out", "the run directory"),
        "signal_seconds": str(request.signal_seconds),
        "run_dir": shlex.quote(str(run_dir)),
        "master_port": str(request.master_port),
    }


def render_script(config: str, overrides: list[str], request: SlurmRequest, run_dir: Path, *, python: str = sys.executable) -> str:
    """The sbatch script for ``request``: single_node.sbatch for one node, multi_node.sbatch otherwise."""
    request.check()
    command = launch_command(str(Path(config).resolve()), overrides, request, python=python)
    if request.nodes == 1:  # several nodes get theirs from the script, with the node rank
        command[4:4] = ["--master-port", str(request.master_port)]
    node_args = '--nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"'
    values = {
        **_job_values(request, run_dir),
        "nodes": str(request.nodes),
        "launch_command": shlex.join(command),
        "node_launch": shlex.quote(f"exec {shlex.join(command)} {node_args}"),
    }
    return fill_template("single_node.sbatch" if request.nodes == 1 else "multi_node.sbatch", values)


def serve_command(config: str, overrides: list[str], *, host: str, port: int, top_k: int, engine: str, python: str = sys.executable,
                  extra: tuple = ()) -> list[str]:
    """``distill serve-teacher`` for a job's config (its teacher, tokenizer and task), without the token option; ``extra``: its
    other options (``--hidden-layers ...``)."""
    return [python, "-m", "distill_launcher.cli", "serve-teacher", config, *[a for o in overrides for a in ("--set", o)], "--host", host,
            "--port", str(port), "--top-k", str(top_k), "--engine", engine, *extra]


def render_pool_script(config: str, overrides: list[str], request: SlurmRequest, run_dir: Path, *, python: str = sys.executable) -> str:
    """The sbatch script of a job with a teacher pool (``request.teacher_nodes``): slurm/teacher_pool.sbatch.

    One allocation with two srun steps rather than a heterogeneous job: every cluster runs it, a
    requeue restarts pool and students together, and with ``teacher_colocated`` the pool shares
    the first student nodes (``--overlap``), dividing their GPUs. The token is made by the script
    at run time, in a file under RUN_DIR/slurm only the user can read; the address is the pool
    nodes' host names. Neither is in this script.
    """
    request.check()
    config = str(Path(config).resolve())
    students = launch_command(config, [*overrides, "teacher.source=remote"], request, python=python)
    pool_gpus, colocated = request.pool_gpus(), request.teacher_colocated

    def visible(first: int, last: str) -> str:
        """Expanded in each step: the GPUs first..last (1-based) of those the step sees."""
        return f'export CUDA_VISIBLE_DEVICES=$(echo "$CUDA_VISIBLE_DEVICES" | cut -d, -f{first}-{last}); ' if request.gpus_per_node else ""

    serve = serve_command(config, overrides, host="0.0.0.0", port=request.teacher_port, top_k=request.teacher_top_k,
                          engine=request.teacher_engine, python=python, extra=request.teacher_extra)
    pool_launch = (visible(1, str(pool_gpus)) if pool_gpus < request.gpus_per_node else "") + \
        f'exec {shlex.join(serve)} --token-file "$TEACHER_TOKEN_FILE"'
    student_nodes = request.nodes
    node_args = (f'--nnodes {student_nodes} --node-rank "$SLURM_PROCID" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" '
                 '--set "teacher.url=$TEACHER_URL" --set "teacher.token_file=$TEACHER_TOKEN_FILE"')
    # Colocated, every student node leaves its first pool_gpus GPUs to the pool (idle where no pool member runs), so all
    # student nodes run as many processes.
    node_launch = (visible(pool_gpus + 1, "") if colocated and pool_gpus else "") + f"exec {shlex.join(students)} {node_args}"
    total = request.nodes if colocated else request.nodes + request.teacher_nodes
    note = (f"the students' {request.nodes}, the first {request.teacher_nodes} also running the teacher pool" if colocated
            else f"{request.teacher_nodes} for the teacher pool, then {request.nodes} for the students")
    values = {
        **_job_values(request, run_dir),
        "nodes": str(total),
        "nodes_note": note,
        "python": shlex.quote(python),
        "teacher_port": str(request.teacher_port),
        "teacher_nodes": str(request.teacher_nodes),
        "student_offset": "0" if colocated else str(request.teacher_nodes),
        "student_nodes": str(student_nodes),
        "ready_seconds": "1800",
        "pool_launch": shlex.quote(pool_launch),
        "node_launch": shlex.quote(node_launch),
    }
    return fill_template("teacher_pool.sbatch", values)


def fill_template(name: str, values: dict) -> str:
    """``slurm/NAME`` with its ``{{key}}`` placeholders filled, checked with ``bash -n``."""
    script = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], (TEMPLATES / name).read_text())
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    if check.returncode != 0:  # a bug in a template, not user input
        raise RuntimeError(f"rendered sbatch script does not parse: {check.stderr.strip()}")
    return script


def submit(script: str, run_dir: Path, *, name: str = "job.sbatch", sbatch_args: tuple = ()) -> tuple[str, Path]:
    """Writes the script into RUN_DIR/slurm/NAME and submits it; returns (job id, script path)."""
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch is not on PATH: run distill submit on a SLURM login node (or use distill launch)")
    slurm_dir = run_dir / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    path = slurm_dir / name
    path.write_text(script)
    done = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise LaunchError(f"sbatch refused the job: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return done.stdout.strip().split(";")[0], path
