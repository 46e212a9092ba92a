"""Sweeps (`trainctl run -m ...`): the root config of `trainctl run` (the run spec plus
`optimized_metric`), what each sweep job returns to the sweeper, the record a failed job leaves in its
run directory, the Hydra callback that sums up a sweep, and the optional Hydra plugins (Optuna sweeper,
joblib and submitit launchers) with the install hint when one is missing.

A failed job never stops a sweep: its reason goes to `summary.json` (status `failed`) and the log, the
sweeper gets a :class:`FailedJob` (Optuna records the trial as failed and samples the next one), and
once every job has run `trainctl run -m` exits with 1.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from trainctl.errors import ConfigError, exit_code
from trainctl.metrics import VAL_METRICS
from trainctl.runs import AUTO, RunRecord, metric_mode, objective_value, one_line, parse_optimized_metric
from trainctl.spec import RunSpec

log = logging.getLogger("trainctl")

SWEEP_EXTRA = 'pip install "trainctl[sweep]"'

PLUGINS = {
    ("hydra/sweeper", "optuna"): "hydra-optuna-sweeper",
    ("hydra/sweeper/sampler", "tpe"): "hydra-optuna-sweeper",
    ("hydra/sweeper/sampler", "random"): "hydra-optuna-sweeper",
    ("hydra/sweeper/sampler", "cmaes"): "hydra-optuna-sweeper",
    ("hydra/sweeper/sampler", "grid"): "hydra-optuna-sweeper",
    ("hydra/sweeper/sampler", "nsgaii"): "hydra-optuna-sweeper",
    ("hydra/sweeper/sampler", "motpe"): "hydra-optuna-sweeper",
    ("hydra/launcher", "joblib"): "hydra-joblib-launcher",
    ("hydra/launcher", "submitit_local"): "hydra-submitit-launcher",
    ("hydra/launcher", "submitit_slurm"): "hydra-submitit-launcher",
}
"""Config options that come from a Hydra plugin, with the plugin's package (all in the `sweep` extra)."""


@dataclass
class TrainConfig(RunSpec):
    """The composed config of `trainctl run`: the run spec plus what a sweep optimises."""

    optimized_metric: str = AUTO
    """The value each job returns to the sweeper (Optuna maximises or minimises it, see
    hydra.sweeper.direction) and `trainctl report` sorts by: auto (the best value of trainer.monitor),
    a validation metric such as val/loss (its best value over the run's evaluations), or
    final:val/acc / final:train/loss (its value at the end of the run)."""


def split(config: RunSpec) -> Tuple[RunSpec, str]:
    """(the run spec alone, the optimized metric) of a validated TrainConfig.

    The spec written to `config.yaml` and checkpoints stays a plain RunSpec, so a run directory can be
    resumed or evaluated whatever the sweep around it optimised.
    """
    metric = getattr(config, "optimized_metric", AUTO)
    fields = dataclasses.fields(RunSpec)
    spec = RunSpec(**{f.name: getattr(config, f.name) for f in fields if f.init})
    for f in fields:
        if not f.init:
            setattr(spec, f.name, getattr(config, f.name))
    check_optimized_metric(metric, spec)
    return spec, metric


def _task(spec: RunSpec) -> str:
    from trainctl import data as data_mod

    return data_mod.probe(spec.data)[0]


def check_optimized_metric(metric: str, spec: RunSpec) -> None:
    name = parse_optimized_metric(metric)[0]
    if name == AUTO:
        return
    task = _task(spec)
    reported = list(VAL_METRICS[task]) + ["train/loss"]
    if name not in reported or (name == "train/loss" and not metric.startswith("final:")):
        valid = list(VAL_METRICS[task]) + ["final:train/loss"]
        raise ConfigError("optimized_metric", f"'{metric}' is not reported for {task} data; choose auto, "
                          f"{', '.join(valid)} (or final:METRIC for the value at the end)",
                          f"set optimized_metric={VAL_METRICS[task][0]}")


def optimized_mode(metric: str, spec: RunSpec) -> str:
    """max or min: which way the optimized metric is better."""
    name = parse_optimized_metric(metric)[0]
    return spec.monitor_mode(_task(spec)) if name == AUTO else metric_mode(name)


