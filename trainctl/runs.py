"""Reading run directories — finished, failed or still running — and the value a sweep optimises.

A run directory holds `summary.json` (written when the run starts, with status `running`, and again
when it ends), `metrics.jsonl` (one record per logged event), `trainctl.log`, and for runs started by
`trainctl run` Hydra's `.hydra/` (`overrides.yaml`: the command line of that job; `config.yaml`: the
composed config, including `optimized_metric`). A sweep job that failed before training leaves a
`summary.json` with status `failed` and the reason in `error`.

Standard library and PyYAML only: `trainctl report` reads runs without importing torch or Hydra.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from trainctl.metrics import MODE_OF, read_metrics

AUTO = "auto"
FINAL = "final:"
RUN_FILES = ("summary.json", "metrics.jsonl", "config.yaml", ".hydra")


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def metric_mode(metric: str) -> str:
    """max for accuracy/F1, min for losses and errors (by the last part of the name)."""
    return MODE_OF.get(metric.rsplit("/", 1)[-1], "min")


def parse_optimized_metric(text: str) -> Tuple[str, bool]:
    """(metric name, whether its final value counts) for `auto`, `val/acc` or `final:val/acc`."""
    if text.startswith(FINAL):
        return text[len(FINAL):], True
    return text, False


def _yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None


def parse_override(text: str) -> Tuple[str, str]:
    """`optimizer.lr=0.01` -> ('optimizer.lr', '0.01'); `+sweep=x` -> ('sweep', 'x'); `~key` -> ('key', '(removed)')."""
    key, sep, value = text.partition("=")
    if key.startswith("~"):
        return key.lstrip("~"), "(removed)"
    return key.lstrip("+"), value if sep else ""


@dataclass
class RunRecord:
    """What one run directory says about its run."""

    path: Path
    summary: Dict[str, Any] = field(default_factory=dict)
    records: List[Dict[str, Any]] = field(default_factory=list)
    overrides: Dict[str, str] = field(default_factory=dict)
    optimized_metric: str = AUTO

    @classmethod
    def load(cls, path: Path) -> "RunRecord":
        summary: Dict[str, Any] = {}
        try:
            summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        overrides = _yaml(path / ".hydra" / "overrides.yaml") or []
        composed = _yaml(path / ".hydra" / "config.yaml") or {}
        metric = composed.get("optimized_metric", AUTO) if isinstance(composed, dict) else AUTO
        return cls(path=path, summary=summary if isinstance(summary, dict) else {},
                   records=read_metrics(path / "metrics.jsonl"),
                   overrides=dict(parse_override(str(o)) for o in overrides if isinstance(o, str)),
                   optimized_metric=str(metric))

    # --- status ------------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """done, failed, interrupted, pruned (a `trainctl tune` trial its study stopped) or running (also a run
        killed without a chance to say so)."""
        if self.summary.get("stop_reason") == "pruned":
            return "pruned"
        return self.summary.get("status") or ("running" if self.records else "unknown")

    @property
    def stop_reason(self) -> str:
        return self.summary.get("stop_reason") or self.status

    @property
    def reason(self) -> Optional[str]:
        """Why a run failed: its recorded error, or the last error its log file holds."""
        if self.status not in ("failed", "interrupted"):
            return None
        for key in ("error", "checkpoint_error"):
            if self.summary.get(key):
                return one_line(str(self.summary[key]))
        return last_logged_error(self.path / "trainctl.log")

    # --- metrics -----------------------------------------------------------------------------------

    @property
    def monitor(self) -> Optional[str]:
        if self.summary.get("monitor"):
            return self.summary["monitor"]
        val = [k for r in self.records for k in r if k.startswith("val/")]
        return "val/acc" if "val/acc" in val else ("val/loss" if val else None)

    @property
    def mode(self) -> str:
        return self.summary.get("mode") or metric_mode(self.monitor or "val/loss")

    def series(self, key: str) -> Tuple[List[int], List[float]]:
        """(steps, values) of one logged key, non-finite values left out."""
        steps, values = [], []
        for record in self.records:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                steps.append(int(record.get("step", 0)))
                values.append(float(value))
        return steps, values

    def final(self, key: str) -> Optional[float]:
        if self.status != "running":
            value = (self.summary.get("final") or {}).get(key)
            if isinstance(value, (int, float)):
                return float(value)
        values = self.series(key)[1]
        return values[-1] if values else None

    def best(self, key: Optional[str] = None) -> Optional[float]:
        """The best value of ``key`` (default: the monitored metric) over the run's evaluations."""
        key = key or self.monitor
        if key is None:
            return None
        if key == self.monitor and self.status != "running" and self.summary.get("best_metric") is not None:
            return float(self.summary["best_metric"])
        values = self.series(key)[1]
        if not values:
            return None
        return max(values) if (self.mode if key == self.monitor else metric_mode(key)) == "max" else min(values)

    def objective(self, optimized_metric: Optional[str] = None) -> Optional[float]:
        """The value of ``optimized_metric`` (default: the one the run was started with)."""
        metric, final = parse_optimized_metric(optimized_metric or self.optimized_metric)
        if metric == AUTO:
            return self.final(self.monitor) if final and self.monitor else self.best()
        return self.final(metric) if final else self.best(metric)

    def objective_mode(self, optimized_metric: Optional[str] = None) -> str:
        metric = parse_optimized_metric(optimized_metric or self.optimized_metric)[0]
        return self.mode if metric == AUTO else metric_mode(metric)

    @property
    def steps(self) -> Optional[int]:
        if self.status != "running" and self.summary.get("steps") is not None:
            return int(self.summary["steps"])
        steps = [int(r["step"]) for r in self.records if "step" in r]
        return max(steps) if steps else None

    @property
    def wall_seconds(self) -> Optional[float]:
        if self.status == "running":
            return None
        return self.summary.get("wall_seconds")

    @property
    def samples_per_second(self) -> Optional[float]:
        if self.status != "running" and self.summary.get("samples_per_second") is not None:
            return float(self.summary["samples_per_second"])
        values = self.series("train/samples_per_second")[1]
        return values[-1] if values else None


def one_line(text: str) -> str:
    """An error message (which may end with a `fix:` line) on one line."""
    return " ".join(text.replace("\n  fix: ", "; fix: ").split())


_ERROR_LINE = re.compile(r"^\[[^\]]*\]\[[^\]]*\]\[(ERROR|CRITICAL)\] - (.*)$")


def last_logged_error(log_file: Path) -> Optional[str]:
    """The message of the last ERROR line of a run's log file (its first line), if any."""
    try:
        lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        match = _ERROR_LINE.match(line)
        if match:
            return match.group(2).strip()
    return None


def objective_value(run_dir: Path, optimized_metric: str) -> float:
    """What a sweep job returns to the sweeper: the optimized metric of a finished run, NaN for a run
    that failed, diverged or has no value (Optuna then records the trial as failed and goes on)."""
    run = RunRecord.load(run_dir)
    if run.status != "done":
        return float("nan")
    value = run.objective(optimized_metric)
    return float(value) if value is not None and math.isfinite(value) else float("nan")
