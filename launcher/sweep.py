"""``distill sweep``: a grid (or random draws) of config overrides, run as normal run directories.

A sweep directory holds one run directory per point (``SWEEP_DIR/<name>/``, named by what
differs), ``sweep.json`` listing them with their overrides, and ``logs/`` (local executor) or
``slurm/`` (one job array). Running the same sweep again skips finished runs and resumes
interrupted ones; the sweep's base config is recorded, and a sweep directory is never reused
for another.

Every point is checked (keys, types, values) before anything is written or started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import random
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from distill import rundir
from distill.config import ConfigError, load_config, lookup_field, to_dict
from distill.rundir import RunDir
from distill_launcher import slurm
from distill_launcher.slurm import _directive_value, _directives, fill_template, launch_command

SWEEP_FILE = "sweep.json"
# The settings a run's own directory and name decide; they never make two sweeps different.
OWN_SETTINGS = ("output_dir", "tracking.run_name", "tracking.group")


@dataclass
class Run:
    name: str
    overrides: list  # the grid point's own overrides (the base's come first)
    dir: Path

    def state(self) -> str:
        """finished (student saved and evaluated), started (resume it) or new."""
        if rundir.RunDir(self.dir).finished():
            return "finished"
        return "started" if rundir.holds_run(self.dir) else "new"


def split_values(raw: str) -> list[str]:
    """``0.1,0.5`` -> ["0.1", "0.5"]; commas inside [...] or {...} belong to the value."""
    values, depth, current = [], 0, ""
    for char in raw:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return [v.strip() for v in [*values, current]]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["loss.alpha=0,0.5", ...]`` -> {"loss.alpha": ["0", "0.5"]}, each key checked against the config's options."""
    if not items:
        raise ConfigError("the grid is empty: give at least one --grid KEY=V1,V2 (e.g. --grid loss.alpha=0,0.5)")
    grid = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        values = split_values(raw) if sep else []
        if not key or not values or any(v == "" for v in values):
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... with no empty value (e.g. --grid loss.temperature=1,2)")
        try:
            lookup_field(key.split("."))
        except ConfigError as err:
            raise ConfigError(f"--grid {item!r}: {err}") from None
        if key in grid:
            raise ConfigError(f"--grid names {key} twice; give all its values in one --grid {key}=V1,V2")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {item!r} repeats a value; list each once")
        grid[key] = values
    return grid


def points(grid: dict[str, list[str]], *, draws: int | None, seed: int) -> list[dict[str, str]]:
    """Every combination, in grid order; or ``draws`` of them drawn without replacement (``--random N --seed S``)."""
    every = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    if draws is None:
        return every
    if not 1 <= draws <= len(every):
        raise ConfigError(f"--random {draws}: the grid has {len(every)} points; draw between 1 and {len(every)}")
    chosen = sorted(random.Random(seed).sample(range(len(every)), draws))
    return [every[i] for i in chosen]


def run_name(point: dict[str, str]) -> str:
    """``alpha=0.5,temperature=2``: the last part of each key (the whole key where two share it), file-name safe."""
    last = [key.rsplit(".", 1)[-1] for key in point]
    parts = [f"{short if last.count(short) == 1 else key}={value}" for (key, value), short in zip(point.items(), last)]
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))[:120]


def base_settings(config: str, overrides: list[str]) -> dict:
    """The resolved base config as flat settings (what makes two sweeps the same sweep)."""
    from distill.compare import flat_settings  # start-up time: distill.compare loads torch; only this command needs it

    flat = flat_settings(to_dict(load_config(config, overrides)))
    return {k: v for k, v in flat.items() if k not in OWN_SETTINGS}


