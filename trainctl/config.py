"""Hydra glue: compose overrides into a RunSpec, turn Hydra/OmegaConf errors into one clear
:class:`ConfigError`, check a command line before Hydra creates a run directory, and the task
function `trainctl run` hands to Hydra.

Nothing here imports torch: a typo is reported in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

from omegaconf import DictConfig

from trainctl import rundir
from trainctl.errors import EXIT_CONFIG, EXIT_FAILED, ConfigError, did_you_mean, exit_code, suggestion
from trainctl.spec import CONF_DIR, RunSpec, load_spec, register_configs, unknown_keys

CONFIG_NAME = "train"


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    from trainctl.sweep import TrainConfig

    register_configs()
    ConfigStore.instance().store(name="train_config", node=TrainConfig)


@contextlib.contextmanager
def _hydra() -> Iterator[None]:
    from hydra import initialize_config_dir

    _register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="trainctl"):
        yield


def _compose(overrides: Sequence[str], config_name: str = CONFIG_NAME) -> DictConfig:
    from hydra import compose

    return compose(config_name, overrides=list(overrides))


def compose_spec(overrides: Sequence[str], base_dir: str, config_name: str = CONFIG_NAME) -> Tuple[DictConfig, RunSpec]:
    """Compose and validate; any problem is raised as a ConfigError naming the key and the fix."""
    with _hydra():
        cfg = _checked(lambda: _compose(overrides, config_name), overrides, config_name)
        return cfg, load_run(cfg, base_dir)[0]


def load_run(cfg: DictConfig, base_dir: str) -> Tuple[RunSpec, str]:
    """(validated run spec, optimized metric) of a composed `trainctl run` config."""
    from trainctl.sweep import split

    return split(load_spec(cfg, base_dir))


def _checked(compose: Callable[[], DictConfig], overrides: Sequence[str], config_name: str) -> DictConfig:
    """Run a composition; Hydra/OmegaConf errors and keys the schema lacks become one ConfigError."""
    try:
        cfg = compose()
    except ConfigError:
        raise
    except Exception as exc:  # Hydra and OmegaConf report problems with many exception types
        raise translate(exc, overrides, config_name) from None
    extra = [k for k in unknown_keys(cfg) if k != "hydra" and not k.startswith("hydra.")]
    if extra:
        raise _unknown_key(extra[0], overrides, config_name, groups_too=True)
    return cfg


def group_options(group: str) -> List[str]:
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    return [o for o in loader.get_group_options(group) if not o.startswith("_")]


def _groups() -> List[str]:
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    return [g for g in loader.list_groups("") if g not in ("hydra", "schema")]


def translate(exc: BaseException, overrides: Sequence[str], config_name: str = CONFIG_NAME) -> ConfigError:
    """A Hydra/OmegaConf composition error as one ConfigError (with suggestions)."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    text = str(exc)
    cause = exc.__cause__
    yaml_problem = _yaml_error(exc)
    if yaml_problem is not None:
        return yaml_problem
    missing = re.search(r"Could not find '([^']+)'", text)
    if isinstance(exc, MissingConfigException) and missing and "/" in missing.group(1):
        from trainctl.sweep import missing_plugin

        group, option = missing.group(1).rsplit("/", 1)
        plugin = missing_plugin(group, option)
        if plugin is not None:
            return plugin
        options = group_options(group)
        close = did_you_mean(option, options, 1) or options[:1]
        plus = "+" if group in ("recipe", "sweep") else ""
        return ConfigError(group, f"unknown option '{option}'.{suggestion(option, options)} "
                           f"Available: {', '.join(options) or '(none)'}", f"set {plus}{group}={close[0]}"
                           if close else None)
    if isinstance(exc, OverrideParseException):
        return ConfigError(None, f"cannot parse the override: {text.splitlines()[0]}",
                           "quote values that hold spaces, brackets or commas, e.g. 'data.features=[a,b]'")
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
        return _unknown_key(cause.full_key, overrides, config_name)
    if isinstance(cause, ValidationError):
        key = getattr(cause, "full_key", None) or "?"
        return ConfigError(key, cause.msg.splitlines()[0] if hasattr(cause, "msg") else str(cause),
                           f"set {key} to a value of the right type (see `trainctl show`)")
    no_match = re.search(r"Could not override '([^']+)'\. No match in the defaults list", text)
    if no_match:
        name = no_match.group(1)
        return _unknown_key(name, overrides, config_name, groups_too=True)
    exists = re.search(r"An item is already at '([^']+)'", text)
    if exists:
        return ConfigError(exists.group(1), "already exists, so it cannot be added with '+'",
                           f"drop the '+': {exists.group(1)}=VALUE")
    delete = re.search(r"Could not delete from config\. '([^']+)' does not exist", text)
    if delete:
        return _unknown_key(delete.group(1), overrides, config_name)
    detail = getattr(cause, "msg", None) or text.strip() or type(exc).__name__
    key = getattr(cause, "full_key", None)
    return ConfigError(key or None, detail.splitlines()[0])


