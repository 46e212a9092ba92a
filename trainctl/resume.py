"""Continuing a run: rebuild a spec from a run directory's `config.yaml` (plus overrides), find the
checkpoint to continue from, and compare the saved spec with the new one.

A change that cannot work with the saved state (the model, the data, the optimizer or schedule
type) is refused with the list of offending keys; any other change (more epochs, evaluation or
logging cadence, a new learning rate) is allowed and listed in the log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from trainctl.checkpoint import Checkpoint, committed, find_source, newest_valid
from trainctl.errors import ConfigError, did_you_mean
from trainctl.files import SPEC_FILE_BYTES, CheckpointError, read_text_bounded
from trainctl.groups import GROUPS
from trainctl.spec import RunSpec, load_spec, spec_yaml

log = logging.getLogger("trainctl")

CHOSEN = [g for g in GROUPS.values() if g.options is not None and not g.many]
"""The groups whose option a saved spec names and a continued run keeps."""
ADDED_LATER = {"peft": {"name": "none"}, "averaging": {"name": "none"}}
"""Groups newer than some saved specs, and the option such a spec means (what the run did then)."""


def flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        flat: Dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _spec_dict(text: str) -> Dict[str, Any]:
    """A saved spec's keys and values, with the schema's defaults for keys added since it was written."""
    typed = _typed(parse_saved_spec(text, Path("spec.yaml")))
    return flatten(OmegaConf.to_container(typed, resolve=True, throw_on_missing=False))


def spec_changes(saved_yaml: str, spec: RunSpec, world_size: Tuple[int, int] = (1, 1)) -> Tuple[List[str], List[str]]:
    """(refused, allowed) changes between a checkpoint's spec and ``spec``, as 'key: old -> new' lines."""
    old, new = _spec_dict(saved_yaml), _spec_dict(spec_yaml(spec))
    refused, allowed = [], []
    for key in sorted(set(old) | set(new)):
        if key.startswith("checkpoint.resume") or old.get(key, "<unset>") == new.get(key, "<unset>"):
            continue
        line = f"{key}: {old.get(key, '<unset>')} -> {new.get(key, '<unset>')}"
        group = GROUPS.get(key.split(".", 1)[0])
        (refused if group is not None and group.refuses_change(key) else allowed).append(line)
    if world_size[0] != world_size[1]:
        refused.append(f"world size: {world_size[0]} -> {world_size[1]}")
    return refused, allowed


def check_changes(source: Checkpoint, spec: RunSpec, world_size: int = 1) -> List[str]:
    """Refuse unusable changes (ConfigError listing them); return the allowed ones."""
    saved_world = int(source.meta.get("world_size", 1))
    refused, allowed = spec_changes(source.spec_yaml, spec, (saved_world, world_size))
    if source.sharded != spec.parallelism.sharded:
        kinds = ("sharded (parallelism=fsdp)", "whole (parallelism=single or ddp)")
        saved_kind, kind = (kinds if source.sharded else kinds[::-1])
        refused.append(f"checkpoint format: {saved_kind} -> {kind}")
    if refused:
        fix = "drop those overrides, or start a new run (a new hydra.run.dir without checkpoint.resume)"
        if saved_world != world_size:
            fix = (f"continue with {saved_world} process(es): run the command that started it again with "
                   f"checkpoint.resume=auto hydra.run.dir=RUN_DIR (under torchrun --nproc_per_node={saved_world}, "
                   f"or with parallelism.nproc_per_node={saved_world})" if saved_world > 1 else
                   "continue it with one process (`trainctl resume RUN_DIR`)")
        raise ConfigError("checkpoint.resume", f"{source.path} cannot continue with these changes:\n    "
                          + "\n    ".join(refused), fix)
    return allowed


def restore_checkpoint(run: Any, state: Any, source: Checkpoint, changes: List[str]) -> None:
    """Load a checkpoint's weights and state into a freshly built run and ``state``. Anything that does
    not fit (a state saved for another model, a part missing or of the wrong kind) is a ConfigError,
    raised before anything in the run directory changes."""
    from trainctl.checkpointing import restore
    from trainctl.files import load_weights

    fresh = None
    try:
        if run.unfreezer is not None:  # the modules unfrozen by the saved epoch train again, in the same groups
            run.unfreezer.catch_up(run, int(source.state["run"]["epoch"]))
        if run.sharded:  # every rank reads its shard of the weights and optimizer state
            from trainctl.optim import optimizer_settings
            from trainctl.sharding import load_sharded

            fresh = optimizer_settings(run.optimizer)
            load_sharded(run.model, run.optimizer, source.path)
        else:
            load_weights(run.model, source.weights)
        restore(run, state, source.state, new_settings=any(
            line.startswith(("optimizer.", "regularization.")) for line in changes), fresh=fresh)
    except CheckpointError as exc:
        raise ConfigError("checkpoint.resume", str(exc), "resume with the model settings it was saved with") from None
    except Exception as exc:  # a part of state.pt that does not fit this run
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        raise ConfigError("checkpoint.resume", f"{source.path} does not fit this run: {detail}",
                          "resume from a checkpoint this run wrote, or start a new run") from None
    if run.checkpoints is not None:
        run.checkpoints.last = str(source.path)  # the state continues from it until the next save


