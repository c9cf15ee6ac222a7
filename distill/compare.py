"""``distill compare RUN_DIR... [-o OUT]``: many runs side by side.

One row per run: the settings that differ between the runs (only those) and the figures of its
report (the student's quality against the teacher, size, latency, throughput, trainable
parameters, steps, training time). Written as comparison.md and comparison.csv (pandas), with
plots (matplotlib): the runs' curves overlaid, and quality against latency and against size with
the Pareto front marked. Runs measured against different teachers or validation data are put in
separate groups, flagged in the table and the text, and never share a front.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from distill import plots
from distill.errors import ConfigError
from distill.rundir import RunDir, train_seconds

# Report figures of the student row, by column name; lower is better unless listed in HIGHER_IS_BETTER.
STUDENT_FIGURES = ("perplexity", "kl_to_teacher", "top1_agreement", "accuracy", "macro_f1", "params", "disk_bytes",
                   "latency_ms_per_token", "throughput_tokens_per_s")
HIGHER_IS_BETTER = {"top1_agreement", "accuracy", "macro_f1", "throughput_tokens_per_s", "speedup"}
METRICS = (*STUDENT_FIGURES, "ppl_vs_teacher", "speedup", "trainable_params", "steps", "train_seconds")
# Settings that always differ between runs and say nothing about the experiment.
IGNORED_SETTINGS = ("output_dir", "tracking.run_name", "tracking.group", "tracking.tags", "tracking.notes", "tracking.job_type")


def find_runs(paths: list[str]) -> list[Path]:
    """The run directories named, or held by the sweep directories named (in their sweep.json order)."""
    runs = []
    for raw in paths:
        path = Path(os.path.expanduser(raw)).resolve()
        if RunDir(path).is_run():
            runs.append(path)
            continue
        if (path / "sweep.json").is_file():
            listed = [path / r["name"] for r in json.loads((path / "sweep.json").read_text()).get("runs", [])]
            found = [run for run in listed if RunDir(run).is_run()]
        else:
            found = sorted(p for p in path.iterdir() if RunDir(p).is_run()) if path.is_dir() else []
        if not found:
            raise ConfigError(f"{raw} is neither a run directory (no config.yaml) nor a sweep holding runs; pass the output_dir of runs or a sweep directory")
        runs += found
    if len(set(runs)) != len(runs):
        raise ConfigError("a run is named twice; pass each run directory (or sweep) once")
    return runs


def flat_settings(config: dict, prefix: str = "") -> dict:
    """``{"loss.alpha": 0.5, ...}``: lists and free-form mappings as compact JSON, so that they compare."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name != "student.architecture":
            flat.update(flat_settings(value, f"{name}."))
        else:
            flat[name] = json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value
    return flat


def read_run(run_dir: Path) -> dict:
    """One run's settings, figures and the identities of its teacher and validation data."""
    run = RunDir(run_dir)
    config = run.read_config() or {}
    records = run.records()
    result = run.read_eval() or {}
    rows = {row.get("model"): row for row in result.get("rows", [])}
    student, teacher = rows.get("student", {}), rows.get("teacher", {})
    steps = max((r["step"] for r in records if "train/loss" in r), default=0)
    max_steps = config.get("train", {}).get("max_steps")
    figures = {key: student.get(key, math.nan) for key in STUDENT_FIGURES}
    if student.get("perplexity") and teacher.get("perplexity"):
        figures["ppl_vs_teacher"] = student["perplexity"] / teacher["perplexity"]
    if student.get("throughput_tokens_per_s") and teacher.get("throughput_tokens_per_s"):
        figures["speedup"] = student["throughput_tokens_per_s"] / teacher["throughput_tokens_per_s"]
    figures.update(trainable_params=result.get("student_trainable_params", math.nan), steps=steps, train_seconds=train_seconds(records))
    t, d = config.get("teacher", {}), config.get("data", {})
    return {
        "run": run_dir.name, "dir": run_dir, "records": records,
        "status": "finished" if student else f"unfinished ({steps}/{max_steps} steps)",
        "settings": {k: v for k, v in flat_settings(config).items() if k not in IGNORED_SETTINGS},
        "figures": figures,
        # What the quality figures are measured against: comparable only within one of each.
        "teacher": json.dumps({k: t.get(k) for k in ("path", "revision", "quantization", "quant_type", "dtype")} | {"params": teacher.get("params")}, sort_keys=True),
        "validation": json.dumps({k: d.get(k) for k in ("validation_files", "dataset", "validation_split", "seq_len", "max_validation_sequences",
                                                       "mixture")} | {"task": config.get("task"), "tokens": result.get("validation_tokens")}, sort_keys=True),
    }


