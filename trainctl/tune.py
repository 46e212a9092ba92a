"""`trainctl tune`: an Optuna study whose trials are ordinary trainctl runs, pruned while they train.

The search space is a YAML file (:class:`TuneSpace`): the study's settings and, under `params`, one
distribution per override key (`optimizer.lr`, or a group such as `optimizer`). Every trial is composed
exactly as `trainctl run FIXED_OVERRIDES SAMPLED_OVERRIDES` and trained in this process in its own run
directory, `ROOT/trial-NNNN`. :class:`PruningCallback` reports the optimized metric to the trial after each
evaluation (Optuna's step = the evaluation's number, 1, 2, ...) and, when the pruner says so, stops the run
with the stop reason `pruned`.

The study lives in a database (SQLite `ROOT/study.db` unless `storage` names any SQLAlchemy URL), so a
study stopped by Ctrl-C or a killed process continues when the same command runs again, and several
processes may work on one study. Only Optuna APIs that are the same from optuna 2.10 (the version the Hydra
Optuna sweeper pins) to current releases are used: `create_study`, `ask`/`tell`, `suggest_*`, `report`,
`should_prune`, `enqueue_trial`, the TPE and random samplers, the median and Hyperband pruners and
`RDBStorage`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

from trainctl.callbacks import Callback
from trainctl.errors import ConfigError, check, check_choice

if TYPE_CHECKING:
    from trainctl.build import Run
    from trainctl.state import RunState

log = logging.getLogger("trainctl")

PRUNED = "pruned"
"""The stop reason (and `summary.json` status) of a trial the pruner stopped."""
TUNE_EXTRA = 'pip install "trainctl[sweep]"'
SPACE_KEYS = ("study_name", "n_trials", "metric", "direction", "storage", "sampler", "pruner", "overrides", "params")
PARAM_KEYS = {"float": ("type", "low", "high", "log", "step"), "int": ("type", "low", "high", "log", "step"),
              "categorical": ("type", "choices")}
SAMPLERS = {"tpe": ("seed", "n_startup_trials", "multivariate"), "random": ("seed",)}
PRUNERS = {"median": ("n_startup_trials", "n_warmup_steps", "interval_steps"),
           "hyperband": ("min_resource", "max_resource", "reduction_factor"), "none": ()}


# --- the search space -------------------------------------------------------------------------------------

@dataclass
class Param:
    """One searched override: `type` float | int (between `low` and `high`, on a log scale with `log`) or
    categorical (`choices`)."""

    key: str
    type: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: List[Any] = field(default_factory=list)

    def validate(self, key: str) -> None:
        check_choice(self.type, tuple(PARAM_KEYS), f"{key}.type")
        if self.type == "categorical":
            check(bool(self.choices) and all(c is None or isinstance(c, (bool, int, float, str)) for c in self.choices),
                  f"{key}.choices", "must be a non-empty list of plain values", f"set {key}.choices: [adamw, sgd]")
            return
        check(self.low is not None and self.high is not None and self.low < self.high, key,
              f"needs low < high (got low={self.low}, high={self.high})", f"set {key}: {{type: float, low: 0.001, high: 0.1}}")
        check(not self.log or self.low > 0, f"{key}.low", "must be > 0 on a log scale", f"set {key}.log: false")
        check(not (self.log and self.step), f"{key}.step", "cannot be combined with log: true", f"drop {key}.step")

    def sample(self, trial: Any) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def first(self) -> Any:
        return self.choices[0] if self.type == "categorical" else int(self.low) if self.type == "int" else self.low


@dataclass
class TuneSpace:
    """The study: what it searches, for how many trials, what it optimizes, how it samples and prunes."""

    study_name: str
    params: Dict[str, Param]
    n_trials: int = 20
    """Trials that finish (completed or pruned), counted over every session and process of the study."""
    metric: Optional[str] = None
    """The optimized metric (val/acc, final:val/loss, ...); default: the config's `optimized_metric`."""
    direction: str = "auto"
    """maximize, minimize or auto (from the metric)."""
    storage: Optional[str] = None
    """Any SQLAlchemy URL; default sqlite:///ROOT/study.db."""
    sampler: Dict[str, Any] = field(default_factory=lambda: {"type": "tpe"})
    pruner: Dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    overrides: List[str] = field(default_factory=list)
    """Overrides every trial gets (the command line's come after them)."""

    def validate(self) -> None:
        check(self.n_trials >= 1, "n_trials", f"must be >= 1 (got {self.n_trials})", "set n_trials: 20")
        check_choice(self.direction, ("auto", "maximize", "minimize"), "direction")
        check(bool(self.params), "params", "names no parameter to search",
              "add e.g. params: {optimizer.lr: {type: float, low: 1.0e-4, high: 0.3, log: true}}")
        for name, settings in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
            chosen = getattr(self, name)
            check_choice(str(chosen.get("type")), tuple(settings), f"{name}.type")
            _known(chosen, ("type", *settings[chosen["type"]]), name)
        for key, param in self.params.items():
            param.validate(f"params.{key}")
        for override in self.overrides:
            check(isinstance(override, str) and "=" in override, "overrides", f"'{override}' is not KEY=VALUE",
                  "list overrides such as trainer.max_epochs=10")


