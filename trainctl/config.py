"""Hydra composition and error translation: the ConfigStore entries behind `conf/` (the schema of every
group option, from :mod:`trainctl.groups`, and the recipes), composing overrides into a validated run
spec, and turning Hydra/OmegaConf errors into one clear :class:`ConfigError` with the key and the fix.

Nothing here imports torch: a typo is reported in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from omegaconf import DictConfig

from trainctl.errors import ConfigError, did_you_mean, suggestion
from trainctl.groups import CONF_DIR, GROUPS, RECIPES_DIR
from trainctl.spec import RunSpec, TrainConfig, load_spec, split, unknown_keys

CONFIG_NAME = "train"
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
_registered = False


def register() -> None:
    """Put the root schema, every group option's schema and the recipes into Hydra's ConfigStore (once
    per process)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="train_config", node=TrainConfig)
    for group in GROUPS.values():
        for name in group.options.names() if group.options is not None else ():
            store.store(group=f"schema/{group.name}", name=name, node=group.spec_of(name))
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=_load_recipe(path), package="_global_")
    _registered = True


def _load_recipe(path: Path) -> DictConfig:
    import yaml
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.load(path)
    except (yaml.YAMLError, ValueError, OSError) as exc:
        raise ConfigError("recipe", f"{path} cannot be read as a config: {str(exc).splitlines()[0]}",
                          "recipes hold plain YAML values only: fix or remove that file") from None
    if not isinstance(node, DictConfig):
        raise ConfigError("recipe", f"{path} is not a mapping of config keys", "fix or remove that file")
    return node


def recipe_headers() -> Dict[str, str]:
    """Recipe name -> its header comment (what it trains, the command, the result)."""
    headers = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        lines = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            lines.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
        headers[path.stem] = "\n".join(l for l in lines if not l.startswith("@package")).strip()
    return headers


def missing_plugin(group: str, option: str) -> Optional[ConfigError]:
    package = PLUGINS.get((group, option))
    if package is None:
        return None
    return ConfigError(group, f"'{option}' comes from the Hydra plugin {package}, which is not installed",
                       f"{SWEEP_EXTRA} (or pip install {package})")


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Hydra initialised on trainctl's `conf/` (with its schemas and recipes) for the block."""
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="trainctl"):
        yield


def _compose(overrides: Sequence[str], config_name: str = CONFIG_NAME) -> DictConfig:
    from hydra import compose

    return compose(config_name, overrides=list(overrides))


def compose_for_run(overrides: Sequence[str], config_name: str = CONFIG_NAME) -> DictConfig:
    """The whole config of a plain `trainctl run`, `hydra` node included, as `hydra.main` composes it
    (inside :func:`session`); problems are ConfigErrors."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    hydra = GlobalHydra.instance().hydra
    assert hydra is not None
    cfg = _checked(lambda: hydra.compose_config(config_name, list(overrides), run_mode=RunMode.RUN,
                                                with_log_configuration=True), overrides, config_name)
    if cfg.hydra.mode is None:
        cfg.hydra.mode = RunMode.RUN
    return cfg


def without_hydra(cfg: DictConfig) -> DictConfig:
    """The task's part of a composed config (what Hydra hands the task function)."""
    from omegaconf import open_dict

    task_cfg = cfg.copy()
    with open_dict(task_cfg):
        del task_cfg["hydra"]
    return task_cfg


def run_dir_of(cfg: DictConfig, base_dir: str) -> Optional[Path]:
    """The run directory a composed config names, or None when it depends on values that exist only
    once the job runs."""
    try:
        return Path(base_dir, str(cfg.hydra.run.dir))
    except Exception:  # Hydra's runtime interpolations
        return None


def compose_spec(overrides: Sequence[str], base_dir: str, config_name: str = CONFIG_NAME) -> Tuple[DictConfig, RunSpec]:
    """Compose and validate; any problem is raised as a ConfigError naming the key and the fix."""
    with session():
        cfg = _checked(lambda: _compose(overrides, config_name), overrides, config_name)
        return cfg, load_run(cfg, base_dir)[0]


def load_run(cfg: DictConfig, base_dir: str) -> Tuple[RunSpec, str]:
    """(validated run spec, optimized metric) of a composed `trainctl run` config."""
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
    missing = re.search(r"Could not (?:find|load) '([^']+)'", text)
    if missing and "/" in missing.group(1) and (isinstance(exc, MissingConfigException) or "Could not load" in text):
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


def compose_hydra(overrides: Sequence[str], config_name: str = CONFIG_NAME) -> DictConfig:
    """The `hydra` node as a sweep of ``overrides`` will see it (a launcher or sweeper whose plugin is
    missing fails here)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    with session():
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