def _yaml_error(exc: BaseException) -> Optional[ConfigError]:
    """A YAML file that cannot be read as plain config (a `!!python/...` tag, bad syntax), named with its
    line, or None when ``exc`` is not about YAML."""
    import yaml

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, yaml.YAMLError):
            mark = getattr(exc, "problem_mark", None)
            where = f"{mark.name}, line {mark.line + 1}" if mark is not None else "a config file"
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            fix = ("configs hold plain values only: remove the !! tag" if "!!" in str(exc) or "tag" in problem
                   else "fix the YAML syntax there")
            return ConfigError(None, f"{where}: {problem}", fix)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def _flat_keys(node: object, prefix: str = "") -> List[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            full = f"{prefix}{key}"
            keys.append(full)
            try:
                child = node._get_node(key)
            except Exception:
                continue
            if isinstance(child, DictConfig):
                keys.extend(_flat_keys(child, full + "."))
    return keys


def _unknown_key(full_key: str, overrides: Sequence[str], config_name: str, groups_too: bool = False) -> ConfigError:
    choices = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0]
               and o.split("=", 1)[0].lstrip("+~") != full_key]
    try:
        cfg = _compose(choices, config_name)
    except Exception:
        cfg = _compose([], config_name)
    keys = [k for k in _flat_keys(cfg) + (_groups() if groups_too else []) if k != full_key]
    leaf = full_key.rsplit(".", 1)[-1]
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != full_key]
    siblings = [k for k in keys if parent and k.startswith(parent + ".") and k.count(".") == full_key.count(".")]
    hits = same_leaf or did_you_mean(full_key, siblings or keys)
    where = f" in {parent}" if parent else ""
    option = cfg.get(parent, {}).get("name") if parent and isinstance(cfg.get(parent), DictConfig) else None
    if option:
        where += f" ({parent}={option})"
    owners = _options_with(parent, leaf) if option and "." not in parent else []
    if owners:  # a setting of another option of the group: say which, and pick that option
        return ConfigError(full_key, f"no such key{where}: it is a setting of {parent}={', '.join(owners)}",
                           f"set {parent}={owners[0]}")
    hint = (" Did you mean " + " or ".join(f"'{h}'" for h in hits) + "?") if hits else ""
    return ConfigError(full_key, f"no such key{where}.{hint}",
                       f"set {hits[0]}=..." if hits else "run `trainctl show` to list the keys")


def _options_with(group: str, key: str) -> List[str]:
    """The options of ``group`` whose schema has ``key``."""
    from hydra.core.config_store import ConfigStore

    schemas = ConfigStore.instance().repo.get("schema", {}).get(group, {})
    return sorted(name[: -len(".yaml")] for name, entry in schemas.items()
                  if hasattr(entry, "node") and key in entry.node)


# --- the `run` command line ---------------------------------------------------------------------------

