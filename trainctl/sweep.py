"""Sweeps (`trainctl run -m ...`): what each sweep job returns to the sweeper, the record a failed job
leaves in its run directory, and the Hydra callback that sums up a sweep.

A failed job never stops a sweep: its reason goes to `summary.json` (status `failed`) and the log, the
sweeper gets a :class:`FailedJob` (Optuna records the trial as failed and samples the next one), and
once every job has run the callback ends `trainctl run -m` with exit code 1.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Tuple, Union

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from trainctl.errors import EXIT_FAILED, ConfigError, exit_code
from trainctl.runs import RunRecord, objective_value, one_line

log = logging.getLogger("trainctl")


# --- one sweep job -----------------------------------------------------------------------------------

def record_failure(run_dir: Path, stop_reason: str, error: str, **facts: Any) -> None:
    """Leave the reason a job failed in its `summary.json`, unless the directory already holds the
    summary of a run that got further (a training failure is recorded by the run itself) or another
    process owns it now."""
    from trainctl import rundir
    from trainctl.files import write_json

    try:
        with rundir.owning(run_dir, None):
            existing = RunRecord.load(run_dir)
            if existing.summary and existing.status != "running":
                return
            write_json(run_dir / "summary.json", {
                **existing.summary, "status": "failed", "stop_reason": stop_reason, "error": error,
                "best_metric": existing.summary.get("best_metric"), "run_dir": str(run_dir), **facts})
    except (ConfigError, OSError) as exc:
        log.error("could not record the failure in %s: %s", run_dir, exc)


class FailedJob:
    """What a failed sweep job returns instead of a number.

    Optuna's Hydra sweeper turns each job's return value into a float: this one refuses with the
    reason, so the sweeper records the trial as failed and the study goes on. (A NaN would not do:
    hydra-optuna-sweeper 1.2/1.3 then passes the NaN along with the failed state, which Optuna
    rejects, and the whole study stops.) Sweepers that ignore return values ignore it too.
    """

    def __init__(self, run_dir: str, reason: str) -> None:
        self.run_dir = run_dir
        self.reason = reason

    def __float__(self) -> float:
        raise ValueError(str(self))

    def __repr__(self) -> str:
        return f"job {Path(self.run_dir).name} failed: {self.reason}"


def _say(run_dir: Path, message: str) -> None:
    log.error("%s", message)
    print(f"trainctl: job {run_dir.name} failed: {message}", file=sys.stderr, flush=True)


def run_job(train: Callable[[], Tuple[Dict[str, Any], str]], run_dir: Path) -> Union[float, FailedJob]:
    """Run one sweep job: the value of its optimized metric, or (recorded) a FailedJob."""
    from trainctl.rundir import RunDirBusy

    try:
        summary, metric = train()
    except RunDirBusy as error:  # another process owns the directory: leave it alone
        _say(run_dir, str(error))
        return FailedJob(str(run_dir), one_line(str(error)))
    except ConfigError as error:
        _say(run_dir, str(error))
        record_failure(run_dir, "config_error", str(error))
        return FailedJob(str(run_dir), one_line(str(error)))
    except Exception as exc:  # any crash of one job: the others still run
        log.exception("the job failed")
        _say(run_dir, f"{type(exc).__name__}: {exc}")
        record_failure(run_dir, "failed", f"{type(exc).__name__}: {exc}")
        return FailedJob(str(run_dir), f"{type(exc).__name__}: {exc}")
    code = exit_code(summary)
    if summary.get("stop_reason") == "interrupted":
        raise SystemExit(code)  # Ctrl-C or SIGTERM ends the whole sweep
    if code:
        reason = summary.get("error") or RunRecord.load(run_dir).reason or summary.get("stop_reason")
        record_failure(run_dir, str(summary.get("stop_reason") or "failed"), str(reason))
        print(f"trainctl: job {run_dir.name} {summary.get('stop_reason')}: {reason}", file=sys.stderr, flush=True)
        return FailedJob(str(run_dir), f"{summary.get('stop_reason')}: {reason}")
    value = objective_value(run_dir, metric)
    if math.isnan(value):
        log.warning("optimized_metric=%s has no value in this run (was it evaluated?)", metric)
        return FailedJob(str(run_dir), f"optimized_metric={metric} has no value (was the run evaluated?)")
    return value


# --- the whole sweep ---------------------------------------------------------------------------------

class SweepCallback(Callback):
    """Sums up a sweep once every job has run: which jobs failed, and how to compare them. When any job
    failed it ends the command with exit code 1 (on_multirun_end is the last thing Hydra does)."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(str(config.hydra.sweep.dir))
        runs = sorted((RunRecord.load(p.parent) for p in root.rglob("summary.json")
                       if p.stat().st_mtime >= self.started - 1), key=lambda r: _job_order(r.path))
        failed = [r for r in runs if r.status == "failed"]
        lines = [f"trainctl: sweep finished: {len(runs)} job{'s' * (len(runs) != 1)} in {root}, {len(failed)} failed"]
        lines += [f"  {r.path.relative_to(root)}: {r.stop_reason}: {r.reason}" for r in failed]
        lines.append(f"  compare them: trainctl report {root}")
        print("\n".join(lines), file=sys.stderr, flush=True)
        if failed:
            raise SystemExit(EXIT_FAILED)


def _job_order(path: Path) -> Tuple[Any, ...]:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)
