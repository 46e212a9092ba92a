"""RunSpec: the typed, validated description of one run, plus the Hydra ConfigStore entries behind it.

The schema of every group option is registered as `schema/<group>/<option>` (generated from the
group registries), and each `conf/<group>/<option>.yaml` starts from it, so a misspelt key fails
while Hydra composes. :func:`load_spec` converts a composed config into a RunSpec and runs every
check exactly once: each group's own `validate()`, then the checks that span groups.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from trainctl import data as data_mod
from trainctl.callbacks import EarlyStoppingSpec
from trainctl.checkpoint import CheckpointSpec
from trainctl.data import DataSpec
from trainctl.errors import ConfigError, check, check_choice
from trainctl.loss import LOSSES, LossSpec, loss_problem
from trainctl.metrics import MODE_OF, VAL_METRICS, default_monitor
from trainctl.model import MODELS, is_custom, task_compatible, validate_model
from trainctl.optim import OPTIMIZERS, OptimizerSpec
from trainctl.parallel import SPECS as PARALLELISM_SPECS
from trainctl.parallel import ParallelismSpec
from trainctl.performance import PerformanceSpec
from trainctl.precision import PRECISIONS, PrecisionSpec
from trainctl.regularization import RegularizationSpec
from trainctl.schedule import SCHEDULERS, SchedulerSpec
from trainctl.targets import normalize_prefixes

DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class TrainerSpec:
    """How long to train, how often to evaluate, and where."""

    max_epochs: Optional[int] = 30
    """Passes over the training set; null trains until `trainer.max_steps`."""
    max_steps: Optional[int] = None
    """Optimizer steps; stops at whichever of max_epochs / max_steps comes first."""
    seed: int = 0
    """Seed of python, numpy and torch (model initialisation, dropout)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step (effective batch = batch_size x this)."""
    eval_every_n_epochs: Optional[int] = 1
    """Evaluate on the validation split every N epochs; null disables."""
    eval_every_n_steps: Optional[int] = None
    """Also evaluate every N optimizer steps; null disables."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps."""
    monitor: str = "auto"
    """Validation metric that defines the best result (auto: val/acc for classification, val/loss otherwise)."""
    mode: str = "auto"
    """min or max for `trainer.monitor` (auto: max for accuracy/F1, min for losses and errors)."""
    on_nonfinite: str = "stop"
    """A non-finite loss or gradient norm: stop (end the run as diverged; no checkpoint is written from
    that state) or skip (drop that optimizer step; costs one host sync per step)."""
    max_consecutive_skips: int = 10
    """With on_nonfinite=skip: stop as diverged after this many skipped steps in a row."""

    def validate(self, key: str = "trainer") -> None:
        check(self.max_epochs is not None or self.max_steps is not None, f"{key}.max_epochs",
              "max_epochs and max_steps are both null, so the run would never end", f"set {key}.max_epochs=30")
        check(self.max_epochs is None or self.max_epochs >= 1, f"{key}.max_epochs",
              f"must be >= 1 (got {self.max_epochs})", f"set {key}.max_epochs=30")
        check(self.max_steps is None or self.max_steps >= 1, f"{key}.max_steps",
              f"must be >= 1 or null (got {self.max_steps})", f"set {key}.max_steps=null")
        check(self.grad_accum_steps >= 1, f"{key}.grad_accum_steps",
              f"must be >= 1 (got {self.grad_accum_steps})", f"set {key}.grad_accum_steps=1")
        for name in ("eval_every_n_epochs", "eval_every_n_steps"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{key}.{name}", "must be >= 1 or null", f"set {key}.{name}=null")
        check(self.device.split(":")[0] in DEVICES, f"{key}.device",
              f"'{self.device}' is not one of {', '.join(DEVICES)} (or cuda:N)", f"set {key}.device=auto")
        check_choice(self.mode, ("auto", "min", "max"), f"{key}.mode")
        check_choice(self.on_nonfinite, ("stop", "skip"), f"{key}.on_nonfinite")
        check(self.max_consecutive_skips >= 1, f"{key}.max_consecutive_skips", "must be >= 1",
              f"set {key}.max_consecutive_skips=10")


@dataclass
class LoggingSpec:
    """What is reported, where, and how often."""

    log_every_n_steps: int = 10
    """Optimizer steps between training-loss readings (each reading is one host sync)."""
    progress: str = "auto"
    """auto (a live bar on a terminal, plain lines otherwise), bar, plain or none."""
    tensorboard: bool = True
    """Write TensorBoard event files under `tb/` in the run directory."""

    def validate(self, key: str = "logging") -> None:
        check(self.log_every_n_steps >= 1, f"{key}.log_every_n_steps", "must be >= 1",
              f"set {key}.log_every_n_steps=10")
        check_choice(self.progress, ("auto", "bar", "plain", "none"), f"{key}.progress")


@dataclass
class RunSpec:
    """One run: a field per config group plus run-level settings."""

    model: Any = MISSING
    """Network: mlp, cnn, gpt, or custom (a `_target_` class)."""
    data: DataSpec = MISSING
    optimizer: OptimizerSpec = MISSING
    scheduler: SchedulerSpec = MISSING
    regularization: RegularizationSpec = field(default_factory=RegularizationSpec)
    precision: PrecisionSpec = MISSING
    performance: PerformanceSpec = field(default_factory=PerformanceSpec)
    parallelism: ParallelismSpec = field(default_factory=ParallelismSpec)
    loss: LossSpec = MISSING
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    logging: LoggingSpec = field(default_factory=LoggingSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    early_stopping: EarlyStoppingSpec = field(default_factory=EarlyStoppingSpec)
    allowed_target_prefixes: List[str] = field(default_factory=list)
    """Module prefixes (besides trainctl. and torch.nn.) that `_target_` entries may import from; the
    classes they name must still be nn.Module subclasses defined under one of these prefixes."""

    def resolve_paths(self, base_dir: str) -> None:
        self.data.resolve_paths(base_dir)
        self.checkpoint.resolve_paths(base_dir)

    def validate(self) -> None:
        """Every group's own checks, then the checks that involve more than one group."""
        check_finite(self)
        for key, registry in (("data", data_mod.DATASETS), ("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS),
                              ("precision", PRECISIONS), ("loss", LOSSES)):
            _check_option(key, getattr(self, key), registry)
        if not is_custom(self.model):
            _check_option("model", self.model, MODELS)
        normalize_prefixes(self.allowed_target_prefixes)
        validate_model(self.model, self.allowed_target_prefixes)
        for key in ("data", "optimizer", "scheduler", "regularization", "precision", "performance", "parallelism",
                    "loss", "trainer", "logging", "checkpoint", "early_stopping"):
            getattr(self, key).validate(key)
        self._validate_across_groups()

    def _validate_across_groups(self) -> None:
        task, input_rank = data_mod.probe(self.data)
        problem = task_compatible(self.model, task, input_rank)
        if problem:
            fits = [n for n, e in MODELS.items() if task in e.tasks and (e.input_rank in (None, input_rank))]
            raise ConfigError("model", f"{problem} (data={self.data.name})", f"set model={' or model='.join(fits)}")
        check(not self.performance.channels_last or input_rank == 3, "performance.channels_last",
              f"channels_last is a memory format for image batches (C, H, W), and data={self.data.name} has none",
              "set performance.channels_last=false")
        error = loss_problem(self.loss, task, self.regularization.label_smoothing)
        if error:
            raise error
        monitor = self.monitor(task)
        check(monitor in VAL_METRICS[task], "trainer.monitor",
              f"'{monitor}' is not reported for {task} data; choose from {', '.join(VAL_METRICS[task])}",
              f"set trainer.monitor={VAL_METRICS[task][0]}")
        evaluates = self.trainer.eval_every_n_epochs or self.trainer.eval_every_n_steps
        for key, node in (("checkpoint", self.checkpoint), ("early_stopping", self.early_stopping)):
            check(node.monitor == "auto" or node.monitor in VAL_METRICS[task], f"{key}.monitor",
                  f"'{node.monitor}' is not reported for {task} data; choose from {', '.join(VAL_METRICS[task])}",
                  f"set {key}.monitor=auto")
        check(not (self.parallelism.sharded and self.early_stopping.restore_best_weights),
              "early_stopping.restore_best_weights", "is not available with parallelism=fsdp (the weights are "
              "sharded across the processes)", "set early_stopping.restore_best_weights=false and use the "
              "checkpoint checkpoints/best (`trainctl eval RUN_DIR/checkpoints/best`)")
        check(not self.early_stopping.enabled or bool(evaluates), "early_stopping.patience",
              "early stopping counts evaluations, but evaluation is off", "set trainer.eval_every_n_epochs=1")
        if SCHEDULERS.get(self.scheduler.name).monitors:
            check(self.scheduler.monitor in VAL_METRICS[task], "scheduler.monitor",
                  f"'{self.scheduler.monitor}' is not reported for {task} data; "
                  f"choose from {', '.join(VAL_METRICS[task])}", "set scheduler.monitor=val/loss")
            check(bool(evaluates), "scheduler", "scheduler=plateau steps on validation results, "
                  "but evaluation is off", "set trainer.eval_every_n_epochs=1")

    def monitor(self, task: str, node: Any = None) -> str:
        """The metric that defines "best" for ``node`` (trainer, checkpoint or early_stopping)."""
        node = node or self.trainer
        if node.monitor != "auto":
            return node.monitor
        return default_monitor(task)[0] if node is self.trainer else self.monitor(task)

    def monitor_mode(self, task: str, node: Any = None) -> str:
        node = node or self.trainer
        if node.mode != "auto":
            return node.mode
        if node is not self.trainer and node.monitor == "auto":
            return self.monitor_mode(task)
        return MODE_OF.get(self.monitor(task, node).split("/")[-1], "min")


def check_finite(node: Any, key: str = "", fix: str = "") -> None:
    """Every float setting must be a finite number: none of them gives `inf` or `nan` a meaning. The
    arguments of a custom model (`model=custom`) are the user's own and are left alone."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            default = f.default if f.default is not dataclasses.MISSING else None
            child = f"{key}.{f.name}" if key else f.name
            check_finite(getattr(node, f.name), child, f"set {child}={default}" if isinstance(default, float) else "")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(key, f"must be a finite number (got {node})", fix or f"set {key} to a finite number")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            check_finite(value, f"{key}[{i}]", fix or f"set {key}=[...] with finite numbers")
    elif isinstance(node, (dict, DictConfig)) and key != "model":
        for name, value in node.items():
            check_finite(value, f"{key}.{name}", fix)


def _check_option(key: str, spec: Any, registry: Any) -> None:
    entry = registry.get(spec.name)
    if type(spec) is not entry.spec:
        raise ConfigError(f"{key}.name", "the option is chosen with the group, not its name field",
                          f"set {key}={spec.name} (and leave {key}.name alone)")


def unknown_keys(cfg: DictConfig, prefix: str = "") -> List[str]:
    """Keys added to typed nodes (Hydra's `+key=value` can do that) that their dataclass lacks."""
    found = []
    node_type = OmegaConf.get_type(cfg)
    if dataclasses.is_dataclass(node_type):
        fields = {f.name for f in dataclasses.fields(node_type)}
        found += [f"{prefix}{k}" for k in cfg.keys() if k not in fields]
    for key in cfg.keys():
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            found += unknown_keys(child, f"{prefix}{key}.")
    return found


def load_spec(cfg: DictConfig, base_dir: str) -> RunSpec:
    """Composed config -> validated RunSpec; user paths are made absolute against ``base_dir``."""
    extra = unknown_keys(cfg)
    if extra:
        raise ConfigError(extra[0], "no such key", "run `trainctl show` to list the keys")
    try:
        spec = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        key = exc.full_key or "?"
        raise ConfigError(key, "is required and has no value", f"set {key}=VALUE") from None
    assert isinstance(spec, RunSpec)
    spec.resolve_paths(base_dir)
    spec.validate()
    return spec


def spec_yaml(spec: RunSpec) -> str:
    """The resolved spec as plain YAML (no Python tags), as written to `config.yaml`."""
    return OmegaConf.to_yaml(OmegaConf.structured(spec))


def total_optimizer_steps(spec: RunSpec, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps of the run)."""
    per_epoch = max(1, math.ceil(batches_per_epoch / spec.trainer.grad_accum_steps))
    limits = []
    if spec.trainer.max_epochs is not None:
        limits.append(per_epoch * spec.trainer.max_epochs)
    if spec.trainer.max_steps is not None:
        limits.append(spec.trainer.max_steps)
    return per_epoch, min(limits)


# --- Hydra wiring -----------------------------------------------------------------------------------

CONF_DIR = Path(str(importlib.resources.files("trainctl.conf")))
RECIPES_DIR = Path(str(importlib.resources.files("trainctl.recipes")))
_registered = False


def register_configs() -> None:
    """Put the schemas and the recipes into Hydra's ConfigStore (once per process)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="run_spec", node=RunSpec)
    for group, registry in (("model", MODELS), ("data", data_mod.DATASETS), ("optimizer", OPTIMIZERS),
                            ("scheduler", SCHEDULERS), ("precision", PRECISIONS), ("loss", LOSSES)):
        for name, entry in registry.items():
            store.store(group=f"schema/{group}", name=name, node=entry.spec)
    for name, schema in PARALLELISM_SPECS.items():
        store.store(group="schema/parallelism", name=name, node=schema)
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=_load_recipe(path), package="_global_")
    _registered = True


def _load_recipe(path: Path) -> DictConfig:
    import yaml

    try:
        node = OmegaConf.load(path)
    except (yaml.YAMLError, ValueError, OSError) as exc:
        raise ConfigError("recipe", f"{path} cannot be read as a config: {str(exc).splitlines()[0]}",
                          "recipes hold plain YAML values only: fix or remove that file") from None
    if not isinstance(node, DictConfig):
        raise ConfigError("recipe", f"{path} is not a mapping of config keys", "fix or remove that file")
    return node


def recipe_headers() -> dict[str, str]:
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