def hydra_args(argv: Sequence[str]):
    """Parse a `trainctl run` command line exactly as Hydra will."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(list(argv))


def _is_hydra_override(override: str) -> bool:
    """An override of Hydra's own settings (checked by Hydra), except the search path, which changes
    what the run's config is composed from."""
    key = override.lstrip("+~").split("=", 1)[0]
    return (key == "hydra" or key.startswith(("hydra.", "hydra/"))) and key != "hydra.searchpath"


def preflight(overrides: Sequence[str], multirun: bool, base_dir: str, config_name: str = CONFIG_NAME) -> None:
    """Check a command line before Hydra starts: for a sweep, every value of every swept key."""
    plain = [o for o in overrides if not _is_hydra_override(o)]
    if not multirun:
        _, spec = compose_spec(plain, base_dir, config_name)
        for override in overrides:
            if override.startswith("hydra.run.dir=") and spec.checkpoint.resume != "auto":
                check_fresh_run_dir(Path(base_dir, override.split("=", 1)[1]))
        return
    from trainctl.sweep import check_sweep

    check_sweep(overrides, plain, base_dir, config_name)


def compose_hydra(overrides: Sequence[str], config_name: str = CONFIG_NAME) -> DictConfig:
    """The `hydra` node as a sweep of ``overrides`` will see it (a launcher or sweeper whose plugin is
    missing fails here)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    with _hydra():
        hydra = GlobalHydra.instance().hydra
        assert hydra is not None
        cfg = _checked(lambda: hydra.compose_config(config_name, list(overrides), run_mode=RunMode.MULTIRUN,
                                                    with_log_configuration=False), overrides, config_name)
        return cfg.hydra


def report_config_error(error: ConfigError) -> None:
    if os.environ.get("RANK", "0") != "0":
        # Under torchrun every rank finds the same problem and rank 0 reports it. torchrun stops the other
        # ranks as soon as one exits, so this one waits a moment for rank 0 to get its message out.
        import time

        time.sleep(3)
        return
    print(f"trainctl: error: {error}", file=sys.stderr)


def _discard_if_untouched(run_dir: Path) -> None:
    """Remove a run directory holding nothing but Hydra's `.hydra/` and the lock (a run that never
    started), unless another process owns it."""
    if not run_dir.is_dir():
        return
    with contextlib.suppress(OSError, ConfigError), rundir.owning(run_dir, None):
        if rundir.is_untouched(run_dir):
            shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
            (run_dir / rundir.LOCK_NAME).unlink(missing_ok=True)
            run_dir.rmdir()


def own_run_dir(run_dir: Path, spec: RunSpec) -> bool:
    """Take the lock of the directory a run writes (see :mod:`trainctl.rundir`) - refusing first, without
    creating anything, a directory that holds another run - and check it again under the lock. Returns
    whether the lock was taken here (False: this process held it already)."""
    fresh = spec.checkpoint.resume != "auto"
    if fresh:
        check_fresh_run_dir(run_dir)
    taken = rundir.acquire(run_dir)
    if fresh:
        check_fresh_run_dir(run_dir)  # a run that started meanwhile, now that nobody else can
    return taken


def check_fresh_run_dir(run_dir: Path) -> None:
    """A new run never writes into a directory that already holds another run's results (continuing
    one is `trainctl resume RUN_DIR` or `checkpoint.resume=auto`)."""
    if (run_dir / "summary.json").exists():
        raise ConfigError("hydra.run.dir", f"{run_dir} already holds a run (it has a summary.json)",
                          f"continue it with `trainctl resume {run_dir}` (or checkpoint.resume=auto), "
                          "or choose a new directory, e.g. hydra.run.dir=outputs/my-run-2")


def task(cfg: DictConfig) -> Any:
    """What Hydra runs for each job: validate, train, return the value of `optimized_metric` (for
    sweepers). In a sweep a failed job is recorded and returns a `FailedJob`, so the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    base_dir = get_original_cwd()
    overrides = list(HydraConfig.get().overrides.task)
    if HydraConfig.get().mode.name == "MULTIRUN":
        from trainctl.sweep import run_job

        return run_job(lambda: _train_job(cfg, run_dir, base_dir, overrides), run_dir)
    try:
        summary, metric = _train_job(cfg, run_dir, base_dir, overrides)
    except ConfigError as error:
        _discard_if_untouched(run_dir)
        report_config_error(error)
        raise SystemExit(EXIT_CONFIG) from None
    code = exit_code(summary)
    if code:
        raise SystemExit(code)
    from trainctl.runs import objective_value

    return objective_value(run_dir, metric)


