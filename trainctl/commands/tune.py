"""`trainctl tune --space FILE [OVERRIDES...] [-o ROOT] [--n-trials N]`: an Optuna study with pruning
(:mod:`trainctl.tune`). Each trial is composed like `trainctl run OVERRIDES SAMPLED...` and trained in this
process in `ROOT/trial-NNNN`; the study is kept in `ROOT/study.db` (or the space's `storage`), so running the
same command again continues it. Prints one line per trial, then the table of trials and the best trial's
overrides; writes `ROOT/optimization_results.yaml`, which `trainctl report ROOT` reads."""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from trainctl.errors import ConfigError, check, exit_code
from trainctl.groups import CONF_DIR

SPACES_DIR = CONF_DIR / "tune"


def _parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="trainctl tune", description="Optuna study with pruning: every trial is a trainctl run in ROOT/trial-NNNN "
        "that reports its validation metric after each evaluation and stops early when the pruner says so. The "
        "study lives in a database (ROOT/study.db by default): run the same command again to continue it, or in "
        "several processes at once to share the work.")
    parser.add_argument("overrides", nargs="*", help="overrides every trial gets, as for `trainctl run`")
    parser.add_argument("--space", required=True, help="the search space: a YAML file, or the name of one in "
                        "conf/tune/ (e.g. digits)")
    parser.add_argument("-o", "--output", help="the study's directory ROOT (default: outputs/tune/STUDY_NAME)")
    parser.add_argument("--n-trials", type=int, help="finished (completed or pruned) trials to reach, over every "
                        "session and process of the study (default: the space's n_trials)")
    return parser


