"""`trainctl report PATH...`: the runs of a sweep (or any run directories) side by side.

One row per run: the overrides that differ between the runs, the optimized metric (the rows are
sorted by it, the best run highlighted), the best and final monitored metric, the final gap between
the monitored metric on the training batches and on the validation set (`train/acc` - `val/acc`: a
large gap means over-fitting; present when the runs logged `logging.train_metrics`), the final training
loss, steps, wall time, throughput and why the run stopped (with the reason of a failure). The same
table goes to `report.md`, next to plots (see :mod:`trainctl.plots`). A single run gets its summary and
curves. Runs still in progress are read from what they have logged so far.

Reads files only: neither torch nor Hydra is imported.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from trainctl.errors import ConfigError
from trainctl.runs import AUTO, RunRecord, is_run_dir, one_line, parse_optimized_metric

REPORT_EXTRA = 'pip install "trainctl[report]"'


@dataclass
class Report:
    """The runs under a path, best first, and what tells them apart."""

    root: Path
    runs: List[RunRecord]
    names: Dict[Path, str]
    optimized_metric: str
    mode: str
    varying: List[str] = field(default_factory=list)
    common: Dict[str, str] = field(default_factory=dict)
    optuna: Optional[Dict[str, Any]] = None

    @property
    def best(self) -> Optional[RunRecord]:
        first = self.runs[0] if self.runs else None
        return first if first is not None and _finite(self.value(first)) else None

    def value(self, run: RunRecord) -> Optional[float]:
        return None if run.status in ("failed", "pruned") else run.objective(self.optimized_metric)

    @property
    def monitor(self) -> Optional[str]:
        monitors = {r.monitor for r in self.runs if r.monitor}
        return monitors.pop() if len(monitors) == 1 else None

    @property
    def label(self) -> str:
        """The optimized metric as a column header: `best val/acc`, `final train/loss`."""
        metric, final = parse_optimized_metric(self.optimized_metric)
        name = (self.monitor or "monitored") if metric == AUTO else metric
        return f"{'final' if final else 'best'} {name}"


def _finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)


def train_twin(key: Optional[str]) -> Optional[str]:
    """`val/X` -> `train/X`, the same metric measured on the training batches."""
    return "train/" + key[4:] if key and key.startswith("val/") else None


def gap_metric(report: Report) -> Optional[Tuple[str, str]]:
    """(training twin, monitor) when the runs share a validation monitor whose twin some run logged."""
    twin = train_twin(report.monitor)
    if twin is None or not any(run.final(twin) is not None for run in report.runs):
        return None
    return twin, str(report.monitor)


def gap_of(run: RunRecord, pair: Optional[Tuple[str, str]]) -> Optional[float]:
    """The final training value minus the final validation value of ``pair``."""
    train, val = (run.final(pair[0]), run.final(pair[1])) if pair else (None, None)
    return train - val if train is not None and val is not None else None


def gap_column(pair: Tuple[str, str]) -> str:
    return f"{pair[1][4:]} gap (train-val)"


# --- finding runs ----------------------------------------------------------------------------------

def _run_dirs_under(path: Path) -> List[Path]:
    found = []
    for here, dirs, _ in os.walk(path):
        current = Path(here)
        if is_run_dir(current):
            found.append(current)
            dirs[:] = []  # checkpoints/ and tb/ belong to the run
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return found


def find_runs(paths: Sequence[str]) -> List[Path]:
    """Run directories named by ``paths``: sweep directories, run directories or glob patterns."""
    found: List[Path] = []
    for text in paths:
        matches = [Path(text)] if Path(text).exists() else [Path(p) for p in sorted(glob.glob(text))]
        if not matches:
            raise ConfigError(None, f"{text}: no such file or directory",
                              "pass a sweep or run directory, e.g. multirun/2026-01-31/12-00-00")
        for path in matches:
            if path.is_dir():
                found += _run_dirs_under(path)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ConfigError(None, f"no run directories in {', '.join(paths)} (a run directory holds summary.json "
                          "or metrics.jsonl)", "pass a directory that `trainctl run` wrote, e.g. "
                          "outputs/2026-01-31/12-00-00 or multirun/2026-01-31/12-00-00")
    return sorted(unique, key=_natural)


def _natural(path: Path) -> Tuple[Any, ...]:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def common_root(dirs: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(d) for d in dirs])) if len(dirs) > 1 else dirs[0]


# --- building the report ---------------------------------------------------------------------------

def _differences(runs: Sequence[RunRecord]) -> Tuple[List[str], Dict[str, str]]:
    keys: List[str] = list(dict.fromkeys(k for r in runs for k in r.overrides))
    varying = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    common = {k: runs[0].overrides[k] for k in keys if k not in varying}
    return varying, common


def _optuna_results(root: Path) -> Optional[Dict[str, Any]]:
    import yaml

    path = root / "optimization_results.yaml"
    try:
        results = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return results if isinstance(results, dict) else None


def _matches(run: RunRecord, params: Dict[str, Any]) -> bool:
    for key, value in params.items():
        have = run.overrides.get(key)
        if have is None:
            return False
        try:
            if not math.isclose(float(have), float(value), rel_tol=1e-9):
                return False
        except (TypeError, ValueError):
            if str(have) != str(value):
                return False
    return True


def build_report(dirs: Sequence[Path], metric: Optional[str] = None) -> Report:
    """Read the runs in ``dirs`` and order them by the optimized metric, best first (failures last)."""
    runs = [RunRecord.load(d) for d in dirs]
    root = common_root(list(dirs))
    names = {r.path: (str(r.path.relative_to(root)) if r.path != root else r.path.name) for r in runs}
    chosen = {r.optimized_metric for r in runs if r.summary or r.records}
    optimized = metric or (chosen.pop() if len(chosen) == 1 else AUTO)
    modes = [r.objective_mode(optimized) for r in runs if r.monitor]
    mode = max(set(modes), key=modes.count) if modes else "max"
    report = Report(root=root, runs=runs, names=names, optimized_metric=optimized, mode=mode)
    report.varying, report.common = _differences(runs)

    def order(run: RunRecord) -> Tuple[int, float, Tuple[Any, ...]]:
        value = report.value(run)
        if not _finite(value):
            return (1, 0.0, _natural(run.path))
        return (0, -value if mode == "max" else value, _natural(run.path))

    report.runs.sort(key=order)
    results = _optuna_results(root)
    if results and isinstance(results.get("best_params"), dict):
        best = next((r for r in report.runs if r.status != "failed" and _matches(r, results["best_params"])), None)
        report.optuna = {**results, "best_run": names[best.path] if best else None}
    return report


# --- rows, for every output format -----------------------------------------------------------------

def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def _setting(value: Optional[str]) -> str:
    """An override's value for the table: long sampled floats to 4 significant digits."""
    if value is None:
        return "—"
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if len(value) > 8 and math.isfinite(number) else value