def pareto_front(quality: list[float], cost: list[float]) -> list[bool]:
    """True where no other point is at least as good in both (lower is better in both) and better in one."""
    points = list(zip(quality, cost))
    def dominated(i):
        qi, ci = points[i]
        return any(q <= qi and c <= ci and (q < qi or c < ci) for j, (q, c) in enumerate(points) if j != i)
    return [not (math.isnan(q) or math.isnan(c)) and not dominated(i) for i, (q, c) in enumerate(points)]


def _groups(runs: list[dict], field: str, label: str) -> dict:
    """{identity: "T1"...} in first-seen order."""
    names = {}
    for run in runs:
        names.setdefault(run[field], f"{label}{len(names) + 1}")
    return names


def table(runs: list[dict], sort: str):
    """The comparison as a pandas DataFrame, sorted by ``sort`` (best first)."""
    import pandas as pd  # start-up time: pandas loads only when this runs

    settings = pd.DataFrame([run["settings"] for run in runs]).astype(object)
    differing = [c for c in settings.columns if settings[c].map(repr).nunique() > 1]
    frame = pd.concat([pd.DataFrame({"run": [r["run"] for r in runs], "status": [r["status"] for r in runs]}),
                       settings[differing].reset_index(drop=True),
                       pd.DataFrame([r["figures"] for r in runs])], axis=1)
    teachers, validations = _groups(runs, "teacher", "T"), _groups(runs, "validation", "V")
    if len(teachers) > 1:
        frame.insert(2, "teacher_group", [teachers[r["teacher"]] for r in runs])
    if len(validations) > 1:
        frame.insert(2, "validation_group", [validations[r["validation"]] for r in runs])
    frame = frame.dropna(axis=1, how="all")
    if sort not in frame.columns:
        if all(run["status"] != "finished" for run in runs):
            return frame  # nothing evaluated yet: nothing to sort by
        raise ConfigError(f"--sort {sort}: no run has it; choose one of {', '.join(c for c in METRICS if c in frame.columns)}")
    return frame.sort_values(sort, ascending=sort not in HIGHER_IS_BETTER, na_position="last", kind="stable").reset_index(drop=True)


def flags(runs: list[dict]) -> list[str]:
    """Warnings about runs that must not be read as one experiment."""
    lines = []
    for field, label, what in (("teacher", "T", "teachers"), ("validation", "V", "validation data")):
        groups = _groups(runs, field, label)
        if len(groups) > 1:
            members = {name: [r["run"] for r in runs if groups[r[field]] == name] for name in groups.values()}
            listed = "; ".join(f"{g}: {', '.join(m)}" for g, m in members.items())
            lines.append(f"WARNING: these runs have different {what} ({listed}); "
                         f"their quality figures compare only within a group ({field}_group column), and each group has its own Pareto front")
    unfinished = [r["run"] for r in runs if r["status"] != "finished"]
    if unfinished:
        lines.append(f"note: {len(unfinished)} run(s) have no final evaluation yet: {', '.join(unfinished)}")
    return lines


