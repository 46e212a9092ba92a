"""The `scheduler` config group: learning-rate schedules.

Most schedules are pure functions ``factor(step)`` of the optimizer step (multiplying each group's
peak lr) wrapped in ``LambdaLR``, so resuming needs only the step. `onecycle` is torch's OneCycleLR;
`plateau` is ReduceLROnPlateau and steps on the monitored validation metric after each evaluation.
Schedules whose lengths are given in epochs convert them with the number of optimizer steps per epoch.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from omegaconf import MISSING

from trainctl.errors import ConfigError, check, check_choice
from trainctl.registry import Registry

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Horizon:
    """How long the run is, in optimizer steps."""

    total_steps: int
    steps_per_epoch: int

    @property
    def total_epochs(self) -> int:
        return -(-self.total_steps // self.steps_per_epoch)


@dataclass
class SchedulerSpec:
    name: str = MISSING
    """Schedule; the option picked with `scheduler=NAME`."""

    def validate(self, key: str = "scheduler") -> None:
        pass


@dataclass
class ConstantSpec(SchedulerSpec):
    """Constant learning rate after an optional linear warmup."""

    name: str = "constant"
    warmup_steps: int = 0
    """Linear warmup length in optimizer steps."""
    warmup_fraction: float = 0.0
    """Linear warmup length as a share of the run (instead of `warmup_steps`)."""

    def validate(self, key: str = "scheduler") -> None:
        check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0", f"set {key}.warmup_steps=0")
        check(0.0 <= self.warmup_fraction < 1.0, f"{key}.warmup_fraction", "must be in [0, 1)",
              f"set {key}.warmup_fraction=0.05")
        check(not (self.warmup_steps and self.warmup_fraction), f"{key}.warmup_steps",
              "set either warmup_steps or warmup_fraction, not both", f"set {key}.warmup_fraction=0")

    def warmup(self, horizon: Horizon) -> int:
        return self.warmup_steps or int(self.warmup_fraction * horizon.total_steps)


@dataclass
class _UnitSpec(ConstantSpec):
    unit: str = "epoch"
    """Unit of `step_size`/`milestones`/the decay interval: epoch or step."""

    def validate(self, key: str = "scheduler") -> None:
        super().validate(key)
        check_choice(self.unit, ("epoch", "step"), f"{key}.unit")

    def steps(self, n: int, horizon: Horizon) -> int:
        return n * horizon.steps_per_epoch if self.unit == "epoch" else n


@dataclass
class StepSpec(_UnitSpec):
    """Multiply the lr by `gamma` every `step_size` epochs (or steps)."""

    name: str = "step"
    step_size: int = 10
    gamma: float = 0.1

    def validate(self, key: str = "scheduler") -> None:
        super().validate(key)
        check(self.step_size >= 1, f"{key}.step_size", "must be >= 1", f"set {key}.step_size=10")
        check(self.gamma > 0, f"{key}.gamma", "must be > 0", f"set {key}.gamma=0.1")


@dataclass
class MultiStepSpec(_UnitSpec):
    """Multiply the lr by `gamma` at each milestone (epochs or steps)."""

    name: str = "multistep"
    milestones: List[int] = field(default_factory=lambda: [15, 25])
    gamma: float = 0.1

    def validate(self, key: str = "scheduler") -> None:
        super().validate(key)
        check(list(self.milestones) == sorted(self.milestones) and all(m >= 0 for m in self.milestones),
              f"{key}.milestones", "must be increasing and >= 0", f"set {key}.milestones=[15,25]")
        check(self.gamma > 0, f"{key}.gamma", "must be > 0", f"set {key}.gamma=0.1")


@dataclass
class ExponentialSpec(_UnitSpec):
    """Multiply the lr by `gamma` every epoch (or step)."""

    name: str = "exponential"
    gamma: float = 0.9

    def validate(self, key: str = "scheduler") -> None:
        super().validate(key)
        check(0 < self.gamma <= 1, f"{key}.gamma", "must be in (0, 1]", f"set {key}.gamma=0.9")


@dataclass
class CosineSpec(ConstantSpec):
    """Cosine decay from the peak lr to `min_lr_ratio` x peak at the end of the run."""

    name: str = "cosine"
    min_lr_ratio: float = 0.0
    """Final lr as a share of the peak."""

    def validate(self, key: str = "scheduler") -> None:
        super().validate(key)
        check(0.0 <= self.min_lr_ratio <= 1.0, f"{key}.min_lr_ratio", "must be in [0, 1]",
              f"set {key}.min_lr_ratio=0.0")


@dataclass
class WarmupCosineSpec(CosineSpec):
    """Linear warmup, then cosine decay."""

    name: str = "warmup_cosine"
    warmup_fraction: float = 0.05


@dataclass
class CosineRestartsSpec(CosineSpec):
    """SGDR: cosine cycles restarting at the peak; each cycle `cycle_mult` x longer."""

    name: str = "cosine_restarts"
    cycle_steps: int = 0
    """Length of the first cycle in optimizer steps."""
    cycle_fraction: float = 0.25
    """Length of the first cycle as a share of the run (used when cycle_steps is 0)."""
    cycle_mult: float = 1.0
    """Growth factor of the cycle length (T_mult)."""
    cycle_decay: float = 1.0
    """Factor applied to the peak at each restart."""

    def validate(self, key: str = "scheduler") -> None:
        super().validate(key)
        check(self.cycle_steps >= 0, f"{key}.cycle_steps", "must be >= 0", f"set {key}.cycle_steps=0")
        check(self.cycle_steps > 0 or 0 < self.cycle_fraction <= 1, f"{key}.cycle_fraction",
              "must be in (0, 1] when cycle_steps is 0", f"set {key}.cycle_fraction=0.25")
        check(self.cycle_mult >= 1, f"{key}.cycle_mult", "must be >= 1", f"set {key}.cycle_mult=2")
        check(0 < self.cycle_decay <= 1, f"{key}.cycle_decay", "must be in (0, 1]", f"set {key}.cycle_decay=1")


@dataclass
class LinearSpec(CosineSpec):
    """Linear warmup, then linear decay to `min_lr_ratio` x peak."""

    name: str = "linear"
    warmup_fraction: float = 0.05


@dataclass
class InverseSqrtSpec(ConstantSpec):
    """Linear warmup, then lr x sqrt(timescale / (steps after warmup + timescale))."""

    name: str = "inverse_sqrt"
    warmup_fraction: float = 0.05
    timescale: int = 0
    """Steps over which the decay halves the lr ~1.4x; 0 uses the warmup length (at least 1)."""


@dataclass
class WSDSpec(CosineSpec):
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM; Hägele et al. 2024): warmup, a constant plateau,
    then a decay over the last steps, factor 1 - shape((step - decay start) / decay length)."""

    name: str = "wsd"
    warmup_fraction: float = 0.05
    decay_steps: int = 0
    """Length of the final decay in optimizer steps."""
    decay_fraction: float = 0.2
    """Length of the final decay as a share of the run (used when decay_steps is 0)."""
    decay_shape: str = "linear"
    """linear, cosine or sqrt (1 - sqrt)."""

    def validate(self, key: str = "scheduler") -> None:
        super().validate(key)
        check(self.decay_steps >= 0, f"{key}.decay_steps", "must be >= 0", f"set {key}.decay_steps=0")
        check(self.decay_steps > 0 or 0 < self.decay_fraction <= 1, f"{key}.decay_fraction",
              "must be in (0, 1] when decay_steps is 0", f"set {key}.decay_fraction=0.2")
        check_choice(self.decay_shape, ("linear", "cosine", "sqrt"), f"{key}.decay_shape")