def columns(report: Report) -> List[str]:
    monitor = report.monitor or "monitored"
    metrics = [report.label] + [c for c in (f"best {monitor}", f"final {monitor}") if c != report.label]
    pair = gap_metric(report)
    gap = [gap_column(pair)] if pair else []
    return ["run", *report.varying, *metrics, *gap, "final train/loss", "steps", "wall s", "samples/s", "stop reason"]


def run_row(report: Report, run: RunRecord) -> Dict[str, Any]:
    """One run as plain values (the JSON form of a table row)."""
    return {
        "run": report.names[run.path], "path": str(run.path), "status": run.status,
        "stop_reason": run.stop_reason, "reason": run.reason, "overrides": run.overrides,
        "varying": {k: run.overrides.get(k) for k in report.varying},
        "optimized_metric": report.optimized_metric, "objective": _json_number(report.value(run)),
        "monitor": run.monitor, "mode": run.mode, "best": _json_number(run.best()),
        "final": _json_number(run.final(run.monitor) if run.monitor else None),
        "gap": _json_number(gap_of(run, gap_metric(report))),
        "final_train_loss": _json_number(run.final("train/loss")), "steps": run.steps,
        "wall_seconds": run.wall_seconds, "samples_per_second": _json_number(run.samples_per_second),
        "best_run": run is report.best,
    }


