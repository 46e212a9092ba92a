"""The checks of a `trainctl run` command line before Hydra starts anything: the whole config (one
composition, no torch import), a run directory that holds another run, and for a sweep (`-m`) every
value of every swept key, the plugins it names, Optuna's direction against the optimized metric and a
sweep directory that holds an earlier sweep. A typo anywhere stops the command with exit code 2 before
a directory is created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

from omegaconf import DictConfig

from trainctl.config import CONFIG_NAME, compose_hydra, compose_spec, translate
from trainctl.errors import ConfigError
from trainctl.launch import check_fresh_run_dir
from trainctl.runs import AUTO
from trainctl.spec import RunSpec, optimized_mode


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
    check_sweep(overrides, plain, base_dir, config_name)


def check_sweep(overrides: Sequence[str], plain: Sequence[str], base_dir: str, config_name: str) -> None:
    """Check a sweep's command line before any job starts: the plugins it names, every value of every swept
    key (with the sweeper's own `params`; a sampled interval by its two ends), Optuna's direction against
    the optimized metric, and that the sweep directory is new. ``plain``: the overrides that are not Hydra's."""
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