@dataclass
class OneCycleSpec(SchedulerSpec):
    """torch's OneCycleLR: warm up to the peak, then anneal far below the starting lr."""

    name: str = "onecycle"
    pct_start: float = 0.3
    """Share of the run spent increasing the lr."""
    anneal_strategy: str = "cos"
    """cos or linear."""
    div_factor: float = 25.0
    """Starting lr = peak / div_factor."""
    final_div_factor: float = 1e4
    """Final lr = starting lr / final_div_factor."""
    cycle_momentum: bool = True
    """Cycle momentum (or Adam's beta1) inversely to the lr."""
    base_momentum: float = 0.85
    max_momentum: float = 0.95

    def validate(self, key: str = "scheduler") -> None:
        check(0 < self.pct_start < 1, f"{key}.pct_start", "must be in (0, 1)", f"set {key}.pct_start=0.3")
        check_choice(self.anneal_strategy, ("cos", "linear"), f"{key}.anneal_strategy")
        check(self.div_factor > 0 and self.final_div_factor > 0, f"{key}.div_factor",
              "div_factor and final_div_factor must be > 0", f"set {key}.div_factor=25")


@dataclass
class PlateauSpec(SchedulerSpec):
    """Multiply the lr by `factor` when the monitored validation metric stops improving."""

    name: str = "plateau"
    monitor: str = "val/loss"
    """Validation metric to watch (e.g. val/loss, val/acc)."""
    mode: str = "min"
    """min or max: which direction is an improvement."""
    factor: float = 0.1
    patience: int = 2
    """Evaluations without improvement before the lr is reduced."""
    threshold: float = 1e-4
    cooldown: int = 0
    min_lr: float = 0.0

    def validate(self, key: str = "scheduler") -> None:
        check_choice(self.mode, ("min", "max"), f"{key}.mode")
        check(0 < self.factor < 1, f"{key}.factor", "must be in (0, 1)", f"set {key}.factor=0.1")
        check(self.patience >= 0, f"{key}.patience", "must be >= 0", f"set {key}.patience=2")