def _json_number(value: Optional[float]) -> Optional[float]:
    return value if _finite(value) else None


def table_cells(report: Report, run: RunRecord, reasons: bool = True) -> List[str]:
    row = run_row(report, run)
    monitor_tag = "" if report.monitor else f" ({run.monitor})"
    metrics = [_fmt(row["objective"])]
    if f"best {report.monitor or 'monitored'}" != report.label:
        metrics.append(_fmt(row["best"]) + monitor_tag)
    if f"final {report.monitor or 'monitored'}" != report.label:
        metrics.append(_fmt(row["final"]) + monitor_tag)
    gap = [_fmt(row["gap"])] if gap_metric(report) else []
    stop = run.stop_reason if run.status != "running" else f"running (step {run.steps or 0})"
    if row["reason"] and reasons:
        stop += f": {row['reason']}"
    wall = run.wall_seconds
    return [("★ " if row["best_run"] else "") + row["run"], *[_setting(v) for v in row["varying"].values()],
            *metrics, *gap, _fmt(row["final_train_loss"]), _fmt(row["steps"]),
            _fmt(float(wall), 1) if wall is not None else "—", _fmt(row["samples_per_second"], 0), stop]


def to_json(report: Report, files: Dict[str, str], note: Optional[str]) -> Dict[str, Any]:
    best = report.best
    return {
        "root": str(report.root), "optimized_metric": report.optimized_metric, "mode": report.mode,
        "label": report.label, "varying": report.varying, "common": report.common,
        "best_run": report.names[best.path] if best else None,
        "runs": [run_row(report, r) for r in report.runs], "optuna": report.optuna,
        "files": files, "note": note,
    }


def headline(report: Report) -> List[str]:
    """Lines above the table: what was compared, what is common, the winner."""
    best = report.best
    failed = sum(r.status == "failed" for r in report.runs)
    running = sum(r.status == "running" for r in report.runs)
    pruned = sum(r.status == "pruned" for r in report.runs)
    lines = [f"{len(report.runs)} run{'s' * (len(report.runs) != 1)} in {report.root}"
             + (f", {failed} failed" if failed else "") + (f", {pruned} pruned" if pruned else "")
             + (f", {running} running" if running else "")
             + f"; sorted by {report.label} ({'higher' if report.mode == 'max' else 'lower'} is better)"]
    if report.common:
        lines.append("common: " + " ".join(f"{k}={v}" for k, v in report.common.items()))
    if best is not None:
        setting = " ".join(f"{k}={_setting(best.overrides.get(k))}" for k in report.varying)
        lines.append(f"best: {report.names[best.path]} ({report.label} {_fmt(report.value(best))})"
                     + (f": {setting}" if setting else ""))
    if report.optuna:
        params = " ".join(f"{k}={v}" for k, v in report.optuna.get("best_params", {}).items())
        lines.append(f"optuna best trial: {report.optuna.get('best_value')} with {params}"
                     + (f" (run {report.optuna['best_run']})" if report.optuna.get("best_run") else ""))
    return lines


def single_run_rows(report: Report) -> List[Tuple[str, str]]:
    """(field, value) rows describing one run."""
    run = report.runs[0]
    rows = [("run directory", str(run.path)), ("status", run.stop_reason if run.status != "running"
                                                    else f"running (step {run.steps or 0})")]
    if run.reason:
        rows.append(("reason", run.reason))
    if run.monitor:
        step = run.summary.get("best_step") if run.status != "running" else None
        rows.append((f"best {run.monitor}", _fmt(run.best()) + (f" (step {step})" if step else "")))
    vals = {k for r in run.records for k in r if k.startswith("val/")}
    finals = sorted(vals | {str(train_twin(k)) for k in vals} | {"train/loss"})
    rows += [(f"final {k}", _fmt(run.final(k))) for k in finals if run.final(k) is not None]
    pair = gap_metric(report)
    if pair and gap_of(run, pair) is not None:
        rows.append((gap_column(pair), _fmt(gap_of(run, pair))))
    rows += [("steps", _fmt(run.steps)), ("wall time", f"{run.wall_seconds:.1f} s" if run.wall_seconds else "—"),
             ("throughput", f"{_fmt(run.samples_per_second, 0)} samples/s")]
    if run.overrides:
        rows.append(("overrides", " ".join(f"{k}={v}" for k, v in run.overrides.items())))
    return rows


