"""sbatch scripts: rendered and parsed, then run on a real single-node SLURM cluster (slurm/cluster.sh)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, distill_cli, job_overrides, read_metrics, sweep_args
from distill_launcher.launch import LaunchError
from distill_launcher.slurm import SlurmRequest, render_pool_script, render_script


def bash_parses(script: str) -> bool:
    return subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.parametrize("nodes", [1, 3])
def test_rendered_scripts_parse_and_ask_for_the_right_things(tmp_path, nodes):
    request = SlurmRequest(nodes=nodes, gpus_per_node=8, partition="gpu", account="proj", time="02:00:00", launcher="deepspeed",
                           ds_config="/cfg/zero3.json", signal_seconds=300, job_name="kd run")
    run_dir = tmp_path / "my runs" / "kd été 100%"
    script = render_script("job.yaml", ["train.lr=1e-4", "tracking.run_name=a b"], request, run_dir)
    assert bash_parses(script)
    # Quoted, so sbatch keeps the spaces; %% is sbatch's literal %.
    assert f'#SBATCH --output="{tmp_path}/my runs/kd été 100%%/slurm/slurm-%j.out"' in script
    assert '#SBATCH --job-name="kd run"' in script
    assert f"RUN_DIR='{run_dir}'" in script
    for line in ("#SBATCH --signal=B:USR1@300", "#SBATCH --open-mode=append", "#SBATCH --requeue", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=02:00:00", f"#SBATCH --nodes={nodes}",
                 "scontrol requeue"):
        assert line in script, line
    assert "--ds-config /cfg/zero3.json" in script and "--resume" in script and "'tracking.run_name=a b'" in script
    if nodes > 1:
        assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script and "SLURM_NODEID" in script and "srun" in script
    else:
        assert "srun" not in script


def test_every_comment_explains_its_directive():
    for template in (REPO / "slurm").glob("*.sbatch"):
        lines = template.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("#SBATCH"):
                assert lines[i + 1].startswith("# ^"), f"{template.name}: {line} has no explanation"


def test_directive_values_that_sbatch_cannot_carry_are_refused(tmp_path):
    with pytest.raises(LaunchError, match="the run directory .* contains '\"'"):
        render_script("job.yaml", [], SlurmRequest(gpus_per_node=1), tmp_path / 'say "hi"')


def test_bad_requests():
    with pytest.raises(LaunchError, match="--nproc-per-node is required"):
        render_script("job.yaml", [], SlurmRequest(gpus_per_node=0), Path("/tmp/x"))
    with pytest.raises(LaunchError, match="--time"):
        render_script("job.yaml", [], SlurmRequest(gpus_per_node=1, time="soon"), Path("/tmp/x"))


@pytest.mark.parametrize("colocated", [False, True])
def test_a_job_with_a_teacher_pool_renders_two_steps_without_its_token(tmp_path, colocated):
    request = SlurmRequest(nodes=2, gpus_per_node=8, teacher_nodes=1, teacher_gpus=2, teacher_colocated=colocated, teacher_port=9000, teacher_top_k=32,
                           teacher_extra=("--hidden-layers", "2,4", "--hidden-dim", "24"))
    script = render_pool_script("job.yaml", ["train.lr=1e-4"], request, tmp_path / "run")
    assert bash_parses(script)
    assert f"#SBATCH --nodes={2 if colocated else 3}" in script
    assert f'STUDENT_NODES=("${{NODES[@]:{0 if colocated else 1}}}")' in script
    assert script.count("srun --overlap") == 2 and "serve-teacher" in script and "--host 0.0.0.0 --port 9000 --top-k 32" in script
    assert "--engine builtin --hidden-layers 2,4 --hidden-dim 24" in script  # the pool serves the hidden states the students' terms ask for
    assert '--token-file "$TEACHER_TOKEN_FILE"' in script and '--set "teacher.token_file=$TEACHER_TOKEN_FILE"' in script
    assert "teacher.source=remote" in script and '--set "teacher.url=$TEACHER_URL"' in script and "scontrol requeue" in script
    assert "cut -d, -f1-2" in script  # the pool's 2 of the node's 8 GPUs
    # Colocated students take the GPUs the pool leaves: 6 processes per node; on nodes of their own, all 8.
    assert f"--nproc-per-node {6 if colocated else 8}" in script and ("cut -d, -f3-" in script) == colocated
    assert "token_urlsafe" in script and "umask 077" in script  # made at run time, readable by the user only


def test_bad_teacher_pool_requests():
    for request, message in ((SlurmRequest(gpus_per_node=1, teacher_colocated=True), "need --teacher-nodes"),
                             (SlurmRequest(gpus_per_node=4, teacher_nodes=1, teacher_gpus=5), r"--teacher-gpus must be in \[0, --gpus-per-node=4\]"),
                             (SlurmRequest(gpus_per_node=4, teacher_nodes=1, teacher_colocated=True), "leaves no GPU of the 4 for the students"),
                             (SlurmRequest(nodes=1, gpus_per_node=4, teacher_nodes=2, teacher_colocated=True, teacher_gpus=1), "is more than --nodes 1"),
                             (SlurmRequest(gpus_per_node=4, teacher_nodes=1, teacher_port=29500), "other than --master-port")):
        with pytest.raises(LaunchError, match=message):
            render_pool_script("job.yaml", [], request, Path("/tmp/x"))


def test_submit_dry_run_prints_the_script(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("teacher: {path: t}\nstudent: {architecture: {num_hidden_layers: 1}}\ndata: {train_files: [a.txt]}\n")
    result = distill_cli("submit", str(config), "--nodes", "2", "--gpus-per-node", "4", "--dry-run", "--output-dir", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("#!/bin/bash") and bash_parses(result.stdout)
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.fail("the SLURM tests start a local cluster and need root (as CI and the dev machines have)")
    up = subprocess.run(["bash", str(REPO / "slurm" / "cluster.sh"), "up"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    return True


def submit(tiny, corpus, out: Path, *sets: str) -> str:
    config = out.parent / f"{out.name}.yaml"
    config.write_text("{}\n")
    args = [a for o in job_overrides(tiny, corpus, out, "eval.speed=false", *sets) for a in ("--set", o)]
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = distill_cli("submit", str(config), "--nproc-per-node", "2", "--cpus-per-task", "2", "--time", "10",
                         "--launcher", "torchrun", "--master-port", str(free_port()), *args, env=env)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.split()[2].rstrip(":")
    assert f"logs: {out / 'slurm' / f'slurm-{job_id}.out'}" in result.stdout
    return job_id


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return next((w.split("=")[1] for w in out.split() if w.startswith("JobState=")), "GONE")


def first_attempt_cleaned_up(job_id: str) -> bool:
    """No process of the job is left on the node, and the node has finished completing it."""
    pids = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True)
    alive = pids.returncode == 0 and len(pids.stdout.strip().splitlines()) > 1  # a header line, then one line per process
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.lower()
    return not alive and "completing" not in states and "COMPLETING" not in subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_submitted_job_runs_to_completion(cluster, tiny, corpus, tmp_path):
    out = tmp_path / "runs with spaces" / "kd é"  # quoted through sbatch, bash and the launcher
    out.parent.mkdir()
    job_id = submit(tiny, corpus, out, "train.max_steps=8")
    state = wait_for(lambda: job_state(job_id) if job_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None, 300, "the job")
    log = (out / "slurm" / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "[distill] finished with status 0" in log
    assert (out / "slurm" / "job.sbatch").is_file()
    assert json.loads((out / "eval.json").read_text())["rows"][-1]["model"] == "student"
    assert [m["step"] for m in read_metrics(out) if "train/loss" in m] == list(range(1, 9))


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes(cluster, tiny, corpus, tmp_path):
    out = tmp_path / "run"
    job_id = submit(tiny, corpus, out, "train.max_steps=1500", "train.save_every=1000", "train.log_every=1")
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 20, 300, "training to start")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    # The job checkpoints, requeues itself and waits (BeginTime, which keeps a natural requeue clear
    # of the race below); the test releases it early, but only once the first attempt is gone.
    requeued = lambda: "Restarts=1" in subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    wait_for(lambda: requeued() and job_state(job_id) == "PENDING", 120, "the requeue")
    # The requeue is the script's own: it found the PREEMPTED marker the job wrote after its checkpoint.
    first = (out / "slurm" / f"slurm-{job_id}.out").read_text()
    assert f"requeueing job {job_id}" in first and "preempted: checkpoint of step" in first, first[-3000:]
    wait_for(lambda: first_attempt_cleaned_up(job_id), 300, "the first attempt to be cleaned up")
    # slurmd revokes the old attempt's credential with a one-second clock, and kills a launch whose
    # credential is not newer ("Job credential revoked"); start the next attempt after that second.
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)
    state = wait_for(lambda: job_state(job_id) if job_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None, 600, "the job")
    log = (out / "slurm" / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    preempted_at = int(log.split("preempted: checkpoint of step ")[1].split()[0])
    assert 20 <= preempted_at < 1500
    assert f"resuming from {out / 'checkpoints' / f'step_{preempted_at:08d}'} (step {preempted_at})" in log
    assert "attempt 0" in log and "attempt 1" in log  # one log, appended across the requeue
    steps = [m["step"] for m in read_metrics(out) if "train/loss" in m]
    assert steps == list(range(1, 1501))  # continued, not restarted
    assert not (out / "PREEMPTED").exists()


@pytest.mark.slow
def test_a_sweep_runs_as_one_job_array_sharing_one_teacher_pool_job(cluster, tiny, corpus, tmp_path):
    sweep_dir = tmp_path / "array sweep"
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    args = sweep_args(tiny, corpus, sweep_dir, "--grid", "loss.temperature=1,2", "--executor", "slurm", "--nproc-per-node", "1",
                      "--cpus-per-task", "1", "--parallel", "2", "--time", "10", "--master-port", str(free_port()),
                      "--teacher-pool", "--teacher-port", str(free_port()), "--teacher-top-k", "8", base=("eval.speed=false",))
    result = distill_cli(*args, env=env)
    assert result.returncode == 0, result.stderr
    pool = result.stdout.split("submitted the teacher pool as job ")[1].split(":")[0]
    array = result.stdout.split("submitted job array ")[1].split()[0]
    # Submitting again while the array runs would race its own tasks: refused.
    again = distill_cli(*args, env=env)
    assert again.returncode == 2 and f"has job array {array} still queued or running" in again.stderr
    done = lambda: all(job_state(j) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE") for j in (f"{array}_0", f"{array}_1", pool))
    wait_for(done, 600, "the array's tasks and the pool")
    served = (sweep_dir / "slurm" / f"pool-{pool}.out").read_text()
    # The pool job started first, served both tasks, and stopped by itself once the array was gone.
    assert "[distill] teacher pool ready at http://" in served and f"the array {array} has no task left; stopping the pool" in served
    url = served.split("[distill] teacher pool ready at ")[1].split()[0]
    for i, name in enumerate(("temperature=1", "temperature=2")):
        log = (sweep_dir / "slurm" / f"slurm-{array}_{i}.out").read_text()
        assert f"sweep task {i}" in log and "[distill] finished with status 0" in log, log[-3000:]
        assert f"[distill] teacher pool: {url}" in log and f"teacher: pool {url} (builtin engine, top-8 of 320 ids" in log
        assert json.loads((sweep_dir / name / "eval.json").read_text())["rows"][-1]["model"] == "student"
    assert json.loads((sweep_dir / "sweep.json").read_text())["slurm_jobs"] == [array]
    wait_for(lambda: "still queued" not in distill_cli(*args, env=env).stderr, 120, "the array to leave the queue")
    result = distill_cli(*args, env=env)
    assert result.returncode == 0 and "every run is finished; nothing to submit" in result.stdout
    compared = distill_cli("compare", str(sweep_dir))
    assert compared.returncode == 0 and (sweep_dir / "comparison.csv").is_file()


def submit_pooled(tiny, corpus, out: Path, *sets: str) -> tuple[str, int]:
    """`distill submit` of a 2-process student with a teacher pool colocated on the one node: (job id, the pool's port)."""
    config = out.parent / f"{out.name}.yaml"
    config.write_text("{}\n")
    args = [a for o in job_overrides(tiny, corpus, out, "eval.at_end=false", *sets) for a in ("--set", o)]
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    port = free_port()
    result = distill_cli("submit", str(config), "--nproc-per-node", "2", "--cpus-per-task", "2", "--time", "10", "--master-port", str(free_port()),
                         "--teacher-nodes", "1", "--teacher-colocated", "--teacher-port", str(port), "--teacher-top-k", "8", *args, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[2].rstrip(":"), port


@pytest.mark.slow
def test_a_teacher_pool_and_a_two_process_student_run_as_two_steps_of_one_job(cluster, tiny, corpus, tmp_path):
    out = tmp_path / "pooled"
    job_id, port = submit_pooled(tiny, corpus, out, "train.max_steps=8")
    token_file = out / "slurm" / "pool.token"
    token = wait_for(lambda: token_file.is_file() and token_file.read_text().strip(), 300, "the pool's token")
    assert token_file.stat().st_mode & 0o077 == 0  # the user's alone
    state = wait_for(lambda: job_state(job_id) if job_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None, 600, "the job")
    log = (out / "slurm" / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    host = subprocess.run(["scontrol", "show", "hostnames", subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True).stdout.strip()],
                          capture_output=True, text=True).stdout.split()[0]
    assert f"[distill] teacher pool ready at http://{host}:{port}" in log
    assert f"serve-teacher: ready: http://0.0.0.0:{port} (engine builtin, top-8 of 320 ids" in log and "token required" in log
    assert f"teacher: pool http://{host}:{port} (builtin engine, top-8 of 320 ids" in log
    assert "[distill] finished with status 0" in log
    assert [m["step"] for m in read_metrics(out) if "train/loss" in m] == list(range(1, 9))
    assert token not in log and token not in (out / "slurm" / "job.sbatch").read_text() and not token_file.exists()


@pytest.mark.slow
def test_a_preempted_pool_job_checkpoints_its_students_stops_its_pool_and_requeues_both(cluster, tiny, corpus, tmp_path):
    out = tmp_path / "preempted pool"
    job_id, _ = submit_pooled(tiny, corpus, out, "train.max_steps=1500", "train.save_every=1000")
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 10, 300, "training to start")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    log_file = out / "slurm" / f"slurm-{job_id}.out"
    wait_for(lambda: "requeueing job" in log_file.read_text(), 300, "the requeue")
    # Requeued (held until its credential has expired): the second attempt would start pool and students again; not waited for here.
    subprocess.run(["scancel", job_id], check=True)
    log = log_file.read_text()
    assert "[distill] SIGUSR1: asking the students to checkpoint and stop" in log
    step = int(log.split("preempted: checkpoint of step ")[1].split()[0])
    assert (out / "checkpoints" / f"step_{step:08d}").is_dir()
    assert f"requeueing job {job_id} (pool and students)" in log
    assert log.index("serve-teacher: stopped (") < log.index("requeueing job")  # the pool went down with the students, first
    assert not (out / "slurm" / "pool.token").exists()