@dataclass
class Sweep:
    dir: Path
    config: str
    base: list  # the --set overrides every run shares
    runs: list
    grid: dict | None = None  # key -> values (strings, as given)
    use_store: bool = True  # runs train from a teacher store that fits them (--teacher-store auto)
    stores: dict = field(default_factory=dict, repr=False)  # teacher, task and data settings -> the store found for them
    pool: bool = False  # the runs share one teacher pool (--teacher-pool): distill serve-teacher, teacher.source=remote
    pool_url: str | None = None  # known here for a local pool; a SLURM task reads it from pool/url when it starts

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def pool_dir(self) -> Path:
        """The pool's token, address (and the array's id) live here, readable by the user only."""
        return self.dir / "pool"

    def store(self, run: Run) -> str | None:
        """The teacher store built for this run's teacher and data, when the run can train from one.

        Only the teacher, task and data decide which store fits, so one lookup (which tokenizes the
        data) serves every run that shares them.
        """
        if not self.use_store or self.pool:
            return None
        cfg = load_config(self.config, [*self.base, *run.overrides])
        if cfg.teacher.source == "cache":
            return None  # chosen by the config itself
        settings = to_dict(cfg)
        key = json.dumps({k: settings[k] for k in ("teacher", "data", "task")}, sort_keys=True)
        if key not in self.stores:
            from distill.store import store_for  # start-up time: distill.store loads torch; only this command needs it

            self.stores[key] = store_for(cfg)
        path = self.stores[key]
        if path is None:
            return None
        try:  # an objective that needs the teacher itself (feature terms) keeps loading it
            load_config(self.config, [*self.base, *run.overrides, "teacher.source=cache", f"teacher.cache={path}"])
        except ConfigError:
            return None
        return str(path)

    def run_overrides(self, run: Run, store: str | None) -> list[str]:
        extra = ["teacher.source=cache", f"teacher.cache={store}"] if store else []
        if self.pool:
            extra = ["teacher.source=remote", f"teacher.token_file={self.pool_dir / 'token'}", *([f"teacher.url={self.pool_url}"] if self.pool_url else [])]
        return [*self.base, *run.overrides, *extra, f"output_dir={run.dir}", f"tracking.run_name={run.name}", f"tracking.group={self.name}"]


def plan(config: str, base: list[str], grid_items: list[str], *, sweep_dir: str | None, draws: int | None, seed: int,
         use_store: bool = True, pool: bool = False) -> Sweep:
    """Checks every point and the sweep directory; writes nothing."""
    grid = parse_grid(grid_items)
    served = [key for key in grid if key.startswith(("teacher.", "task."))]
    if pool and served:
        raise ConfigError(f"--teacher-pool serves one teacher to every run; the grid may not vary {', '.join(served)}")
    pooled = ["teacher.source=remote", "teacher.url=http://pool"] if pool else []  # the point is checked as it will run
    base_cfg = load_config(config, base)
    root = Path(os.path.expanduser(sweep_dir or f"{base_cfg.output_dir.rstrip('/')}-sweep")).resolve()
    runs = []
    for point in points(grid, draws=draws, seed=seed):
        overrides = [f"{k}={v}" for k, v in point.items()]
        try:
            load_config(config, [*base, *overrides, *pooled])
        except ConfigError as err:
            raise ConfigError(f"--grid point {', '.join(overrides)}: {err}") from None
        runs.append(Run(run_name(point), overrides, root / run_name(point)))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError("two grid points get the same run name; make the --grid values differ in more than punctuation")
    _check_reuse(root, config, base)
    return Sweep(root, str(Path(config).resolve()), list(base), runs, grid, use_store, pool=pool)


