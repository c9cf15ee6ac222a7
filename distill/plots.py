"""A run's curves as PNG files, drawn from its metrics.jsonl (and eval.json for the final point).

Drawn at the end of training and again by ``distill eval``; anything that can read a run
directory can redraw them. matplotlib's object API (``Figure``) needs no display and keeps no
global state, so drawing works headless and from any thread.
"""

from __future__ import annotations

import io
from pathlib import Path

from distill.rundir import RunDir, write_atomic

PLOTS_DIR = RunDir.PLOTS
# Validation metrics worth a panel, in this order, when the run logged them.
VALIDATION_METRICS = ("perplexity", "kl_to_teacher", "top1_agreement", "accuracy", "macro_f1", "ce")


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the records that hold a number for it."""
    points = [(r["step"], float(r[key])) for r in records if _number(r.get(key)) and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def figure(panels: int):
    from matplotlib.figure import Figure  # start-up time: matplotlib loads only when this runs

    fig = Figure(figsize=(5.0 * panels, 3.6), layout="constrained")
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def save(fig, path: Path) -> Path:
    """Written under a temporary name and renamed: a reader never sees half a PNG."""

    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    write_atomic(path, buffer.getvalue())
    return path


TERM_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1)))  # a term's line style: a term equal to the total (one term) still shows


def loss_figure(records: list[dict]):
    """The training loss and each named term of the objective against steps; None without any.

    The total is drawn wide and pale, each term on top of it thin, in a style of its own and with
    sparse markers, so that a term equal to the total (an objective of one term) stays visible;
    its label says so."""
    keys = ["train/loss"] + sorted({k for r in records for k in r if k.startswith("train/") and k.endswith("_loss")})
    drawn = [(k, *series(records, k)) for k in keys]
    drawn = [d for d in drawn if d[1]]
    if not drawn:
        return None
    fig, (ax,) = figure(1)
    total = dict(zip(drawn[0][1], drawn[0][2])) if drawn[0][0] == "train/loss" else {}
    for i, (key, steps, values) in enumerate(drawn):
        label = key.removeprefix("train/")
        if key == "train/loss":
            ax.plot(steps, values, label=label, linewidth=4.0, alpha=0.45)
            continue
        if total and all(abs(total.get(s, float("nan")) - v) <= 1e-6 * max(1.0, abs(v)) for s, v in zip(steps, values)):
            label += " (= loss)"
        ax.plot(steps, values, label=label, linewidth=1.3, linestyle=TERM_STYLES[(i - 1) % len(TERM_STYLES)], marker="o",
                markersize=3, markevery=max(1, len(steps) // 12))
    ax.set(xlabel="step", ylabel="loss (per target token)", title="training loss and its terms")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def loss_plot(records: list[dict], path: Path) -> Path | None:
    fig = loss_figure(records)
    return save(fig, path) if fig is not None else None


def validation_plot(records: list[dict], result: dict | None, initial: dict | None, path: Path) -> Path | None:
    """Validation metrics against steps: the student before training at step 0, the mid-training
    evaluations, the saved student's final evaluation last; the teacher's figure as a dashed line."""
    rows = {r.get("model"): r for r in (result or {}).get("rows", [])}
    last = (result or {}).get("steps")
    panels = []
    for metric in VALIDATION_METRICS:
        steps, values = series(records, f"eval/{metric}")
        if initial is not None and _number(initial.get(metric)):
            steps, values = [0, *steps], [float(initial[metric]), *values]
        if isinstance(last, int) and _number(rows.get("student", {}).get(metric)):
            steps, values = [*steps, last], [*values, float(rows["student"][metric])]
        if steps:
            panels.append((metric, steps, values, rows.get("teacher", {}).get(metric)))
    if not panels:
        return None
    fig, axes = figure(len(panels))
    for ax, (metric, steps, values, teacher) in zip(axes, panels):
        ax.plot(steps, values, marker="o", label="student")
        if _number(teacher):
            ax.axhline(teacher, linestyle="--", color="gray", label="teacher")
            ax.legend(fontsize=8)
        ax.set(xlabel="step", title=f"validation {metric}")
        if metric == "perplexity" and max(values) > 10 * min(values):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    return save(fig, path)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def speed_plot(records: list[dict], path: Path) -> Path | None:
    """Training throughput and the share of step time the teacher took."""
    panels = [(key, title, *series(records, key)) for key, title in
              (("train/tokens_per_s", "training tokens/s"), ("train/teacher_time_share", "teacher share of step time"))]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    fig, axes = figure(len(panels))
    for ax, (key, title, steps, values) in zip(axes, panels):
        ax.plot(steps, values)
        ax.set(xlabel="step", title=title)
        if key == "train/teacher_time_share":
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    return save(fig, path)


def draw_run(run_dir: Path, result: dict | None = None) -> list[Path]:
    """Draws RUN_DIR/plots/{loss,validation,speed}.png from metrics.jsonl, initial_eval.json and
    ``result`` (default: eval.json); returns the files drawn."""
    run = RunDir(run_dir)
    records = run.records()
    result = result if result is not None else run.read_eval()
    out = run.plots
    drawn = [loss_plot(records, out / "loss.png"),
             validation_plot(records, result, run.read_initial_eval(), out / "validation.png"),
             speed_plot(records, out / "speed.png")]
    return [p for p in drawn if p is not None]


def markdown(paths: list[Path], run_dir: Path) -> list[str]:
    """The report's "Curves" section, linking the PNGs relative to report.md."""
    if not paths:
        return []
    return ["## Curves", "", *[f"![{p.stem}]({p.relative_to(run_dir).as_posix()})" for p in paths], ""]