def find_resume_source(spec: RunSpec, run_dir: Path) -> Optional[Checkpoint]:
    """The checkpoint a run continues from, per `checkpoint.resume` (None: start from scratch)."""
    resume = spec.checkpoint.resume
    try:
        if resume is None:
            return None
        if resume == "auto":
            found = newest_valid(run_dir / "checkpoints")
            if found is None and committed(run_dir / "checkpoints"):
                raise CheckpointError(f"none of the checkpoints in {run_dir / 'checkpoints'} is intact")
            return found
        return find_source(Path(resume))
    except CheckpointError as exc:
        raise ConfigError("checkpoint.resume", str(exc),
                          "point checkpoint.resume at another checkpoint, or start a new run") from None


# --- a spec from a run directory ---------------------------------------------------------------------

def _typed(saved: DictConfig) -> DictConfig:
    """Rebuild the typed config (each group node as its option's dataclass) from plain saved YAML; a value
    of the wrong type is a ConfigError naming its key."""
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.structured(RunSpec)
    try:
        for group in CHOSEN:
            node = saved.get(group.name)
            if group.name == "model" and "_target_" in node:
                cfg.model = node
                continue
            try:
                schema = group.spec_of(str(node.get("name")))
            except ConfigError as exc:
                raise ConfigError(f"{group.name}.name", f"the saved spec names {exc.message}") from None
            cfg[group.name] = OmegaConf.merge(OmegaConf.structured(schema), node)
        for group in (g for g in GROUPS.values() if g.many):
            for name, node in (saved.get(group.name) or {}).items():
                cfg[group.name][name] = OmegaConf.merge(OmegaConf.structured(group.spec_of(str(name))), node)
        done = {g.name for g in CHOSEN} | {g.name for g in GROUPS.values() if g.many}
        rest = {k: v for k, v in saved.items() if k not in done}
        return OmegaConf.merge(cfg, rest)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or None
        raise ConfigError(key, f"the saved spec does not fit: {str(exc).splitlines()[0]}",
                          "restore the file trainctl wrote") from None


def _keys(node: Any, prefix: str = "") -> List[str]:
    return list(flatten(OmegaConf.to_container(node), prefix))


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``key=value`` overrides on a rebuilt spec (options of a group cannot be switched here)."""
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or key.startswith(("+", "~")):
            raise ConfigError(None, f"cannot apply '{override}' to a saved run: use key=value",
                              "e.g. trainer.max_epochs=60")
        if key in {g.name for g in CHOSEN}:
            raise ConfigError(key, f"a continued run keeps its {key} option ({cfg[key].get('name', 'custom')})",
                              f"change fields instead (e.g. {key}.<field>=...) or start a new run")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))
        except ValidationError as exc:
            raise ConfigError(key, str(exc).splitlines()[0], "see `trainctl show` for the type") from None
        except ConfigKeyError:
            hits = did_you_mean(key, _keys(cfg))
            hint = f" Did you mean '{hits[0]}'?" if hits else ""
            raise ConfigError(key, f"no such key.{hint}", f"set {hits[0]}=..." if hits else None) from None
    return cfg


def parse_saved_spec(text: str, source: Path) -> DictConfig:
    """A saved spec's YAML as a config: plain values only (a `!!python/...` tag, or anything that is not
    a mapping of the run's groups, is a ConfigError naming the file)."""
    import yaml

    try:
        saved = OmegaConf.create(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(None, f"{source} is not a plain YAML spec{line}: {problem}",
                          "a saved spec holds plain values only: restore the file trainctl wrote") from None
    except ValueError as exc:
        raise ConfigError(None, f"{source} is not a YAML spec: {str(exc).splitlines()[0]}") from None
    if isinstance(saved, DictConfig):
        for group, default in ADDED_LATER.items():  # a spec written before the group existed
            if saved.get(group) is None:
                saved[group] = default
    if not isinstance(saved, DictConfig) or not all(isinstance(saved.get(g.name), DictConfig) for g in CHOSEN):
        raise ConfigError(None, f"{source} is not a trainctl run spec (it lacks the config groups)",
                          "restore the file trainctl wrote")
    return saved


def load_saved_spec(path: Path, overrides: Sequence[str], base_dir: str, text: Optional[str] = None) -> RunSpec:
    """The validated spec of a saved run (`config.yaml` or a checkpoint's `spec.yaml`, or its ``text``
    when already read) plus overrides."""
    if text is None:
        try:
            text = read_text_bounded(path, SPEC_FILE_BYTES)
        except OSError as exc:
            raise ConfigError(None, f"cannot read {path}: {exc.strerror or exc}") from None
    saved = parse_saved_spec(text, path)
    cfg = _typed(saved)
    cfg.checkpoint.resume = None  # where the saved run came from is history, not an instruction
    return load_spec(apply_overrides(cfg, overrides), base_dir)
