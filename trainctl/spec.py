"""RunSpec: the typed, validated description of one run (a field per config group, see
:mod:`trainctl.groups`), and `TrainConfig`, the root of `trainctl run`'s composed config (the run spec
plus what a sweep optimises). :func:`load_spec` converts a composed config into a RunSpec and runs every
check exactly once: each group's own `validate()`, then the checks that span groups.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from trainctl import data as data_mod
from trainctl.callbacks import EarlyStoppingSpec
from trainctl.checkpoint import CheckpointSpec
from trainctl.data import DataSpec
from trainctl.errors import ConfigError, check
from trainctl.groups import CONF_DIR, GROUPS, RECIPES_DIR, Group  # noqa: F401 (the config files' places)
from trainctl.loss import LossSpec, loss_problem
from trainctl.metrics import MODE_OF, VAL_METRICS, LoggingSpec, default_monitor
from trainctl.adapters import PeftSpec
from trainctl.averaging_specs import AveragingSpec, averaging_problem
from trainctl.model import MODELS, absolute_path, is_custom, task_compatible, validate_model
from trainctl.optim import OptimizerSpec
from trainctl.parallel import ParallelismSpec
from trainctl.performance import PerformanceSpec
from trainctl.precision import PrecisionSpec
from trainctl.regularization import RegularizationSpec
from trainctl.runs import AUTO, metric_mode, parse_optimized_metric
from trainctl.schedule import SCHEDULERS, SchedulerSpec
from trainctl.targets import normalize_prefixes
from trainctl.trainer import TrainerSpec
from trainctl.transforms import TRANSFORMS


@dataclass
class RunSpec:
    """One run: a field per config group plus run-level settings."""

    model: Any = MISSING
    """Network: mlp, cnn, gpt, hf, or custom (a `_target_` class)."""
    peft: PeftSpec = MISSING
    """What trains: none (everything), freeze, lora, dora or qlora."""
    data: DataSpec = MISSING
    optimizer: OptimizerSpec = MISSING
    scheduler: SchedulerSpec = MISSING
    regularization: RegularizationSpec = field(default_factory=RegularizationSpec)
    averaging: AveragingSpec = field(default_factory=AveragingSpec)
    """Weight averaging: none, ema or swa."""
    precision: PrecisionSpec = MISSING
    performance: PerformanceSpec = field(default_factory=PerformanceSpec)
    parallelism: ParallelismSpec = field(default_factory=ParallelismSpec)
    loss: LossSpec = MISSING
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    logging: LoggingSpec = field(default_factory=LoggingSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    early_stopping: EarlyStoppingSpec = field(default_factory=EarlyStoppingSpec)
    callbacks: Dict[str, Any] = field(default_factory=dict)
    """Extra callbacks by name (`callbacks=[lr_monitor]`), each with its settings."""
    transforms: Dict[str, Any] = field(default_factory=dict)
    """Batch transforms by name, applied in this order (`transforms=[noise]`), each with its settings."""
    allowed_target_prefixes: List[str] = field(default_factory=list)
    """Module prefixes (besides trainctl. and torch.nn.) that `_target_` entries may import from; the
    classes they name must still be nn.Module subclasses defined under one of these prefixes."""

    def resolve_paths(self, base_dir: str) -> None:
        if self.data.name == "custom":  # its factory obeys the same prefixes as model targets
            object.__setattr__(self.data, "_allowed_prefixes", list(self.allowed_target_prefixes))
        self.data.resolve_paths(base_dir)
        self.checkpoint.resolve_paths(base_dir)
        if not is_custom(self.model):
            self.model.resolve_paths(base_dir)
        elif isinstance(self.model.get("init_from"), str) and self.model["init_from"].strip():
            self.model["init_from"] = absolute_path(self.model["init_from"], base_dir)

    def validate(self) -> None:
        """Every group's own checks, then the checks that involve more than one group."""
        check_finite(self)
        normalize_prefixes(self.allowed_target_prefixes)
        for group in GROUPS.values():
            _validate_group(group, getattr(self, group.name), self.allowed_target_prefixes)
        self._validate_across_groups()

    def _validate_across_groups(self) -> None:
        task, input_rank = data_mod.probe(self.data)
        for name in self.transforms:
            check(task in TRANSFORMS.get(name).tasks, f"transforms.{name}", f"applies to "
                  f"{' or '.join(TRANSFORMS.get(name).tasks)} data, not {task}", "drop it from transforms=[...]")
            check(not getattr(self.transforms[name], "cutmix_alpha", 0) or input_rank == 3,
                  f"transforms.{name}.cutmix_alpha", f"CutMix pastes boxes of images (C, H, W), and "
                  f"data={self.data.name} has none", "use transforms=[mixup] (with cutmix_alpha=0)")
        tokens = data_mod.token_ids(self.data)
        problem = task_compatible(self.model, task, input_rank, tokens)
        if problem:
            fits = [n for n, e in MODELS.items() if task in e.tasks and (e.input_rank in (None, input_rank))
                    and e.tokens == tokens]
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
        self._validate_peft()
        self._validate_step_methods()
        error = averaging_problem(self)
        if error:
            raise error
        if SCHEDULERS.get(self.scheduler.name).monitors:
            check(self.scheduler.monitor in VAL_METRICS[task], "scheduler.monitor",
                  f"'{self.scheduler.monitor}' is not reported for {task} data; "
                  f"choose from {', '.join(VAL_METRICS[task])}", "set scheduler.monitor=val/loss")
            check(bool(evaluates), "scheduler", "scheduler=plateau steps on validation results, "
                  "but evaluation is off", "set trainer.eval_every_n_epochs=1")

    def _validate_step_methods(self) -> None:
        """SAM and optimizers that re-evaluate the loss (L-BFGS), refused where they cannot be exact."""
        from trainctl.optim import check_closure_fits

        reg, fp16 = self.regularization, self.precision.name == "fp16"
        check(reg.sam_rho is None or not fp16, "regularization.sam_rho", "SAM takes a second forward/backward "
              "pass, which fp16's loss scaler cannot unscale twice in one step", "set precision=bf16 (or fp32)")
        methods = [name for name, on in (("SAM", reg.sam_rho is not None), ("AGC", reg.agc_clipping is not None),
                                         ("the l1/l2 penalty", bool(reg.l1 or reg.l2))) if on]
        check_closure_fits(self.optimizer.name, fp16=fp16, wrappers=methods,
                           clipping=reg.max_grad_norm is not None or reg.clip_value is not None,
                           processes=1 if self.parallelism.name == "single" else 2,
                           unfreezes=bool(getattr(self.peft, "unfreeze_at", None)))

    def _validate_peft(self) -> None:
        """Combinations of the `peft` group that cannot work, refused with the reason."""
        peft, parallel = self.peft, self.parallelism.name
        if getattr(peft, "unfreeze_at", None):
            check(parallel == "single", "peft.unfreeze_at", f"gradual unfreezing is not available with "
                  f"parallelism={parallel}: {parallel.upper()} fixes the trained parameters when it wraps the model",
                  "train with one process, or list those modules in peft.trainable from the start")
            check(self.scheduler.name != "onecycle", "peft.unfreeze_at", "scheduler=onecycle keeps one "
                  "learning-rate cycle per parameter group, set up before training; groups added by "
                  "unfreezing have none", "use scheduler=warmup_cosine (or another schedule)")
        if peft.name == "qlora":
            check(parallel != "fsdp", "peft", "peft=qlora cannot be combined with parallelism=fsdp: FSDP "
                  "cannot shard bitsandbytes' 4-bit weights", "use parallelism=ddp, or peft=lora with fsdp")
            check(self.precision.name != "bf16_true", "precision", "peft=qlora keeps its base in 4 bits; "
                  "precision=bf16_true would convert what is left to bf16 before quantising",
                  "use precision=bf16 (the 4-bit layers then compute in bf16)")
        if peft.name != "none" and is_custom(self.model) and getattr(peft, "adapters", False):
            check(peft.target_modules is not None, "peft.target_modules", "a custom model has no default "
                  "layers for adapters", "name them: peft.target_modules=[fc1,fc2] (or a regular expression)")

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