# --- factor functions: step -> multiplier of the peak lr ------------------------------------------


def _warm(spec: ConstantSpec, step: int, horizon: Horizon, then: Callable[[int, int], float]) -> float:
    """Linear warmup over the first W steps, then ``then(t, T)`` with t steps after warmup out of T."""
    warmup = spec.warmup(horizon)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return then(step - warmup, max(1, horizon.total_steps - warmup))


def _cos(t: float, period: float, floor: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, period) / period))


def _constant(spec: ConstantSpec, step: int, horizon: Horizon) -> float:
    return _warm(spec, step, horizon, lambda t, T: 1.0)


def _step(spec: StepSpec, step: int, horizon: Horizon) -> float:
    size = max(1, spec.steps(spec.step_size, horizon))
    return _warm(spec, step, horizon, lambda t, T: spec.gamma ** (step // size))


def _multistep(spec: MultiStepSpec, step: int, horizon: Horizon) -> float:
    marks = [spec.steps(m, horizon) for m in spec.milestones]
    return _warm(spec, step, horizon, lambda t, T: spec.gamma ** bisect.bisect_right(marks, step))


def _exponential(spec: ExponentialSpec, step: int, horizon: Horizon) -> float:
    unit = max(1, spec.steps(1, horizon))
    return _warm(spec, step, horizon, lambda t, T: spec.gamma ** (step // unit))


def _cosine(spec: CosineSpec, step: int, horizon: Horizon) -> float:
    return _warm(spec, step, horizon, lambda t, T: _cos(t, T, spec.min_lr_ratio))


def _linear(spec: LinearSpec, step: int, horizon: Horizon) -> float:
    return _warm(spec, step, horizon, lambda t, T: 1 - (1 - spec.min_lr_ratio) * min(t, T) / T)


def _restarts(spec: CosineRestartsSpec, step: int, horizon: Horizon) -> float:
    def cycle(t: int, total: int) -> float:
        length = spec.cycle_steps or max(1, int(spec.cycle_fraction * total))
        peak = 1.0
        while t >= length:
            t -= length
            length = max(1, int(round(length * spec.cycle_mult)))
            peak *= spec.cycle_decay
        return peak * _cos(t, length, spec.min_lr_ratio)
    return _warm(spec, step, horizon, cycle)


def _inverse_sqrt(spec: InverseSqrtSpec, step: int, horizon: Horizon) -> float:
    scale = spec.timescale or max(1, spec.warmup(horizon))
    return _warm(spec, step, horizon, lambda t, T: math.sqrt(scale / (t + scale)))


def _wsd(spec: WSDSpec, step: int, horizon: Horizon) -> float:
    def after_warmup(t: int, total: int) -> float:
        decay = min(total, spec.decay_steps or max(1, int(spec.decay_fraction * horizon.total_steps)))
        into = t - (total - decay)
        if into < 0:
            return 1.0
        progress = min(1.0, into / decay)  # (step - decay start) / decay length, as published
        shape = {"linear": progress, "sqrt": math.sqrt(progress),
                 "cosine": 0.5 * (1 - math.cos(math.pi * progress))}[spec.decay_shape]
        return 1 - (1 - spec.min_lr_ratio) * shape
    return _warm(spec, step, horizon, after_warmup)


# --- torch schedulers behind one interface --------------------------------------------------------


class Schedule:
    """What the loop sees: ``step()`` after each optimizer step, ``on_eval(metrics)`` after each evaluation."""

    def __init__(self, scheduler: Any, monitor: Optional[str] = None) -> None:
        self.scheduler = scheduler
        self.monitor = monitor

    def step(self) -> None:
        if self.monitor is None:
            self.scheduler.step()

    def on_eval(self, metrics: Dict[str, float]) -> None:
        if self.monitor is not None:
            self.scheduler.step(metrics[self.monitor])

    def state_dict(self) -> Dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the saved state, except the run's length: a resumed run that was made longer
        follows the schedule of its new length (OneCycleLR keeps its length in its state)."""
        length = {k: v for k, v in vars(self.scheduler).items() if k in ("total_steps", "_schedule_phases")}
        self.scheduler.load_state_dict(state)
        vars(self.scheduler).update(length)


def _onecycle(spec: OneCycleSpec, optimizer: "torch.optim.Optimizer", horizon: Horizon) -> Schedule:
    from torch.optim.lr_scheduler import OneCycleLR

    if spec.cycle_momentum and not any(k in optimizer.defaults for k in ("momentum", "betas")):
        raise ConfigError("scheduler.cycle_momentum", f"{type(optimizer).__name__} has no momentum to cycle",
                          "set scheduler.cycle_momentum=false")
    return Schedule(OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=horizon.total_steps,
        pct_start=spec.pct_start, anneal_strategy=spec.anneal_strategy, div_factor=spec.div_factor,
        final_div_factor=spec.final_div_factor, cycle_momentum=spec.cycle_momentum,
        base_momentum=spec.base_momentum, max_momentum=spec.max_momentum))


def _plateau(spec: PlateauSpec, optimizer: "torch.optim.Optimizer", horizon: Horizon) -> Schedule:
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    return Schedule(ReduceLROnPlateau(optimizer, mode=spec.mode, factor=spec.factor, patience=spec.patience,
                                      threshold=spec.threshold, cooldown=spec.cooldown, min_lr=spec.min_lr),
                    monitor=spec.monitor)


@dataclass(frozen=True)
class SchedInfo:
    spec: type
    factor: Optional[Callable[[Any, int, Horizon], float]] = None
    """Pure step -> lr multiplier (LambdaLR family)."""
    build: Optional[Callable[[Any, Any, Horizon], Schedule]] = None
    """Builds a stateful torch scheduler instead."""
    monitors: bool = False
    """Steps on a validation metric (needs evaluation)."""


SCHEDULERS: Registry[SchedInfo] = Registry("scheduler")
SCHEDULERS.add("constant", SchedInfo(ConstantSpec, _constant))
SCHEDULERS.add("step", SchedInfo(StepSpec, _step))
SCHEDULERS.add("multistep", SchedInfo(MultiStepSpec, _multistep))
SCHEDULERS.add("exponential", SchedInfo(ExponentialSpec, _exponential))
SCHEDULERS.add("cosine", SchedInfo(CosineSpec, _cosine))
SCHEDULERS.add("warmup_cosine", SchedInfo(WarmupCosineSpec, _cosine))
SCHEDULERS.add("cosine_restarts", SchedInfo(CosineRestartsSpec, _restarts))
SCHEDULERS.add("linear", SchedInfo(LinearSpec, _linear))
SCHEDULERS.add("inverse_sqrt", SchedInfo(InverseSqrtSpec, _inverse_sqrt))
SCHEDULERS.add("wsd", SchedInfo(WSDSpec, _wsd))
SCHEDULERS.add("onecycle", SchedInfo(OneCycleSpec, build=_onecycle))
SCHEDULERS.add("plateau", SchedInfo(PlateauSpec, build=_plateau, monitors=True))


def lr_factor(spec: SchedulerSpec, step: int, horizon: Horizon) -> float:
    """The multiplier of the peak lr used for optimizer step ``step`` (0-based)."""
    return SCHEDULERS.get(spec.name).factor(spec, step, horizon)


def build_scheduler(spec: SchedulerSpec, optimizer: "torch.optim.Optimizer", horizon: Horizon) -> Schedule:
    info = SCHEDULERS.get(spec.name)
    if info.build is not None:
        return info.build(spec, optimizer, horizon)
    from torch.optim.lr_scheduler import LambdaLR

    return Schedule(LambdaLR(optimizer, lambda step: info.factor(spec, step, horizon)))
