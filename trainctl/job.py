"""One training job in its run directory: build, write the resolved spec, train, summarise."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

from trainctl.build import build_run, plan
from trainctl.checkpoint import write_json
from trainctl.console import Display
from trainctl.metrics import MetricsWriter
from trainctl.runner import Runner
from trainctl.spec import RunSpec, spec_yaml

log = logging.getLogger("trainctl")


def train(spec: RunSpec, run_dir: Path, base_dir: str) -> Dict[str, Any]:
    """Everything that can be wrong with the spec fails in build_run, before a file is written."""
    run = build_run(spec, base_dir=base_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(spec_yaml(spec), encoding="utf-8")
    run.run_dir = run_dir
    run.writer = MetricsWriter(run_dir, spec.logging.tensorboard)
    display = Display(spec.logging.progress, run.horizon.total_steps, run.horizon.total_epochs)
    runner = Runner(run, display)
    log.info("run directory: %s", run_dir)
    for key, value in plan(run).items():
        log.info("  %-26s %s", key, f"{value:,}" if isinstance(value, int) else value)
    write_json(run_dir / "summary.json", {**runner.summary(0.0), "status": "running", "stop_reason": None})
    summary = runner.fit()
    display.summary(summary)
    log.info("summary: %s", {k: summary[k] for k in ("stop_reason", "best_metric", "steps", "wall_seconds")})
    return summary