def _known(mapping: Dict[str, Any], allowed: tuple, key: str) -> None:
    from trainctl.errors import suggestion

    for name in mapping:
        check(name in allowed, f"{key}.{name}", f"is not a setting here.{suggestion(str(name), allowed)} "
              f"Settings: {', '.join(allowed)}", f"remove {key}.{name}")


def _number(value: Any, key: str) -> Optional[float]:
    if value is None:
        return None
    try:  # YAML reads 1e-4 (no dot) as a string
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be a number (got {value!r})", f"set {key}: 0.001") from None


def _choice(value: Any, key: str) -> Dict[str, Any]:
    """`median` or `{type: median, n_startup_trials: 3}` -> the mapping."""
    if isinstance(value, str) or value is None:
        return {"type": str(value).lower() if value is not None else "none"}
    check(isinstance(value, dict), key, f"must be a name or a mapping with `type` (got {value!r})", f"set {key}: median")
    return dict(value)


def parse_space(data: Any, default_name: str) -> TuneSpace:
    """A validated :class:`TuneSpace` from a space file's contents."""
    check(isinstance(data, dict), "space", "must be a YAML mapping with `params:`",
          "see conf/tune/digits.yaml for an example")
    _known(data, SPACE_KEYS, "space")
    params = data.get("params") or {}
    check(isinstance(params, dict), "params", "must map override keys to distributions",
          "set params: {optimizer.lr: {type: float, low: 1.0e-4, high: 0.3, log: true}}")
    parsed: Dict[str, Param] = {}
    for key, spec in params.items():
        where = f"params.{key}"
        check(isinstance(spec, dict) and "type" in spec, where, "must be a mapping with `type`",
              f"set {where}: {{type: float, low: 0.001, high: 0.1}}")
        check_choice(str(spec["type"]), tuple(PARAM_KEYS), f"{where}.type")
        _known(spec, PARAM_KEYS[spec["type"]], where)
        parsed[str(key)] = Param(str(key), spec["type"], _number(spec.get("low"), f"{where}.low"),
                                 _number(spec.get("high"), f"{where}.high"), bool(spec.get("log", False)),
                                 _number(spec.get("step"), f"{where}.step"), list(spec.get("choices") or []))
    overrides = data.get("overrides") or []
    space = TuneSpace(study_name=str(data.get("study_name") or default_name), params=parsed,
                      n_trials=int(data.get("n_trials", 20)), metric=data.get("metric"),
                      direction=str(data.get("direction", "auto")).lower(), storage=data.get("storage"),
                      sampler=_choice(data.get("sampler", "tpe"), "sampler"),
                      pruner=_choice(data.get("pruner", "median"), "pruner"),
                      overrides=list(overrides) if isinstance(overrides, list) else [overrides])
    space.validate()
    return space