def _train_job(cfg: DictConfig, run_dir: Path, base_dir: str, overrides: List[str]) -> Tuple[dict, str]:
    """Validate and train one job in ``run_dir``: (its summary, its optimized metric)."""
    spec, metric = load_run(cfg, base_dir)
    from trainctl import parallel

    parallel.check_launch(spec.parallelism)
    if parallel.should_self_launch(spec.parallelism):  # a sweep job of several processes: rank 0 owns the directory
        if spec.checkpoint.resume != "auto":
            check_fresh_run_dir(run_dir)
        return _launched_job(spec, run_dir, overrides), metric
    from trainctl.job import train

    taken = own_run_dir(run_dir, spec)
    try:
        dist = _DIST.pop("current", None)
        summary = train(spec, run_dir, base_dir, dist)
        if dist is not None:
            dist.close()
    finally:
        if taken:
            rundir.release(run_dir)
    return summary, metric


def _launched_job(spec: RunSpec, run_dir: Path, overrides: List[str]) -> dict:
    """Run one job as torchrun processes in ``run_dir`` and return the summary rank 0 wrote (or, when
    rank 0 died without writing one, the failure this process records)."""
    from trainctl import parallel
    from trainctl.resume import check_changes, find_resume_source

    par = spec.parallelism
    rundir.check_free(run_dir)  # the ranks' rank 0 takes the lock; refuse at once if another process has it
    source = find_resume_source(spec, run_dir)  # a checkpoint the ranks cannot use is refused here, once
    if source is not None:
        check_changes(source, spec, (par.nproc_per_node or 1) * par.nnodes)
    code = parallel.self_launch(par, overrides, str(run_dir))
    from trainctl.runs import RunRecord
    from trainctl.sweep import record_failure

    record = RunRecord.load(run_dir)
    if code != 0 and record.status in ("running", "unknown"):  # rank 0 died without writing its summary
        from trainctl.checkpoint import committed

        saved = committed(run_dir / "checkpoints")
        record_failure(run_dir, "failed", f"torchrun exited with code {code} before rank 0 recorded the end of "
                       f"the run (a process was killed or crashed); {run_dir / 'trainctl.log'} has its log",
                       steps=record.steps or 0, last_checkpoint=str(saved[-1]) if saved else None)
        record = RunRecord.load(run_dir)
    return record.summary or {"stop_reason": "failed", "best_metric": None, "error": f"torchrun exited with {code}"}