def _check_reuse(root: Path, config: str, base: list[str]) -> None:
    """A sweep directory holds one sweep: the same base config (after --set), or it is refused untouched."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"sweep directory {root} exists and is not a directory; choose another --sweep-dir")
    if not (root / SWEEP_FILE).is_file():
        if root.is_dir() and any(root.iterdir()):
            raise ConfigError(f"sweep directory {root} is not empty and holds no {SWEEP_FILE}; choose another --sweep-dir")
        return
    recorded = json.loads((root / SWEEP_FILE).read_text()).get("base_settings", {})
    now = base_settings(config, base)
    differ = sorted(k for k in set(recorded) | set(now) if recorded.get(k, "<absent>") != now.get(k, "<absent>"))
    if differ:
        shown = ", ".join(differ[:6]) + (" ..." if len(differ) > 6 else "")
        raise ConfigError(f"sweep directory {root} holds a sweep of another base config (differs in {shown}); "
                          "use the same config and --set values, or choose another --sweep-dir")


def check_no_array_running(sweep: Sweep) -> None:
    """Refuses to submit while an array this sweep submitted is still queued or running (its tasks would meet their own runs' locks)."""
    path = sweep.dir / SWEEP_FILE
    jobs = json.loads(path.read_text()).get("slurm_jobs", []) if path.is_file() else []
    if not jobs:
        return
    queued = subprocess.run(["squeue", "-h", "-j", ",".join(jobs), "-o", "%i"], capture_output=True, text=True)
    alive = sorted({line.split("_")[0] for line in queued.stdout.split()})
    if alive:
        raise ConfigError(f"sweep {sweep.dir} has job array {', '.join(alive)} still queued or running; wait for it "
                          f"(squeue -j {','.join(alive)}) or cancel it (scancel {' '.join(alive)}), then run the sweep again")


def record(sweep: Sweep, executor: str, *, slurm_job: str | None = None) -> None:
    """Writes (or extends) sweep.json: the base config and every run with its overrides."""
    path = sweep.dir / SWEEP_FILE
    previous = json.loads(path.read_text()) if path.is_file() else {}
    runs = {r["name"]: r for r in previous.get("runs", [])}
    runs.update({r.name: {"name": r.name, "overrides": r.overrides} for r in sweep.runs})
    value = {"config": sweep.config, "base_overrides": sweep.base, "base_settings": base_settings(sweep.config, sweep.base),
             "executor": executor, "runs": list(runs.values()),
             "slurm_jobs": [*previous.get("slurm_jobs", []), *([slurm_job] if slurm_job else [])]}
    sweep.dir.mkdir(parents=True, exist_ok=True)
    rundir.write_atomic(path, json.dumps(value, indent=2))


def run_command(sweep: Sweep, run: Run, store: str | None) -> list[str]:
    argv = [sys.executable, "-m", "distill_launcher.cli", "run", sweep.config]
    for item in sweep.run_overrides(run, store):
        argv += ["--set", item]
    return argv + (["--resume"] if run.state() == "started" else [])


def run_local(sweep: Sweep, *, parallel: int = 1) -> int:
    """Runs the unfinished runs, ``parallel`` at a time, each ``distill run`` in its own process
    (output in SWEEP_DIR/logs/NAME.log); returns the number that failed."""
    if parallel < 1:
        raise ConfigError(f"--parallel must be >= 1 (got {parallel})")
    record(sweep, "local")
    logs = sweep.dir / "logs"
    logs.mkdir(exist_ok=True)
    todo = []
    for run in sweep.runs:
        state = run.state()
        if state == "finished":
            print(f"[sweep] {run.name}: finished, skipped")
            continue
        store = sweep.store(run)
        how = f"from the teacher store {store}" if store else "loading the teacher"
        todo.append((run, run_command(sweep, run, store), f"{'resuming' if state == 'started' else 'starting'}, {how}"))
    # Runs side by side share the cores rather than each taking them all.
    env = {**os.environ}
    if parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    failed, running = [], []
    # Stopped (Ctrl-C, SIGTERM, scancel of a local sweep): the runs get SIGTERM, save a checkpoint
    # and stop; the same command later resumes them.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while todo or running:
            while todo and len(running) < parallel:
                run, argv, what = todo.pop(0)
                print(f"[sweep] {run.name}: {what}", flush=True)
                log = open(logs / f"{run.name}.log", "a")
                running.append((run, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True), log))
            for item in list(running):
                run, proc, log = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()
                if proc.returncode == 0:
                    print(f"[sweep] {run.name}: finished", flush=True)
                else:
                    failed.append(run.name)
                    print(f"[sweep] {run.name}: failed with exit code {proc.returncode}: {_last_line(logs / f'{run.name}.log')} "
                          f"(log: {logs / (run.name + '.log')})", flush=True)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for run, proc, log in running:
            proc.terminate()
        for run, proc, log in running:
            proc.wait()
            print(f"[sweep] {run.name}: stopped (exit code {proc.returncode}); run the sweep again to resume it", flush=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return len(failed)


def serve_command(sweep: Sweep, *, host: str, port: int, top_k: int, engine: str, python: str = sys.executable, extra: tuple = ()) -> list[str]:
    """``distill serve-teacher`` for the sweep's base config (its teacher, tokenizer and task), without the token option."""

    return slurm.serve_command(sweep.config, sweep.base, host=host, port=port, top_k=top_k, engine=engine, python=python, extra=extra)


def _new_token(path: Path) -> None:
    """A random token in ``path``, readable by the user only (created so, never chmod-ed after)."""

    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")


@contextlib.contextmanager
def local_pool(sweep: Sweep, *, top_k: int = 64, engine: str = "builtin", timeout: float = 1800.0, extra: tuple = ()):
    """With ``--teacher-pool`` on this machine: one ``distill serve-teacher`` on loopback for every run
    of the sweep, started before the first and stopped after the last (log: SWEEP_DIR/logs/pool.log)."""
    if not sweep.pool or all(run.state() == "finished" for run in sweep.runs):
        yield
        return
    from distill.service import probe  # start-up time: distill.service loads torch; only this command needs it

    _new_token(sweep.pool_dir / "token")
    address = sweep.pool_dir / "url"
    address.unlink(missing_ok=True)
    (sweep.dir / "logs").mkdir(parents=True, exist_ok=True)
    log = open(sweep.dir / "logs" / "pool.log", "a")
    argv = [*serve_command(sweep, host="127.0.0.1", port=0, top_k=top_k, engine=engine, extra=extra), "--token-file", str(sweep.pool_dir / "token"),
            "--address-file", str(address)]
    print(f"[sweep] starting the teacher pool (log: {sweep.dir / 'logs' / 'pool.log'})", flush=True)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not (address.is_file() and probe(address.read_text().strip()) == 0):
            if proc.poll() is not None:
                raise ConfigError(f"--teacher-pool: the pool exited with code {proc.returncode} before it was ready: "
                                  f"{_last_line(sweep.dir / 'logs' / 'pool.log')}")
            if time.monotonic() > deadline:
                raise ConfigError(f"--teacher-pool: the pool was not ready after {timeout:.0f} s (log: {sweep.dir / 'logs' / 'pool.log'})")
            time.sleep(0.3)
        sweep.pool_url = address.read_text().strip()
        print(f"[sweep] teacher pool ready at {sweep.pool_url}; every run asks it for the teacher's targets", flush=True)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        address.unlink(missing_ok=True)
        sweep.pool_url = None


def render_pool(sweep: Sweep, request, *, gpus: int, port: int, top_k: int, engine: str, python: str = sys.executable, extra: tuple = ()) -> str:
    """The sbatch script of the sweep's pool job (slurm/sweep_pool.sbatch): serves until the array is gone."""

    if gpus < 0 or not 0 < port < 65536:
        raise ConfigError(f"--teacher-gpus must be >= 0 and --teacher-port in [1, 65535] (got {gpus}, {port})")
    values = {
        "job_name": _directive_value(f"{request.job_name}-pool", "--job-name"),
        "cpus_per_task": str(request.cpus()),
        "gpus_directive": f"#SBATCH --gpus-per-node={gpus}\n# ^ GPUs of the pool" if gpus else "# (no GPUs requested: the teacher runs on CPU)",
        "extra_directives": _directives(request)[1],  # the array's partition, account and extra lines
        "time": request.time,
        "log": _directive_value(str(sweep.dir / "slurm").replace("%", "%%") + "/pool-%j.out", "the sweep directory"),
        "pool_dir": shlex.quote(str(sweep.pool_dir)),
        "python": shlex.quote(python),
        "port": str(port),
        "serve_command": shlex.join(serve_command(sweep, host="0.0.0.0", port=port, top_k=top_k, engine=engine, python=python, extra=extra)),
    }
    return fill_template("sweep_pool.sbatch", values)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _last_line(path: Path) -> str:
    lines = [line for line in re.split(r"[\r\n]", path.read_text(errors="replace")) if line.strip()]  # \r: progress bars
    return lines[-1].strip() if lines else "(no output)"


def render_array(sweep: Sweep, request, *, parallel: int, python: str = sys.executable) -> tuple[str, list[Run]]:
    """One SLURM job array over the unfinished runs: task i runs ``distill launch ... --resume`` for run i."""

    request.check()
    pending = [run for run in sweep.runs if run.state() != "finished"]
    if not pending:
        return "", []
    cases = []
    for index, run in enumerate(pending):
        command = launch_command(sweep.config, sweep.run_overrides(run, sweep.store(run)), request, python=python)
        # Tasks may share a node: each rendezvous on its own port.
        command[4:4] = ["--master-port", str(request.master_port + index)]
        cases.append(f"    {index}) RUN_DIR={shlex.quote(str(run.dir))}; set -- {shlex.join(command)} ;;")
    pool_wait = ""
    if sweep.pool:  # the pool job started first (--dependency=after); wait until it has written its address and answers
        url_file = shlex.quote(str(sweep.pool_dir / "url"))
        pool_wait = f"""# The sweep's teacher pool (a job of its own): wait for its address, then for it to answer.
for _ in $(seq 1800); do
    if [ -s {url_file} ] && {shlex.quote(python)} -c 'import sys; from distill.service import probe; sys.exit(probe(sys.argv[1]))' "$(cat {url_file})"; then
        break
    fi
    sleep 1
done
[ -s {url_file} ] || {{ echo "[distill] the sweep's teacher pool never became ready (see pool-*.out)"; exit 1; }}
set -- "$@" --set "teacher.url=$(cat {url_file})"
echo "[distill] teacher pool: $(cat {url_file})"
"""
    gpus, extra = _directives(request)
    values = {
        "job_name": _directive_value(request.job_name, "--job-name"),
        "cpus_per_task": str(request.cpus()),
        "gpus_directive": gpus, "extra_directives": extra, "time": request.time,
        "array": f"0-{len(pending) - 1}%{parallel}",
        "log": _directive_value(str(sweep.dir / "slurm").replace("%", "%%") + "/slurm-%A_%a.out", "the sweep directory"),
        "signal_seconds": str(request.signal_seconds),
        "cases": "\n".join(cases),
        "pool_wait": pool_wait,
    }
    return fill_template("sweep_array.sbatch", values), pending


def figure(run: Run, metric: str) -> float | None:
    """``student.perplexity`` -> the student row's perplexity in the run's eval.json (None when absent)."""

    model, _, key = metric.partition(".")
    rows = (RunDir(run.dir).read_eval() or {}).get("rows", [])
    value = next((r.get(key) for r in rows if r.get("model") == model), None)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def run_optuna(sweep: Sweep, *, trials: int, metric: str, seed: int) -> int:
    """Optuna proposes the grid's values one trial at a time from the finished runs' ``metric``;
    each trial is a normal run of the sweep. The study lives in SWEEP_DIR/optuna.db: run the same
    command again to continue it up to ``trials``. Returns the number of failed trials."""
    try:
        import optuna  # optional dependency (distill[sweep])
    except ImportError:
        raise ConfigError("--search optuna needs optuna: pip install 'distill[sweep]' (or pip install optuna)") from None
    from distill.compare import HIGHER_IS_BETTER  # start-up time: distill.compare loads torch; only this command needs it

    model, _, key = metric.partition(".")
    if not model or not key:
        raise ConfigError(f"--metric {metric!r}: expected MODEL.FIGURE, e.g. student.perplexity or student.accuracy")
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1 (got {trials})")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep.dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=sweep.name, storage=f"sqlite:///{sweep.dir / 'optuna.db'}", load_if_exists=True,
                                direction="maximize" if key in HIGHER_IS_BETTER else "minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    done = [t for t in study.trials if t.state.is_finished()]
    failed = 0
    for number in range(len(done), trials):
        trial = study.ask()
        try:
            point = {k: trial.suggest_categorical(k, values) for k, values in sweep.grid.items()}
        except ValueError:  # optuna: a parameter's choices changed between calls of one study
            raise ConfigError(f"the Optuna study in {sweep.dir / 'optuna.db'} was made with other --grid values; "
                              "use the same --grid or another --sweep-dir") from None
        run = Run(run_name(point), [f"{k}={v}" for k, v in point.items()], sweep.dir / run_name(point))
        print(f"[sweep] trial {number + 1}/{trials}: {run.name}", flush=True)
        failed_runs = run_local(dataclasses.replace(sweep, runs=[run])) if run.state() != "finished" else 0
        value = figure(run, metric)
        if failed_runs or value is None:
            failed += 1
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        study.tell(trial, value)
        print(f"[sweep] trial {number + 1}: {metric} = {value:.4g}", flush=True)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if finished:
        best = study.best_trial
        print(f"[sweep] best of {len(finished)} trials: {run_name(best.params)} ({metric} = {best.value:.4g})")
    return failed
