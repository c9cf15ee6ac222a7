"""distill sweep (local executor, and the array script of the slurm one), distill compare and each run's plots, on real tiny runs."""

import csv
import json
import os
import subprocess

import pytest

from conftest import distill_cli, job_overrides, read_metrics, reset_accelerate, run_job, sweep_args

PNG = b"\x89PNG\r\n\x1a\n"


def sweep_cli(tiny, corpus, sweep_dir, *args, env=None, base=()):
    """The real command in its own process."""
    return distill_cli(*sweep_args(tiny, corpus, sweep_dir, *args, base=base), env=env)


def here(*argv, capsys):
    """A `distill` command in this process (where no run starts): (exit code, stdout, stderr)."""
    from distill_launcher.cli import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def sweep_here(tiny, corpus, sweep_dir, *args, capsys, base=()):
    return here(*sweep_args(tiny, corpus, sweep_dir, *args, base=base), capsys=capsys)


@pytest.fixture(scope="module")
def sweep(tiny, corpus, tmp_path_factory):
    """alpha x temperature, 4 real runs of 6 steps, run by the local executor."""
    sweep_dir = tmp_path_factory.mktemp("sweeps") / "at"
    proc = sweep_cli(tiny, corpus, sweep_dir, "--grid", "loss.alpha=0,0.5", "--grid", "loss.temperature=1,2", "--parallel", "2",
                     base=("train.log_every=2", "train.eval_every=3"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"dir": sweep_dir, "stdout": proc.stdout}


NAMES = ["alpha=0,temperature=1", "alpha=0,temperature=2", "alpha=0.5,temperature=1", "alpha=0.5,temperature=2"]


def test_a_sweep_runs_every_point_as_a_normal_run(sweep):
    root = sweep["dir"]
    listed = json.loads((root / "sweep.json").read_text())
    assert [r["name"] for r in listed["runs"]] == NAMES
    assert listed["runs"][3]["overrides"] == ["loss.alpha=0.5", "loss.temperature=2"]
    for name in NAMES:
        run = root / name
        config = (run / "config.yaml").read_text()
        assert f"run_name: {name}" in config and "group: at" in config  # one sweep, one group
        result = json.loads((run / "eval.json").read_text())
        assert [r["model"] for r in result["rows"]] == ["teacher", "initial_student", "student"]
        assert (root / "logs" / f"{name}.log").is_file()
    a, b = (json.loads((root / n / "eval.json").read_text())["rows"][-1]["perplexity"] for n in NAMES[:2])
    assert a != b  # the temperature reached the job


def test_each_run_has_plots_from_its_metrics_and_the_final_evaluation_in_its_history(sweep):
    run = sweep["dir"] / NAMES[2]
    result = json.loads((run / "eval.json").read_text())
    assert result["plots"] == ["plots/loss.png", "plots/validation.png", "plots/speed.png"]
    report = (run / "report.md").read_text()
    for path in result["plots"]:
        assert (run / path).read_bytes().startswith(PNG)
        assert f"]({path})" in report
    records = read_metrics(run)
    final = records[-1]
    assert final["step"] == 6 and final["final/student/perplexity"] == result["rows"][-1]["perplexity"]
    assert final["final/teacher/perplexity"] == result["rows"][0]["perplexity"]
    assert sum("train/step_seconds" in r for r in records) == 3


def test_distill_eval_redraws_the_plots(sweep):
    from distill.finished_run import evaluate_run

    run = sweep["dir"] / NAMES[0]
    for png in (run / "plots").glob("*.png"):
        png.unlink()
    reset_accelerate()
    evaluate_run(run)
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == ["loss.png", "speed.png", "validation.png"]


def test_compare_shows_what_differs_sorted_with_pareto_plots(sweep, capsys):
    root = sweep["dir"]
    assert "comparison: " in sweep["stdout"]  # the sweep ended with distill compare
    with open(root / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run"] for r in rows) == NAMES
    columns = set(rows[0])
    assert {"loss.alpha", "loss.temperature", "perplexity", "ppl_vs_teacher", "latency_ms_per_token", "params", "trainable_params",
            "steps", "train_seconds"} <= columns
    assert not columns & {"train.lr", "output_dir", "tracking.run_name", "teacher.path", "teacher_group"}  # the same in every run
    perplexities = [float(r["perplexity"]) for r in rows]
    assert perplexities == sorted(perplexities)
    from distill.train import train_seconds

    # Each run's training time as its own metrics.jsonl gives it (logged step times over the steps they cover).
    assert all(r["steps"] == "6" and float(r["train_seconds"]) == pytest.approx(train_seconds(read_metrics(root / r["run"])), rel=1e-3)
               and float(r["train_seconds"]) > 0 for r in rows)
    for name in ("curves.png", "quality_vs_latency.png", "quality_vs_size.png"):
        assert (root / name).read_bytes().startswith(PNG)
        assert f"]({name})" in (root / "comparison.md").read_text()
    # Sorted the other way round by a figure where higher is better.
    out = root / "by_agreement"
    code, _, err = here("compare", *(str(root / n) for n in NAMES), "-o", str(out), "--sort", "top1_agreement", capsys=capsys)
    assert code == 0, err
    with open(out / "comparison.csv") as f:
        agreement = [float(r["top1_agreement"]) for r in csv.DictReader(f)]
    assert agreement == sorted(agreement, reverse=True)


def test_the_same_sweep_again_skips_finished_runs(sweep, tiny, corpus, capsys):
    stamps = {n: os.stat(sweep["dir"] / n / "eval.json").st_mtime_ns for n in NAMES}
    code, out, err = sweep_here(tiny, corpus, sweep["dir"], "--grid", "loss.alpha=0,0.5", "--grid", "loss.temperature=1,2",
                                base=("train.log_every=2", "train.eval_every=3"), capsys=capsys)
    assert code == 0, err
    assert out.count("finished, skipped") == 4
    assert stamps == {n: os.stat(sweep["dir"] / n / "eval.json").st_mtime_ns for n in NAMES}


def test_runs_with_another_teacher_are_grouped_and_flagged(sweep, tiny, corpus, tmp_path, capsys):
    reset_accelerate()
    other, _ = run_job(tiny, corpus, tmp_path / "other_teacher", f"teacher.path={tiny['student']}", "eval.speed=false")
    code, _, err = here("compare", str(sweep["dir"]), str(other), "-o", str(tmp_path / "cmp"), capsys=capsys)
    assert code == 0, err
    assert "WARNING: these runs have different teachers" in err and "T2: other_teacher" in err
    with open(tmp_path / "cmp" / "comparison.csv") as f:
        groups = {r["run"]: r["teacher_group"] for r in csv.DictReader(f)}
    assert groups["other_teacher"] == "T2" and {groups[n] for n in NAMES} == {"T1"}
    assert "**WARNING: these runs have different teachers" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_a_failed_run_is_reported_and_the_next_sweep_resumes_it(tiny, corpus, tmp_path):
    sweep_dir = tmp_path / "faulty"
    args = ("--grid", "loss.alpha=0.5")
    base = ("train.max_steps=10", "train.save_every=4", "eval.speed=false")
    proc = sweep_cli(tiny, corpus, sweep_dir, *args, base=base, env={"DISTILL_FAULT": "0:7"})
    assert proc.returncode == 1
    assert "alpha=0.5: failed with exit code 1: RuntimeError: injected fault on rank 0 at step 7" in proc.stdout
    assert "1 of 1 runs failed; run the same command again" in proc.stderr
    proc = sweep_cli(tiny, corpus, sweep_dir, *args, base=base)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "alpha=0.5: resuming, loading the teacher" in proc.stdout
    for name in ("alpha=0.5",):
        assert "resuming from" in (sweep_dir / "logs" / f"{name}.log").read_text()
        assert [m["step"] for m in read_metrics(sweep_dir / name) if "train/loss" in m] == list(range(1, 11))


@pytest.mark.parametrize("grid, message", [
    (["loss.nope=1,2"], "--grid 'loss.nope=1,2': unknown config key: loss.nope"),
    (["train.max_steps=5,many"], "--grid point train.max_steps=many: train.max_steps: expected an integer, got 'many'"),
    (["loss.kind=forward_kl,cosine"], "loss.kind: must be one of"),
    ([], "the grid is empty"),
    (["loss.alpha="], "expected KEY=V1,V2,... with no empty value"),
    (["loss.alpha=0,0"], "repeats a value"),
    (["loss.alpha=0,1", "--random", "3"], "--random 3: the grid has 2 points"),
])
def test_bad_grids_fail_with_one_line_and_write_nothing(tiny, corpus, tmp_path, grid, message, capsys):
    args = [a for item in grid for a in (("--grid", item) if not item.startswith("--") and "=" in item else (item,))]
    code, out, err = sweep_here(tiny, corpus, tmp_path / "bad", *args, capsys=capsys)
    assert code == 2, err
    assert message in err.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()


def test_a_sweep_directory_is_not_reused_for_another_base_config(tiny, corpus, tmp_path, capsys):
    from distill_launcher.sweep import plan, record

    sweep_dir = tmp_path / "kept"
    config = tmp_path / "kept.yaml"
    config.write_text("{}\n")
    base = [o for o in job_overrides(tiny, corpus, tmp_path / "unused") if not o.startswith("output_dir=")]
    record(plan(str(config), base, ["loss.alpha=0,1"], sweep_dir=str(sweep_dir), draws=None, seed=0), "local")
    (sweep_dir / "alpha=0").mkdir()
    (sweep_dir / "alpha=0" / "mine.txt").write_text("kept")
    before = (sweep_dir / "sweep.json").read_text()
    code, out, err = sweep_here(tiny, corpus, sweep_dir, "--grid", "loss.alpha=0,1", base=("train.lr=1e-2",), capsys=capsys)
    assert code == 2
    assert f"sweep directory {sweep_dir} holds a sweep of another base config (differs in train.lr)" in err
    assert (sweep_dir / "sweep.json").read_text() == before and (sweep_dir / "alpha=0" / "mine.txt").read_text() == "kept"
    # A directory that holds something else is not taken over either.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    code, out, err = sweep_here(tiny, corpus, tmp_path / "busy", "--grid", "loss.alpha=0,1", capsys=capsys)
    assert code == 2 and "is not empty and holds no sweep.json" in err


def test_random_draws_are_seeded_subsets_of_the_grid(tiny, corpus, tmp_path, capsys):
    grid = ("--grid", "loss.alpha=0,0.25,0.5", "--grid", "loss.temperature=1,2,4", "--random", "3", "--dry-run", "--teacher-store", "never")
    first, again, other = (sweep_here(tiny, corpus, tmp_path / "r", *grid, "--seed", seed, capsys=capsys) for seed in ("1", "1", "2"))
    assert first[0] == 0, first[2]
    runs = lambda result: result[1].splitlines()[0].split("runs (")[1]
    assert runs(first) == runs(again) != runs(other)
    assert first[1].count(" run ") == 3 and not (tmp_path / "r").exists()


def test_compare_refuses_what_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "missing"):
        code, _, err = here("compare", str(path), capsys=capsys)
        assert code == 2
        assert err.strip().splitlines()[-1] == f"distill: error: {path} is neither a run directory (no config.yaml) nor a sweep holding runs; " \
                                                       "pass the output_dir of runs or a sweep directory"


def test_the_slurm_executor_renders_one_array(tiny, corpus, tmp_path, capsys):
    code, out, err = sweep_here(tiny, corpus, tmp_path / "arr", "--grid", "loss.alpha=0,0.5", "--grid", "loss.temperature=1,2", "--executor", "slurm",
                                "--nproc-per-node", "2", "--parallel", "2", "--master-port", "31000", "--dry-run", "--teacher-store", "never", capsys=capsys)
    assert code == 0, err
    script = out.split("\n", 1)[1]
    assert script.startswith("#!/bin/bash") and subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "#SBATCH --array=0-3%2" in script and "/slurm/slurm-%A_%a.out" in script and "#SBATCH --requeue" in script
    for i, name in enumerate(NAMES):
        assert f"    {i}) RUN_DIR={tmp_path / 'arr' / name}" in script.replace("'", "")
        assert f"--master-port {31000 + i}" in script
    assert script.count("--resume") == 4 and 'scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in script
    assert not (tmp_path / "arr").exists()


def test_optuna_proposes_points_from_finished_runs_and_continues_its_study(tiny, corpus, tmp_path):
    sweep_dir = tmp_path / "search"
    args = ("--grid", "loss.alpha=0,0.5", "--grid", "loss.temperature=1,2", "--search", "optuna", "--metric", "student.kl_to_teacher",
            "--seed", "3")
    base = ("train.max_steps=4", "eval.speed=false", "eval.initial=false")
    proc = sweep_cli(tiny, corpus, sweep_dir, *args, "--trials", "2", base=base)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trial 2/2" in proc.stdout and "best of 2 trials" in proc.stdout and (sweep_dir / "optuna.db").is_file()
    proc = sweep_cli(tiny, corpus, sweep_dir, *args, "--trials", "3", base=base)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trial 1/3" not in proc.stdout and "trial 3/3" in proc.stdout and "best of 3 trials" in proc.stdout
    best = float(proc.stdout.split("best of 3 trials: ")[1].split("student.kl_to_teacher = ")[1].split(")")[0])
    listed = json.loads((sweep_dir / "sweep.json").read_text())["runs"]
    values = [json.loads((sweep_dir / r["name"] / "eval.json").read_text())["rows"][-1]["kl_to_teacher"] for r in listed]
    assert 1 <= len(listed) <= 3 and best == pytest.approx(min(values), rel=1e-3)  # lower KL is better: minimized
    assert (sweep_dir / "comparison.csv").is_file()


def test_the_runs_of_a_local_sweep_share_one_teacher_pool(tiny, corpus, tmp_path):
    sweep_dir = tmp_path / "pooled"
    proc = sweep_cli(tiny, corpus, sweep_dir, "--grid", "loss.alpha=0,0.5", "--teacher-pool", "--teacher-top-k", "8", "--parallel", "2",
                     "--teacher-hidden-layers", "2", "--teacher-hidden-dim", "16", base=("eval.speed=false",))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    url = proc.stdout.split("[sweep] teacher pool ready at ")[1].split(";")[0]
    assert url.startswith("http://127.0.0.1:")
    for name in ("alpha=0", "alpha=0.5"):
        log = (sweep_dir / "logs" / f"{name}.log").read_text()
        assert f"teacher: pool {url} (builtin engine, top-8 of 320 ids" in log
        assert [m["step"] for m in read_metrics(sweep_dir / name) if "train/loss" in m] == list(range(1, 7))
    served = (sweep_dir / "logs" / "pool.log").read_text()
    assert "serve-teacher: ready" in served and "no token" not in served and "token required" in served
    assert "hidden states of layer(s) 2 reduced from 64 to 16 dimensions" in served  # --teacher-hidden-*: the pool serves them too
    assert (sweep_dir / "pool" / "token").stat().st_mode & 0o077 == 0
    assert not (sweep_dir / "pool" / "url").exists()  # stopped with the sweep
    assert (sweep_dir / "comparison.csv").is_file()


def test_a_teacher_pool_sweep_may_not_vary_the_teacher(tiny, corpus, tmp_path, capsys):
    code, out, err = sweep_here(tiny, corpus, tmp_path / "s", "--grid", "teacher.dtype=float32,bfloat16", "--teacher-pool", capsys=capsys)
    assert code == 2 and err.strip() == "distill: error: --teacher-pool serves one teacher to every run; the grid may not vary teacher.dtype"
    code, out, err = sweep_here(tiny, corpus, tmp_path / "s", "--grid", "loss.alpha=0,1", "--teacher-pool",
                                "--set", "loss.terms=[{kind: attention, weight: 1}]", capsys=capsys)
    assert code == 2 and "which the teacher pool does not give (only hidden states: distill serve-teacher --hidden-layers); use teacher.source=model" in err


def test_a_slurm_sweep_with_a_teacher_pool_renders_the_pool_job_and_the_tasks_wait_for_it(tiny, corpus, tmp_path, capsys):
    code, out, err = sweep_here(tiny, corpus, tmp_path / "s", "--grid", "loss.alpha=0,1", "--executor", "slurm", "--nproc-per-node", "1",
                                "--teacher-pool", "--teacher-port", "9100", "--partition", "cpu", "--account", "proj", "--dry-run", capsys=capsys)
    assert code == 0, err
    pool, array = out.split("\n", 1)[1].split("\n#!/bin/bash\n# A sweep of distill runs as one SLURM job array")
    assert pool.startswith("#!/bin/bash") and "serve-teacher" in pool and "--host 0.0.0.0 --port 9100" in pool
    assert '--token-file "$TOKEN_FILE"' in pool and "array.id" in pool and "token_urlsafe" in pool
    assert '#SBATCH --partition=cpu' in pool and '#SBATCH --account=proj' in pool  # where the array runs, the pool runs
    assert f"teacher.token_file={tmp_path / 's' / 'pool' / 'token'}" in array and "teacher.source=remote" in array
    assert '--set "teacher.url=$(cat ' in array and "probe" in array
    for script in (pool, "#!/bin/bash\n# A sweep" + array):
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