def override_text(key: str, value: Any) -> str:
    """A sampled value as the override `trainctl run` takes."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return f"{key}={text}"


# --- the study --------------------------------------------------------------------------------------------

def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError(None, "trainctl tune needs optuna, which is not installed", TUNE_EXTRA) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def make_sampler(settings: Dict[str, Any]) -> Any:
    optuna = import_optuna()
    options = {k: v for k, v in settings.items() if k != "type"}
    return (optuna.samplers.TPESampler if settings["type"] == "tpe" else optuna.samplers.RandomSampler)(**options)


def make_pruner(settings: Dict[str, Any]) -> Any:
    optuna = import_optuna()
    options = {k: v for k, v in settings.items() if k != "type"}
    if settings["type"] == "median":
        return optuna.pruners.MedianPruner(**options)
    if settings["type"] == "hyperband":
        return optuna.pruners.HyperbandPruner(**options)
    return optuna.pruners.NopPruner()


def open_study(space: TuneSpace, storage_url: str, direction: str) -> Any:
    """Create the study in its storage, or load it (a study that ran before continues)."""
    optuna = import_optuna()
    engine = {"connect_args": {"timeout": 60}} if storage_url.startswith("sqlite") else None  # several processes
    for attempt in range(3):  # processes that start together race to create the tables: the loser retries
        try:
            storage = optuna.storages.RDBStorage(storage_url, engine_kwargs=engine)
            study = optuna.create_study(storage=storage, study_name=space.study_name, direction=direction,
                                        load_if_exists=True, sampler=make_sampler(space.sampler),
                                        pruner=make_pruner(space.pruner))
            break
        except Exception as exc:  # a bad URL, a missing driver, a database that cannot be opened
            if attempt == 2 or isinstance(exc, (ImportError, ValueError)):
                raise ConfigError("storage", f"cannot open the study storage {storage_url}: {type(exc).__name__}: "
                                  f"{exc}", "pass a SQLAlchemy URL such as sqlite:///study.db") from None
            time.sleep(1.0 + attempt)
    existing = study.direction.name.lower()
    check(existing == direction, "direction", f"the study '{space.study_name}' in {storage_url} is {existing}, "
          f"but this space asks for {direction}", "use another study_name, or the direction of the stored study")
    return study


def finished(study: Any) -> int:
    """Trials that count towards `n_trials`: completed or pruned."""
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))


def running(study: Any) -> int:
    from optuna.trial import TrialState

    return sum(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


UNCLAIMED_SECONDS = 2.0
"""A RUNNING trial whose process has not recorded its host and pid after this long was left by a process
that died between asking for it and recording itself (a live one takes milliseconds)."""


def fail_stale(study: Any) -> List[int]:
    """Trials left RUNNING by a process of this machine that no longer exists (killed): marked failed, their
    parameters queued to be tried again. Trials of live processes and of other machines are left alone."""
    from optuna.trial import TrialState

    import datetime

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if "pid" not in attrs:  # a process records itself right after asking; one that did not died in between
            age = datetime.datetime.now() - (trial.datetime_start or datetime.datetime.now())
            if age.total_seconds() > UNCLAIMED_SECONDS and give_up(study, trial.number, trial.params):
                failed.append(trial.number)
            continue
        if attrs.get("host") != socket.gethostname() or not isinstance(attrs.get("pid"), int):
            continue
        if attrs["pid"] == os.getpid() or _alive(attrs["pid"]):
            continue
        if give_up(study, trial.number, trial.params):
            failed.append(trial.number)
    return failed


def give_up(study: Any, number: int, params: Dict[str, Any]) -> bool:
    """Mark a trial failed and queue its parameters for a later trial. False when it is no longer running
    (another process got there first)."""
    from optuna.trial import TrialState

    try:
        study.tell(number, state=TrialState.FAIL)
    except (RuntimeError, ValueError) as exc:
        log.info("trial %d: not marked failed (%s)", number, exc)
        return False
    if params:
        study.enqueue_trial(params)
    return True


# --- reporting to the trial while it trains -----------------------------------------------------------------

class PruningCallback(Callback):
    """After each evaluation: report the optimized metric to the Optuna trial and stop the run (stop reason
    `pruned`) when the study's pruner decides so. Optuna's step is the number of the evaluation."""

    name = "optuna_pruning"

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.evaluations = 0
        self.reported: List[float] = []

    def on_eval_end(self, run: "Run", state: "RunState", metrics: Dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return
        self.evaluations += 1
        self.reported.append(float(value))
        self.trial.report(float(value), self.evaluations)
        if self.trial.should_prune():
            log.info("pruned by the study: %s %.6g at evaluation %d (step %d)", self.metric, value,
                     self.evaluations, state.step)
            state.request_stop(PRUNED)


@contextlib.contextmanager
def log_file(path: Path) -> Iterator[None]:
    """The trial's `trainctl.log`, in the format `trainctl run` writes (read by `trainctl report`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", delay=True)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the console gets the run's own lines once, not again through Hydra's handler
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
        handler.close()