def load_space_file(text: str) -> Tuple[Path, Any]:
    """(path, parsed space) of `--space`: a file, or a name in conf/tune/."""
    import yaml

    from trainctl.tune import parse_space

    path = Path(text)
    if not path.is_file() and (SPACES_DIR / f"{text}.yaml").is_file():
        path = SPACES_DIR / f"{text}.yaml"
    known = sorted(p.stem for p in SPACES_DIR.glob("*.yaml")) if SPACES_DIR.is_dir() else []
    check(path.is_file(), "--space", f"{text}: no such file" + (f" (built-in spaces: {', '.join(known)})" if known else ""),
          "pass a YAML file with `params:` (see conf/tune/digits.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError("--space", f"cannot read {path}: {exc}", "fix the YAML file") from None
    try:
        return path, parse_space(data, path.stem)
    except ConfigError as error:  # name the file in the message
        raise ConfigError(f"{path.name}: {error.key}" if error.key else path.name, error.message, error.fix) from None


def main(argv: Sequence[str]) -> None:
    from trainctl import config, launch
    from trainctl.runs import AUTO, parse_optimized_metric
    from trainctl.spec import optimized_mode
    from trainctl.tune import import_optuna, open_study, override_text

    args = _parser().parse_intermixed_args(list(argv))
    _, space = load_space_file(args.space)
    n_trials = args.n_trials if args.n_trials is not None else space.n_trials
    check(n_trials >= 1, "--n-trials", f"must be >= 1 (got {n_trials})", "pass --n-trials 20")
    base_dir = os.getcwd()
    root = Path(base_dir, args.output or f"outputs/tune/{space.study_name}").resolve()
    fixed = list({o.partition("=")[0]: o for o in [*space.overrides, *args.overrides]}.values())  # the last wins
    fixed_keys = {o.partition("=")[0].lstrip("+~") for o in fixed}
    for key in space.params:
        check(key not in fixed_keys, key, "is searched by the space and also set as a fixed override",
              f"drop {key}=... from the command line or the space's overrides")
    import_optuna()
    with config.session():
        first = [override_text(k, p.first()) for k, p in space.params.items()]
        cfg = config.compose_for_run([*fixed, *first])  # every key composes and validates before the study
        spec, optimized = config.load_run(config.without_hydra(cfg), base_dir)
        if launch.should_self_launch(spec.parallelism):
            raise ConfigError("parallelism.nproc_per_node", "trainctl tune trains each trial in its own process",
                              "drop parallelism.nproc_per_node (run several `trainctl tune` processes instead)")
        metric = space.metric or optimized
        name, final = parse_optimized_metric(metric)
        if name == AUTO:
            from trainctl import data as data_mod

            name = spec.monitor(data_mod.probe(spec.data)[0])
            metric = ("final:" if final else "") + name
        wanted = "maximize" if optimized_mode(metric, spec) == "max" else "minimize"
        direction = wanted if space.direction == "auto" else space.direction
        check(direction == wanted, "direction", f"is {direction}, but {metric} is better when "
              f"{'larger' if wanted == 'maximize' else 'smaller'}", f"set direction: {wanted} (or auto)")
        root.mkdir(parents=True, exist_ok=True)
        storage = space.storage or f"sqlite:///{root / 'study.db'}"
        study = open_study(space, storage, direction)
        _run_study(study, space, n_trials, fixed, root, base_dir, metric, name)
    _print_results(study, space, fixed, root, metric)


def _run_study(study: Any, space: Any, n_trials: int, fixed: List[str], root: Path, base_dir: str,
               metric: str, name: str) -> None:
    from trainctl.tune import fail_stale, finished, running

    before = finished(study)
    print(f"study {space.study_name} ({study.direction.name.lower()} {metric}) in {root}: "
          f"{before} of {n_trials} trials finished" + (", continuing" if before else ""), flush=True)
    while True:
        for number in fail_stale(study):
            print(f"trial {number}: its process ended without finishing it; marked failed, its parameters queued "
                  "again", flush=True)
        if finished(study) + running(study) >= n_trials:
            return
        _run_trial(study, space, fixed, root, base_dir, metric, name)


def _run_trial(study: Any, space: Any, fixed: List[str], root: Path, base_dir: str, metric: str, name: str) -> None:
    """Ask for a trial, train it, tell the study how it ended. A trial that fails is recorded and the study
    goes on; an interrupted one is marked failed, its parameters queued for the next session, and the
    interruption ends the command."""
    from optuna.trial import TrialState

    from trainctl import config
    from trainctl.commands.run import train_job
    from trainctl.runs import objective_value
    from trainctl.sweep import record_failure
    from trainctl.tune import PRUNED, PruningCallback, give_up, log_file, override_text

    trial = study.ask()
    started = time.perf_counter()
    run_dir = root / f"trial-{trial.number:04d}"
    for key, value in (("host", socket.gethostname()), ("pid", os.getpid()), ("run_dir", str(run_dir))):
        trial.set_user_attr(key, value)
    state, value, summary, note = TrialState.FAIL, None, None, ""
    try:
        sampled = [override_text(k, p.sample(trial)) for k, p in space.params.items()]
        overrides = [*fixed, *sampled]
        try:
            cfg = config.compose_for_run(overrides)
            task_cfg = config.without_hydra(cfg)
            task_cfg.optimized_metric = metric
            spec, _ = config.load_run(task_cfg, base_dir)
        except ConfigError as error:
            record_failure(run_dir, "failed", str(error))
            raise
        _write_hydra_files(run_dir, task_cfg, overrides)
        callback = PruningCallback(trial, name)
        with log_file(run_dir / "trainctl.log"):
            summary = train_job(spec, run_dir, base_dir, overrides, callbacks=[callback])
        reason = summary.get("stop_reason")
        if reason == "interrupted":
            raise KeyboardInterrupt
        if reason == PRUNED:
            state, note = TrialState.PRUNED, f" at evaluation {callback.evaluations}"
        elif exit_code(summary) == 0:
            value = objective_value(run_dir, metric)
            state = TrialState.COMPLETE if math.isfinite(value) else TrialState.FAIL
        else:
            note = f": {reason}"
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)
        give_up(study, trial.number, trial.params)
        _annotate(run_dir, study, trial.number, "FAIL", None, trial.params)
        print(f"trial {trial.number}: interrupted; marked failed and its parameters queued again. Run the same "
              "command to continue the study.", file=sys.stderr, flush=True)
        code = exit_code(summary) if summary else 130
        raise SystemExit(code if code >= 128 else 130) from None
    except ConfigError as error:
        note = f": {error}".replace("\n", " ")
    except Exception as exc:  # a training failure is in the run's summary.json; the study goes on
        note = f": {type(exc).__name__}: {exc}"
    study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    _annotate(run_dir, study, trial.number, state.name, value, trial.params)
    shown = f"{metric} {value:.6g}" if value is not None and state == TrialState.COMPLETE else ""
    print(f"trial {trial.number} {state.name.lower()}{note}  {shown}  "
          f"{' '.join(override_text(k, v) for k, v in trial.params.items())}  ({time.perf_counter() - started:.1f} s)",
          flush=True)
    if summary and summary.get("signal_number"):  # a signal that came as the trial was ending: it counts, and stops
        print("trainctl tune: interrupted. Run the same command to continue the study.", file=sys.stderr, flush=True)
        raise SystemExit(128 + int(summary["signal_number"]))