def run_single(overrides: Sequence[str], base_dir: str, config_name: str = CONFIG_NAME) -> None:
    """A plain `trainctl run KEY=VALUE...`: one composition, checked before anything is written, then the
    job runs exactly as `hydra.main` runs it (run directory, `.hydra/`, logging, callbacks).

    Composing once here, instead of once to check and once more inside `hydra.main`, keeps about half a
    second off every start-up. Flags, sweeps and other modes go through :func:`run_hydra`.
    """
    from hydra._internal.callbacks import Callbacks
    from hydra._internal.utils import run_and_report
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import run_job
    from hydra.types import HydraContext, RunMode
    from omegaconf import open_dict

    overrides = list(overrides)
    with _hydra():
        hydra = GlobalHydra.instance().hydra
        assert hydra is not None
        cfg = _checked(lambda: hydra.compose_config(config_name, overrides, run_mode=RunMode.RUN,
                                                    with_log_configuration=True), overrides, config_name)
        task_cfg = cfg.copy()
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        spec = load_run(task_cfg, base_dir)[0]
        try:
            run_dir: Optional[Path] = Path(base_dir, str(cfg.hydra.run.dir))
        except Exception:  # a directory naming runtime values; the task checks it once they exist
            run_dir = None
        if spec.checkpoint.resume != "auto" and run_dir is not None and "RANK" not in os.environ:
            check_fresh_run_dir(run_dir)
        if cfg.hydra.mode is None:
            cfg.hydra.mode = RunMode.RUN
        if _distributed(spec, overrides, run_dir, cfg, base_dir):
            return
        if run_dir is not None:  # own the directory before Hydra writes `.hydra/` and the log into it
            own_run_dir(run_dir, spec)
            cfg.hydra.run.dir = str(run_dir)  # the directory locked is the one the job writes

        def job() -> None:
            callbacks = Callbacks(cfg)
            callbacks.on_run_start(config=cfg, config_name=config_name)
            context = HydraContext(config_loader=hydra.config_loader, callbacks=callbacks)
            ret = run_job(hydra_context=context, task_function=task, config=cfg, job_dir_key="hydra.run.dir",
                          job_subdir_key=None, configure_logging=True)
            callbacks.on_run_end(config=cfg, config_name=config_name, job_return=ret)
            _ = ret.return_value  # raises what the task raised

        run_and_report(job)


def _distributed(spec: RunSpec, overrides: List[str], run_dir: Optional[Path], cfg: DictConfig, base_dir: str) -> bool:
    """Start torchrun for a self-launched run, or join the process group of a launched one.

    Returns True when this process's part is done (the launcher, or a rank other than 0, which trains
    without Hydra's job machinery). Rank 0 decides the run directory and goes on as a normal run.
    """
    from trainctl import parallel

    par = spec.parallelism
    parallel.check_launch(par)
    if parallel.should_self_launch(par):
        if run_dir is None:
            raise ConfigError("hydra.run.dir", "cannot be decided before the processes start",
                              "set hydra.run.dir=outputs/NAME")
        summary = _launched_job(spec, run_dir, overrides)
        code = exit_code(summary)
        if code:
            raise SystemExit(code)
        return True
    if par.name == "single":
        return False
    from trainctl.build import resolve_device

    dist = parallel.start(par, resolve_device(spec.trainer.device).type)
    if dist is None:
        return False
    problem = None  # rank 0's verdict on the directory, shared so that no rank is left waiting
    if dist.is_main:
        try:
            if run_dir is None:
                raise ConfigError("hydra.run.dir", "cannot be decided before the processes start",
                                  "set hydra.run.dir=outputs/NAME")
            own_run_dir(run_dir, spec)  # rank 0 owns the directory for the job
        except ConfigError as error:
            problem = (error.key, error.message, error.fix)
    decided, problem = dist.broadcast((str(run_dir), problem))
    if problem is not None:
        dist.close()
        raise ConfigError(*problem)
    if dist.is_main:
        cfg.hydra.run.dir = decided
        _DIST["current"] = dist
        return False
    from trainctl.job import train

    with parallel.quiet():
        summary = train(spec, Path(decided), base_dir, dist)
    dist.close()
    code = exit_code(summary)
    if code:
        raise SystemExit(code)
    return True


_DIST: dict = {}
"""Rank 0's process group, handed from :func:`run_single` to :func:`task` (Hydra calls the task)."""


def run_hydra(argv: Sequence[str]) -> None:
    """Hand a `trainctl run` command line to Hydra (sweeps, --cfg, --info, launchers, ...)."""
    import hydra

    from trainctl.sweep import FAILED_JOBS

    _register()
    main = hydra.main(config_path=str(CONF_DIR), config_name=CONFIG_NAME, version_base="1.3")(task)
    sys.argv = ["trainctl", *argv]
    try:
        main()
    except Exception as exc:  # Hydra re-raises what fails before a job starts (composing, a bad file)
        if os.environ.get("TRAINCTL_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise translate(exc, list(argv)) from None
    if FAILED_JOBS:  # every job of the sweep ran; say that some did not succeed
        raise SystemExit(EXIT_FAILED)
