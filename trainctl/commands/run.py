"""`trainctl run [OVERRIDES]`: a Hydra app. A plain run is composed and validated once here, its run
directory owned before anything is written, then the job runs exactly as `hydra.main` runs it (run
directory, `.hydra/`, logging, callbacks); sweeps (`-m`), `--cfg`, `--config-dir` and Hydra's own flags
go through `hydra.main` after the checks of :mod:`trainctl.preflight`.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig

from trainctl import config, launch
from trainctl.errors import EXIT_CONFIG, ConfigError, exit_code

if TYPE_CHECKING:
    from trainctl.parallel import Distributed
    from trainctl.spec import RunSpec

Job = Callable[[Path, str, List[str]], Tuple[Dict[str, Any], str]]
"""(run directory, base directory, the job's overrides) -> (its summary, its optimized metric)."""


def main(argv: Sequence[str]) -> None:
    launch.follow_launcher()  # a rank under torchrun ends with its agent
    args = config.hydra_args(argv)
    if args.help:
        from trainctl.commands.help import print_run_help

        print_run_help()
        return
    if not (args.hydra_help or args.info or args.shell_completion or args.config_path or args.experimental_rerun):
        overrides = list(args.overrides)
        if args.config_dir:  # the user's own config directory joins the search path, as Hydra does
            overrides.append(f"hydra.searchpath=[file://{os.path.abspath(args.config_dir)}]")
        elif not (args.multirun or args.cfg or args.run):
            gc.disable()  # start-up builds ~600k long-lived objects; job.train freezes them and re-enables
            run_single(overrides, os.getcwd(), args.config_name or config.CONFIG_NAME)
            return
        from trainctl.preflight import preflight

        preflight(overrides, args.multirun, os.getcwd(), args.config_name or config.CONFIG_NAME)
    run_hydra(argv)


# --- one plain run ------------------------------------------------------------------------------------

def run_single(overrides: Sequence[str], base_dir: str, config_name: str = config.CONFIG_NAME) -> None:
    """One composition, checked before anything is written; then, depending on how the process was
    started: start torchrun (parallelism.nproc_per_node), train as a rank other than 0 (no Hydra job),
    or run the Hydra job as rank 0 or the only process, in the directory it owns."""
    overrides = list(overrides)
    with config.session():
        cfg = config.compose_for_run(overrides, config_name)
        spec, metric = config.load_run(config.without_hydra(cfg), base_dir)
        run_dir = config.run_dir_of(cfg, base_dir)
        launch.check_launch(spec.parallelism)
        if launch.should_self_launch(spec.parallelism):
            _exit_with(launch.run_launched(spec, _decided(run_dir), overrides))
            return
        if spec.checkpoint.resume != "auto" and run_dir is not None and "RANK" not in os.environ:
            launch.check_fresh_run_dir(run_dir)
        dist, run_dir = launch.join(spec, run_dir)
        if dist is not None and not dist.is_main:
            _exit_with(_train_rank(spec, _decided(run_dir), base_dir, dist))
            return
        if run_dir is not None:  # own the directory before Hydra writes `.hydra/` and the log into it
            launch.own_run_dir(run_dir, spec)
            cfg.hydra.run.dir = str(run_dir)  # the directory locked is the one the job writes

        def task(task_cfg: DictConfig) -> Any:  # validated above: the job trains that spec, once
            return _task(lambda job_dir, job_base, job_overrides: (
                train_job(spec, job_dir, job_base, job_overrides, dist), metric))
        _hydra_job(cfg, config_name, task)


def _decided(run_dir: Optional[Path]) -> Path:
    if run_dir is None:
        raise ConfigError("hydra.run.dir", "cannot be decided before the processes start",
                          "set hydra.run.dir=outputs/NAME")
    return run_dir


def _train_rank(spec: "RunSpec", run_dir: Path, base_dir: str, dist: "Distributed") -> Dict[str, Any]:
    """A rank other than 0: trains in the directory rank 0 owns, logging warnings and errors only."""
    from trainctl import parallel
    from trainctl.job import train

    with parallel.quiet():
        summary = train(spec, run_dir, base_dir, dist)
    dist.close()
    return summary


def _exit_with(summary: Dict[str, Any]) -> None:
    code = exit_code(summary)
    if code:
        raise SystemExit(code)


def _hydra_job(cfg: DictConfig, config_name: str, task: Callable[[DictConfig], Any]) -> None:
    """Run ``task`` as `hydra.main` runs a job: callbacks, the run directory and `.hydra/`, logging."""
    from hydra._internal.callbacks import Callbacks
    from hydra._internal.utils import run_and_report
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import run_job
    from hydra.types import HydraContext

    hydra = GlobalHydra.instance().hydra
    assert hydra is not None

    def job() -> None:
        callbacks = Callbacks(cfg)
        callbacks.on_run_start(config=cfg, config_name=config_name)
        context = HydraContext(config_loader=hydra.config_loader, callbacks=callbacks)
        ret = run_job(hydra_context=context, task_function=task, config=cfg, job_dir_key="hydra.run.dir",
                      job_subdir_key=None, configure_logging=True)
        callbacks.on_run_end(config=cfg, config_name=config_name, job_return=ret)
        _ = ret.return_value  # raises what the task raised

    run_and_report(job)


# --- every job ------------------------------------------------------------------------------------------

def _task(job: Job) -> Any:
    """What Hydra runs for a job: train it in its directory and return the value of `optimized_metric`
    (for sweepers). In a sweep a failed job is recorded and returns a `FailedJob`, so the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra = HydraConfig.get()
    run_dir, base_dir, overrides = Path(hydra.runtime.output_dir), get_original_cwd(), list(hydra.overrides.task)
    if hydra.mode.name == "MULTIRUN":
        from trainctl.sweep import run_job

        return run_job(lambda: job(run_dir, base_dir, overrides), run_dir)
    try:
        summary, metric = job(run_dir, base_dir, overrides)
    except ConfigError as error:
        launch.discard_if_untouched(run_dir)
        config.report_config_error(error)
        raise SystemExit(EXIT_CONFIG) from None
    _exit_with(summary)
    from trainctl.runs import objective_value

    return objective_value(run_dir, metric)


def hydra_task(cfg: DictConfig) -> Any:
    """The task function of `hydra.main` (sweeps and flags): each job validates its own config, inside
    the job, so that a sweep records a job whose values do not fit together and goes on."""
    def job(run_dir: Path, base_dir: str, overrides: List[str]) -> Tuple[Dict[str, Any], str]:
        spec, metric = config.load_run(cfg, base_dir)
        launch.check_launch(spec.parallelism)
        return train_job(spec, run_dir, base_dir, overrides), metric
    return _task(job)


def train_job(spec: "RunSpec", run_dir: Path, base_dir: str, overrides: List[str],
              dist: Optional["Distributed"] = None, callbacks: Sequence[Any] = ()) -> Dict[str, Any]:
    """Train one job in ``run_dir``, as torchrun processes when it asks for several (a sweep job of
    `parallelism.nproc_per_node=N`), else in this process, which owns the directory meanwhile.
    ``callbacks``: more callbacks for an in-process run (e.g. `trainctl tune`'s pruning)."""
    from trainctl import rundir

    if launch.should_self_launch(spec.parallelism):  # rank 0 of the started job owns the directory
        return launch.run_launched(spec, run_dir, overrides)
    from trainctl.job import train

    taken = launch.own_run_dir(run_dir, spec)
    try:
        summary = train(spec, run_dir, base_dir, dist, callbacks)
        if dist is not None:
            dist.close()
    finally:
        if taken:
            rundir.release(run_dir)
    return summary


def run_hydra(argv: Sequence[str]) -> None:
    """Hand a `trainctl run` command line to `hydra.main` (sweeps, --cfg, --info, launchers, ...)."""
    import hydra

    config.register()
    main = hydra.main(config_path=str(config.CONF_DIR), config_name=config.CONFIG_NAME, version_base="1.3")(hydra_task)
    sys.argv = ["trainctl", *argv]
    try:
        main()
    except Exception as exc:  # Hydra re-raises what fails before a job starts (composing, a bad file)
        if os.environ.get("TRAINCTL_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise config.translate(exc, list(argv)) from None