def _write_hydra_files(run_dir: Path, task_cfg: Any, overrides: List[str]) -> None:
    """`.hydra/config.yaml` and `overrides.yaml`, as `trainctl run` leaves them (`trainctl report` reads both)."""
    import yaml
    from omegaconf import OmegaConf

    from trainctl.files import write_text

    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    write_text(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(task_cfg))
    write_text(run_dir / ".hydra" / "overrides.yaml", yaml.safe_dump(list(overrides), sort_keys=False))


def _annotate(run_dir: Path, study: Any, number: int, state: str, value: Any, params: Dict[str, Any]) -> None:
    """The trial's state in its `summary.json` (status `pruned` for a pruned trial)."""
    import json

    from trainctl.files import write_json
    from trainctl.tune import PRUNED

    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if state == "PRUNED":
        summary["status"] = PRUNED
    summary["trial"] = {"study": study.study_name, "number": number, "state": state, "value": value,
                        "params": params}
    try:
        write_json(run_dir / "summary.json", summary)
    except OSError:
        pass


def _print_results(study: Any, space: Any, fixed: List[str], root: Path, metric: str) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from trainctl.files import write_text
    from trainctl.tune import override_text

    trials = study.get_trials(deepcopy=False)
    keys = list(dict.fromkeys([*space.params, *(k for t in trials for k in t.params)]))
    table = Table(title=f"trainctl tune: {study.study_name}", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("trial", "state", metric, *keys, "evaluations"):
        table.add_column(column, justify="left" if column in ("state", *keys) else "right")
    for t in trials:
        table.add_row(str(t.number), t.state.name.lower(), f"{t.value:.6g}" if t.value is not None else "—",
                      *(_short(t.params.get(k)) for k in keys), str(len(t.intermediate_values)))
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    console.print(table)
    try:
        best = study.best_trial
    except ValueError:
        print("no trial has completed yet")
        return
    best_overrides = [override_text(k, v) for k, v in best.params.items()]
    print(f"best: trial {best.number} ({metric} {best.value:.6g}), {best.user_attrs.get('run_dir', '')}")
    print("trainctl run " + " ".join([*fixed, *best_overrides]))
    import yaml

    results = {"name": "trainctl tune", "study_name": study.study_name, "direction": study.direction.name.lower(),
               "metric": metric, "best_trial": best.number, "best_value": best.value, "best_params": best.params,
               "best_overrides": best_overrides}
    write_text(root / "optimization_results.yaml", yaml.safe_dump(results, sort_keys=False))
    print(f"written: {root / 'optimization_results.yaml'} (compare the trials: trainctl report {root})")


def _short(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