def curves_plot(runs: list[dict], path: Path) -> Path:
    fig, axes = plots.figure(2)
    for run in runs:
        steps, values = plots.series(run["records"], "train/loss")
        axes[0].plot(steps, values, label=run["run"])
        steps, values = plots.series(run["records"], "eval/perplexity")
        final = run["figures"].get("perplexity", math.nan)
        if not math.isnan(final):
            steps, values = [*steps, run["figures"]["steps"]], [*values, final]
        axes[1].plot(steps, values, marker="o", label=run["run"])
    axes[0].set(xlabel="step", title="training loss")
    axes[1].set(xlabel="step", title="validation perplexity (last point: final evaluation)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return plots.save(fig, path)


def tradeoff_plot(frame, quality: str, cost: str, group: str | None, path: Path) -> Path:
    """Quality against a cost, one marker per run, each group's Pareto front joined and starred."""

    fig, (ax,) = plots.figure(1)
    sign = -1 if quality in HIGHER_IS_BETTER else 1
    for name, part in (frame.groupby(group) if group else [("", frame)]):
        part = part.dropna(subset=[quality, cost])
        if part.empty:
            continue
        front = pareto_front((sign * part[quality]).tolist(), part[cost].tolist())
        points = ax.scatter(part[cost], part[quality], label=f"runs {name}".strip())
        on = part[front].sort_values(cost)
        ax.plot(on[cost], on[quality], marker="*", markersize=12, color=points.get_facecolor()[0], label=f"Pareto front {name}".strip())
        for _, row in part.iterrows():
            ax.annotate(row["run"], (row[cost], row[quality]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel=cost, ylabel=f"student {quality}", title=f"{quality} against {cost}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return plots.save(fig, path)


COUNTS = ("params", "trainable_params", "steps", "throughput_tokens_per_s")


def readable(frame):
    """The table as a person reads it: counts with thousands separators, 4 significant digits, MB on disk, "-" for none."""
    shown = frame.copy()
    if "disk_bytes" in shown.columns:
        shown["disk_bytes"] = shown["disk_bytes"] / 1e6
        shown = shown.rename(columns={"disk_bytes": "disk_MB"})
    for column in shown.columns:
        if column in METRICS or column == "disk_MB":
            fmt = "{:,.0f}" if column in COUNTS else "{:.4g}"
            shown[column] = [("-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)) for v in shown[column]]
    return shown


def compare(paths: list[str], out: str | None = None, sort: str = "perplexity") -> Path:
    """Writes OUT/comparison.md, comparison.csv and the plots; prints the table. Returns OUT."""
    if sort not in METRICS:
        raise ConfigError(f"--sort {sort!r} is not a figure of the comparison; choose one of {', '.join(METRICS)}")
    runs = [read_run(path) for path in find_runs(paths)]
    out_dir = Path(os.path.expanduser(out)).resolve() if out else _default_out(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = table(runs, sort)
    warnings = flags(runs)
    group = "teacher_group" if "teacher_group" in frame.columns else "validation_group" if "validation_group" in frame.columns else None
    quality = next((q for q in ("perplexity", "accuracy") if q in frame.columns), None)
    drawn = [curves_plot(runs, out_dir / "curves.png")]
    if quality is not None:
        for cost, name in (("latency_ms_per_token", "quality_vs_latency.png"), ("params", "quality_vs_size.png")):
            if cost in frame.columns:
                drawn.append(tradeoff_plot(frame, quality, cost, group, out_dir / name))
    frame.to_csv(out_dir / "comparison.csv", index=False)
    shown = readable(frame).to_markdown(index=False)
    lines = ["# Comparison", "", f"{len(runs)} runs, sorted by {sort} ({'higher' if sort in HIGHER_IS_BETTER else 'lower'} is better). "
             "Settings columns are those that differ between the runs; figures are the student's, from each run's final evaluation.", "",
             *[line for w in warnings for line in (f"**{w}**", "")], shown, "", *[f"![{p.stem}]({p.name})" for p in drawn], ""]
    (out_dir / "comparison.md").write_text("\n".join(lines))
    print(shown)
    for warning in warnings:
        print(warning, file=sys.stderr)
    print(f"\ncomparison: {out_dir / 'comparison.md'} (and comparison.csv, {', '.join(p.name for p in drawn)})")
    return out_dir


def _default_out(paths: list[str]) -> Path:
    """A single sweep's comparison goes into the sweep; anything else into ./comparison."""
    if len(paths) == 1:
        path = Path(os.path.expanduser(paths[0])).resolve()
        if not RunDir(path).is_run():
            return path
    return Path("comparison").resolve()