def _validate_group(group: Group, node: Any, allowed_prefixes: List[str]) -> None:
    if group.name == "model":
        if not is_custom(node):
            _check_option("model", node, group.spec_of(node.name))
        validate_model(node, allowed_prefixes)
    elif group.many:
        for name, settings in node.items():
            _check_option(f"{group.name}.{name}", settings, group.spec_of(name), by_name=False)
            settings.validate(f"{group.name}.{name}")
    else:
        if group.options is not None:
            _check_option(group.name, node, group.spec_of(node.name))
        node.validate(group.name)


def _check_option(key: str, spec: Any, schema: type, by_name: bool = True) -> None:
    if type(spec) is schema:
        return
    if by_name:
        raise ConfigError(f"{key}.name", "the option is chosen with the group, not its name field",
                          f"set {key.split('.')[0]}={spec.name} (and leave {key}.name alone)")
    group, name = key.split(".", 1)
    raise ConfigError(key, f"settings of {name} need its option file: pick it with {group}=[{name}]",
                      f"set {group}=[{name}] (or add it to the list)")


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
    except InterpolationResolutionError as exc:  # e.g. data.tokenizer=${model.path} with a model that has none
        key = exc.full_key or "?"
        raise ConfigError(key, f"cannot be resolved: {str(exc).splitlines()[0]}",
                          f"set {key} to a value (the key it refers to does not exist here)") from None
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



# --- the composed config of `trainctl run` ------------------------------------------------------------

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
    spec = RunSpec(**{f.name: getattr(config, f.name) for f in dataclasses.fields(RunSpec)})
    check_optimized_metric(metric, spec)
    return spec, metric


def check_optimized_metric(metric: str, spec: RunSpec) -> None:
    name = parse_optimized_metric(metric)[0]
    if name == AUTO:
        return
    task = data_mod.probe(spec.data)[0]
    reported = list(VAL_METRICS[task]) + ["train/loss"]
    if name not in reported or (name == "train/loss" and not metric.startswith("final:")):
        valid = list(VAL_METRICS[task]) + ["final:train/loss"]
        raise ConfigError("optimized_metric", f"'{metric}' is not reported for {task} data; choose auto, "
                          f"{', '.join(valid)} (or final:METRIC for the value at the end)",
                          f"set optimized_metric={VAL_METRICS[task][0]}")


def optimized_mode(metric: str, spec: RunSpec) -> str:
    """max or min: which way the optimized metric is better."""
    name = parse_optimized_metric(metric)[0]
    return spec.monitor_mode(data_mod.probe(spec.data)[0]) if name == AUTO else metric_mode(name)