def check_direction(sweeper: DictConfig, metric: str, spec: RunSpec) -> None:
    """Optuna's `direction` must agree with the optimized metric (maximising a loss is a silent waste)."""
    direction = sweeper.get("direction")
    if not isinstance(direction, str) or direction.lower() not in ("minimize", "maximize"):
        return  # several objectives, or an enum Hydra has not resolved: nothing to compare
    wanted = "maximize" if optimized_mode(metric, spec) == "max" else "minimize"
    if direction.lower() != wanted:
        raise ConfigError("hydra.sweeper.direction", f"is {direction}, but optimized_metric={metric} is better "
                          f"when {'larger' if wanted == 'maximize' else 'smaller'}",
                          f"set hydra.sweeper.direction={wanted}")


def missing_plugin(group: str, option: str) -> Optional[ConfigError]:
    package = PLUGINS.get((group, option))
    if package is None:
        return None
    return ConfigError(group, f"'{option}' comes from the Hydra plugin {package}, which is not installed",
                       f"{SWEEP_EXTRA} (or pip install {package})")


# --- before a sweep starts ---------------------------------------------------------------------------

def check_sweep(overrides: Sequence[str], plain: Sequence[str], base_dir: str, config_name: str) -> None:
    """Check a sweep's command line before any job starts: the plugins it names, every value of every swept
    key (with the sweeper's own `params`; a sampled interval by its two ends), Optuna's direction against
    the optimized metric, and that the sweep directory is new. ``plain``: the overrides that are not Hydra's."""
    from trainctl.config import compose_hydra, compose_spec

    hydra_cfg = compose_hydra(overrides, config_name)
    sweeper = hydra_cfg.sweeper
    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    options = sweep_options([*params, *plain])
    base = [values[0] for values in options]
    cfg, spec = compose_spec(base, base_dir, config_name)
    for i, values in enumerate(options):
        for value in values[1:]:
            compose_spec(base[:i] + [value] + base[i + 1:], base_dir, config_name)
    if "optuna" in str(sweeper.get("_target_", "")):
        check_direction(sweeper, str(cfg.get("optimized_metric", AUTO)), spec)
    if spec.checkpoint.resume != "auto":
        check_fresh_sweep_dir(hydra_cfg, base_dir)


def sweep_options(overrides: Sequence[str]) -> List[List[str]]:
    """For each key, the `key=value` overrides to check; a later override of a key replaces an earlier
    one, as the sweepers do."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep
    from hydra.errors import OverrideParseException

    from trainctl.config import translate

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as exc:
        raise translate(exc, overrides) from None
    options: Dict[str, List[str]] = {}
    for override in parsed:
        key = override.get_key_element()
        value = override.value()
        if not override.is_sweep_override():
            options[key] = [override.input_line]
        elif isinstance(value, IntervalSweep):
            ends = [int(v) if float(v).is_integer() and abs(v) < 2**53 else v for v in (value.start, value.end)]
            options[key] = [f"{key}={v}" for v in ends]
        else:
            try:
                options[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
            except Exception:  # a sweep the sweeper samples in its own way
                continue
    return [values for values in options.values() if values]


def check_fresh_sweep_dir(hydra_cfg: DictConfig, base_dir: str) -> None:
    """A new sweep never writes into the job directories of an earlier one (its jobs would all fail)."""
    try:
        sweep_dir = Path(base_dir, str(hydra_cfg.sweep.dir))
    except Exception:  # a directory naming values that exist only once the sweep runs
        return
    if any(sweep_dir.glob("*/summary.json")):
        raise ConfigError("hydra.sweep.dir", f"{sweep_dir} already holds the runs of a sweep",
                          "choose a new directory, e.g. hydra.sweep.dir=multirun/my-sweep-2 "
                          "(`trainctl report` compares runs of several sweeps)")


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

FAILED_JOBS: List[str] = []
"""Run directories of the failed jobs of the sweep that just ended (read by `trainctl run -m` for its exit code)."""


class SweepCallback(Callback):
    """Sums up a sweep once every job has run: which jobs failed, and how to compare them."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        FAILED_JOBS.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(str(config.hydra.sweep.dir))
        runs = sorted((RunRecord.load(p.parent) for p in root.rglob("summary.json")
                       if p.stat().st_mtime >= self.started - 1), key=lambda r: _job_order(r.path))
        failed = [r for r in runs if r.status == "failed"]
        FAILED_JOBS[:] = [str(r.path) for r in failed]
        lines = [f"trainctl: sweep finished: {len(runs)} job{'s' * (len(runs) != 1)} in {root}, {len(failed)} failed"]
        lines += [f"  {r.path.relative_to(root)}: {r.stop_reason}: {r.reason}" for r in failed]
        lines.append(f"  compare them: trainctl report {root}")
        print("\n".join(lines), file=sys.stderr, flush=True)


def _job_order(path: Path) -> Tuple[Any, ...]:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)
