"""The plots of `trainctl report`, drawn off-screen on matplotlib's Agg canvas (no display needed):

- `curves.png`: against the optimizer step, the monitored validation metric (left) and the loss
  (right), each with its measurement on the training batches (`val/acc` and `train/acc`, `val/loss` and
  `train/loss`): validation solid, training dashed in the run's colour, so the gap between them shows
  over- or under-fitting; one colour per run, the best run drawn thicker. When the monitor is a loss,
  the right panel shows the task's next metric that has a training twin (`mse`, `ppl`);
- `lr.png`: the learning rate of every run;
- `heatmap.png`: when two numeric settings were swept, the optimized metric over their grid (the best
  run of each cell when other settings were swept too), or a scatter plot when a sampler such as
  Optuna's picked too many distinct values for a grid.

Each `*_figure` function returns the Figure, so what is drawn can be checked before it is saved.
Importing this module imports matplotlib (the `report` extra); `trainctl report` works without it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trainctl.runs import RunRecord

if TYPE_CHECKING:
    from trainctl.report import Report

MAX_GRID_VALUES = 12
"""More distinct values than this on an axis, or a grid with empty cells (values a sampler picked): a
scatter plot instead of a heatmap."""


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _label(report: Report, run: RunRecord) -> str:
    setting = " ".join(f"{k.rsplit('.', 1)[-1]}={run.overrides.get(k)}" for k in report.varying)
    label = f"{report.names[run.path]} {setting}".strip()
    return label if len(label) <= 48 else label[:45] + "..."


def _draw(ax: Any, report: Report, key_of: Callable[[RunRecord], Optional[str]], dashed: bool = False,
          labelled: Sequence[RunRecord] = ()) -> List[RunRecord]:
    """One line per run that logged the key, in the run's colour (dashed: a training twin, labelled
    only for runs not in ``labelled``); returns the runs drawn."""
    drawn = []
    for i, run in enumerate(report.runs):
        key = key_of(run)
        steps, values = run.series(key) if key else ([], [])
        if not steps:
            continue
        best = run is report.best
        ax.plot(steps, values, marker="o" if len(steps) < 3 else None, markersize=3, color=f"C{i % 10}",
                linestyle="--" if dashed else "-", linewidth=2.4 if best else 1.2, alpha=1.0 if best else 0.8,
                label=None if run in labelled else _label(report, run), zorder=3 if best else 2)
        drawn.append(run)
    return drawn


def train_twin(key: Optional[str]) -> Optional[str]:
    """`val/X` -> `train/X` (as :func:`trainctl.report.train_twin`, which imports this module)."""
    return "train/" + key[4:] if key and key.startswith("val/") else None


def _pair(ax: Any, report: Report, key_of: Callable[[RunRecord], Optional[str]], name: str) -> None:
    """A validation metric (solid) and its training twin (dashed) of every run."""
    drawn = _draw(ax, report, key_of)
    twins = _draw(ax, report, lambda run: train_twin(key_of(run)), dashed=True, labelled=drawn)
    ax.set_title(f"{name}: validation (solid)" + (", training (dashed)" if twins else ""))
    ax.set_ylabel(name)
    values = [v for line in ax.get_lines() for v in line.get_ydata()]
    if name.endswith(("loss", "mse", "ppl")) and values and min(values) > 0 and max(values) / min(values) > 50:
        ax.set_yscale("log")


def second_metric(report: Report) -> str:
    """The right panel's validation metric: the loss, or when the monitor is a loss the task's next
    metric that some run also logged on its training batches."""
    monitors = {run.monitor for run in report.runs if run.monitor}
    if not all(m.endswith("loss") for m in monitors):
        return "val/loss"
    logged = {k for run in report.runs for r in run.records for k in r}
    return next((k for k in ("val/acc", "val/mse", "val/mae", "val/ppl") if k in logged and train_twin(k) in logged),
                "val/loss")


def _legend(ax: Any) -> None:
    if 0 < len([line for line in ax.get_lines() if not line.get_label().startswith("_")]) <= 12:
        ax.legend(fontsize=7, loc="best")


def curves_figure(report: Report) -> Figure:
    """The monitored metric and the loss (or the task's next metric) of every run, overlaid, each on
    the validation set and on the training batches."""
    fig = _figure(11, 4.2)
    val_ax, loss_ax = fig.subplots(1, 2)
    monitor = report.monitor
    _pair(val_ax, report, lambda run: run.monitor, (monitor or "monitored metric").split("/", 1)[-1])
    second = second_metric(report)
    if second == "val/loss" and (monitor or "").endswith("loss"):  # no other metric: the training loss alone
        _draw(loss_ax, report, lambda run: "train/loss")
        loss_ax.set_title("training loss")
        loss_ax.set_ylabel("train/loss")
    else:
        _pair(loss_ax, report, lambda run: second, second.split("/", 1)[1])
    for ax in (val_ax, loss_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _legend(val_ax)
    return fig


def lr_figure(report: Report) -> Figure:
    """The learning rate of every run against the step."""
    fig = _figure(6.5, 4.2)
    ax = fig.subplots()
    _draw(ax, report, lambda run: "lr")
    ax.set_title("learning rate")
    ax.set_xlabel("step")
    ax.set_ylabel("lr")
    ax.grid(alpha=0.3)
    _legend(ax)
    return fig


def numeric_axes(report: Report) -> List[str]:
    """The swept settings whose values are all numbers."""
    axes = []
    for key in report.varying:
        values = [run.overrides.get(key) for run in report.runs]
        try:
            numbers = [float(v) for v in values]  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if len(set(numbers)) > 1:
            axes.append(key)
    return axes


def heatmap_figure(report: Report) -> Optional[Figure]:
    """The optimized metric over two swept numeric settings; None with fewer than two."""
    axes = numeric_axes(report)
    if len(axes) < 2:
        return None
    x_key, y_key = axes[:2]
    points = [(float(r.overrides[x_key]), float(r.overrides[y_key]), report.value(r)) for r in report.runs]
    xs, ys = sorted({p[0] for p in points}), sorted({p[1] for p in points})
    fig = _figure(6.5, 5)
    ax = fig.subplots()
    others = [k for k in report.varying if k not in (x_key, y_key)]
    filled = {(x, y) for x, y, _ in points}
    if len(xs) > MAX_GRID_VALUES or len(ys) > MAX_GRID_VALUES or len(filled) < len(xs) * len(ys):
        _scatter(fig, ax, points, report.label)  # sampled values, not a grid
        title = f"{report.label} of each run"
    else:
        _grid(fig, ax, points, xs, ys, report)
        title = report.label + (" (best over " + ", ".join(others) + ")" if others else "")
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    ax.set_title(title, fontsize=10)
    return fig


def _grid(fig: Figure, ax: Any, points: Sequence, xs: List[float], ys: List[float], report: Report) -> None:
    import numpy as np

    grid = np.full((len(ys), len(xs)), np.nan)
    for x, y, value in points:
        if value is None or not math.isfinite(value):
            continue
        i, j = ys.index(y), xs.index(x)
        old = grid[i, j]
        if math.isnan(old) or (value > old if report.mode == "max" else value < old):
            grid[i, j] = value
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis" if report.mode == "max" else "viridis_r")
    fig.colorbar(image, ax=ax, label=report.label)
    ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(ys)):
        for j in range(len(xs)):
            value = grid[i, j]
            text = "failed" if math.isnan(value) else f"{value:.4g}"
            dark = math.isnan(value) or (value < middle) == (report.mode == "max")
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")


def _scatter(fig: Figure, ax: Any, points: Sequence, label: str) -> None:
    done = [(x, y, v) for x, y, v in points if v is not None and math.isfinite(v)]
    failed = [(x, y) for x, y, v in points if v is None or not math.isfinite(v)]
    if done:
        image = ax.scatter([p[0] for p in done], [p[1] for p in done], c=[p[2] for p in done], cmap="viridis")
        fig.colorbar(image, ax=ax, label=label)
    if failed:
        ax.scatter([p[0] for p in failed], [p[1] for p in failed], marker="x", color="red", label="failed")
        ax.legend(fontsize=7)
    for axis, values in (("x", [p[0] for p in points]), ("y", [p[1] for p in points])):
        if min(values) > 0 and max(values) / min(values) > 20:
            (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def figures(report: Report) -> Dict[str, Figure]:
    """Every plot that applies to the report, by file name."""
    found = {"curves.png": curves_figure(report), "lr.png": lr_figure(report)}
    heatmap = heatmap_figure(report) if len(report.runs) > 1 else None
    if heatmap is not None:
        found["heatmap.png"] = heatmap
    return found


def write_plots(report: Report, out_dir: Path) -> Dict[str, Path]:
    """Save every plot as PNG into ``out_dir`` (each written under a temporary name, then renamed)."""
    import os

    written = {}
    for name, fig in figures(report).items():
        path = out_dir / name
        tmp = path.with_name(f".{name}.tmp")
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
        written[name] = path
    return written