def markdown(report: Report, files: Dict[str, str], note: Optional[str]) -> str:
    """`report.md`: the headline, the table, and the plots."""
    def cell(text: str) -> str:
        text = one_line(text)
        return (text[:157] + "...") if len(text) > 160 else text.replace("|", "\\|")

    lines = [f"# trainctl report: {report.root}", ""]
    if len(report.runs) == 1:
        lines += ["| | |", "| --- | --- |"] + [f"| {k} | {cell(v)} |" for k, v in single_run_rows(report)]
    else:
        lines += [f"- {line}" for line in headline(report)] + [""]
        header = columns(report)
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for run in report.runs:
            cells = [cell(c) for c in table_cells(report, run)]
            if run is report.best:
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name in files:
        if name.endswith(".png"):
            lines += [f"![{name}]({name})", ""]
    if note:
        lines += [f"_{note}_", ""]
    return "\n".join(lines)


# --- output ------------------------------------------------------------------------------------------

def write_report(report: Report, out_dir: Path, plots: bool = True) -> Tuple[Dict[str, str], Optional[str]]:
    """Write the PNG plots and `report.md` into ``out_dir``: ({file name: path}, a note or None)."""
    from trainctl.files import write_text

    files: Dict[str, str] = {}
    note = None
    if plots:
        try:
            from trainctl import plots as plotting
        except ImportError:
            note = f"plots skipped: matplotlib is not installed ({REPORT_EXTRA})"
        else:
            for name, path in plotting.write_plots(report, out_dir).items():
                files[name] = str(path)
    path = out_dir / "report.md"
    write_text(path, markdown(report, files, note))
    return {"report.md": str(path), **files}, note


def print_table(report: Report, files: Dict[str, str], note: Optional[str]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not console.is_terminal:  # a log or a pipe: no line breaks inside cells
        console = Console(width=max(console.width, 200))
    if len(report.runs) == 1:
        table = Table(title=Text(f"trainctl report: {report.names[report.runs[0].path]}"), show_header=False,
                      title_justify="left")
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for key, value in single_run_rows(report):
            table.add_row(key, Text(value))
    else:
        table = Table(title="trainctl report", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
        rows = [table_cells(report, run, reasons=False) for run in report.runs]
        for i, name in enumerate(columns(report)):
            numeric = 0 < i < len(columns(report)) - 1 and name not in report.varying
            widest = max(len(row[i]) for row in rows)  # a narrow terminal folds headers before values
            table.add_column(name, justify="right" if numeric else "left", overflow="fold", min_width=min(widest, 12))
        for run, cells in zip(report.runs, rows):
            style = ("bold green" if run is report.best else "red" if run.status == "failed"
                     else "yellow" if run.status == "running" else "dim" if run.status == "pruned" else None)
            table.add_row(*(Text(c) for c in cells), style=style)
    console.print(table)
    if len(report.runs) > 1:
        console.print("\n".join(headline(report)), highlight=False, soft_wrap=True, markup=False)
    for run in report.runs:
        if run.reason and len(report.runs) > 1:
            console.print(f"{report.names[run.path]} {run.stop_reason}: {run.reason}", style="red",
                          highlight=False, soft_wrap=True, markup=False)
    console.print("written: " + ", ".join(files.values()), highlight=False, soft_wrap=True, markup=False)
    if note:
        console.print(note, style="yellow", highlight=False, markup=False)
