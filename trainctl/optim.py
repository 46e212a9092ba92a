"""The `optimizer` config group: a registry of optimizers from torch.optim and pytorch-optimizer.

Each option is a spec dataclass whose fields (besides `name`, `lr`, `lr_multipliers`) are the
optimizer's own keyword arguments. Weight decay comes per parameter group from the regularization
group; this module adds per-name learning-rate multipliers and, for Muon, the hidden-matrix split.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from omegaconf import MISSING

from trainctl.errors import ConfigError, check
from trainctl.registry import Registry

if TYPE_CHECKING:
    import torch


@dataclass
class OptimizerSpec:
    """Fields every optimizer shares."""

    name: str = MISSING
    """Optimizer; the option picked with `optimizer=NAME`."""
    lr: float = 1e-3
    """Peak learning rate (the scheduler scales it)."""
    lr_multipliers: Dict[str, float] = field(default_factory=dict)
    """Learning-rate factor per parameter-name pattern, first match wins, e.g. {'head.*': 10.0}."""

    NOT_KWARGS = ("name", "lr", "lr_multipliers")

    def kwargs(self) -> Dict[str, Any]:
        """The optimizer constructor's keyword arguments held by this spec."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in self.NOT_KWARGS}

    def validate(self, key: str = "optimizer") -> None:
        check(self.lr > 0, f"{key}.lr", f"must be > 0 (got {self.lr})", f"set {key}.lr=1e-3")
        for pattern, factor in self.lr_multipliers.items():
            check(factor >= 0, f"{key}.lr_multipliers", f"factor for '{pattern}' must be >= 0 (got {factor})")
        for name in ("betas", "adamw_betas"):
            betas = getattr(self, name, None)
            if betas is not None:
                check(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), f"{key}.{name}",
                      f"needs two values in [0, 1) (got {list(betas)})", f"set {key}.{name}=[0.9,0.999]")
        for name in ("momentum", "eps", "alpha", "dampening"):
            value = getattr(self, name, None)
            if isinstance(value, (int, float)):
                check(value >= 0, f"{key}.{name}", f"must be >= 0 (got {value})", f"set {key}.{name}=0")


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass
class SGDSpec(OptimizerSpec):
    """Stochastic gradient descent with (Nesterov) momentum."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    """Momentum factor; 0 is plain SGD."""
    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0 and dampening 0)."""
    dampening: float = 0.0
    """Dampening of the momentum update."""

    def validate(self, key: str = "optimizer") -> None:
        super().validate(key)
        check(not self.nesterov or (self.momentum > 0 and self.dampening == 0), f"{key}.nesterov",
              "Nesterov momentum needs momentum > 0 and dampening 0", f"set {key}.momentum=0.9 {key}.dampening=0")


@dataclass
class AdagradSpec(OptimizerSpec):
    """Adagrad: per-coordinate steps shrinking with the accumulated squared gradients."""

    name: str = "adagrad"
    lr: float = 0.01
    lr_decay: float = 0.0
    """Learning-rate decay per step."""
    eps: float = 1e-10
    initial_accumulator_value: float = 0.0


@dataclass
class RMSpropSpec(OptimizerSpec):
    """RMSprop: steps scaled by a moving average of squared gradients."""

    name: str = "rmsprop"
    lr: float = 1e-3
    alpha: float = 0.99
    """Smoothing constant of the squared-gradient average."""
    eps: float = 1e-8
    momentum: float = 0.0
    centered: bool = False
    """Normalise by the gradient's estimated variance instead of its second moment."""


@dataclass
class AdamSpec(OptimizerSpec):
    """Adam (weight decay, if any, is added to the gradient as an L2 penalty)."""

    name: str = "adam"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """Decay rates of the first and second moment estimates."""
    eps: float = 1e-8
    amsgrad: bool = False
    """Use the maximum of past second moments (AMSGrad)."""


@dataclass
class AdamWSpec(AdamSpec):
    """AdamW: Adam with decoupled weight decay."""

    name: str = "adamw"


@dataclass
class LionSpec(OptimizerSpec):
    """Lion: sign-of-momentum updates (use a 3-10x smaller lr than AdamW)."""

    name: str = "lion"
    lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    """Interpolation (beta1) and momentum (beta2) factors."""


@dataclass
class LambSpec(OptimizerSpec):
    """LAMB: Adam with a layer-wise trust ratio, for large batches."""

    name: str = "lamb"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6


@dataclass
class LARSSpec(OptimizerSpec):
    """LARS: SGD with momentum and a layer-wise trust ratio, for large batches."""

    name: str = "lars"
    lr: float = 0.1
    momentum: float = 0.9
    trust_coefficient: float = 1e-3
    """Scale of the layer-wise trust ratio."""
    nesterov: bool = False
    dampening: float = 0.0


@dataclass
class MuonSpec(OptimizerSpec):
    """Muon: orthogonalised momentum for hidden weight matrices; AdamW for everything else."""

    name: str = "muon"
    lr: float = 0.02
    """Learning rate of the Muon (hidden matrix) groups."""
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    """Newton-Schulz iterations per step."""
    adamw_lr: float = 3e-4
    """Learning rate of the AdamW groups (embeddings, head, biases, norms)."""
    adamw_betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    adamw_eps: float = 1e-10
    adamw_patterns: List[str] = field(default_factory=lambda: ["*embed*", "head.*", "head"])
    """Parameter-name patterns kept on AdamW even when they are matrices."""

    NOT_KWARGS = OptimizerSpec.NOT_KWARGS + ("adamw_patterns",)

    def validate(self, key: str = "optimizer") -> None:
        super().validate(key)
        check(self.adamw_lr > 0, f"{key}.adamw_lr", "must be > 0", f"set {key}.adamw_lr=3e-4")
        check(self.ns_steps >= 1, f"{key}.ns_steps", "must be >= 1", f"set {key}.ns_steps=5")


@dataclass
class AdafactorSpec(OptimizerSpec):
    """Adafactor: factored second moments, memory-light (torch.optim.Adafactor)."""

    name: str = "adafactor"
    lr: float = 1e-2
    beta2_decay: float = -0.8
    """Exponent of the second-moment decay schedule."""
    eps: List[Optional[float]] = field(default_factory=lambda: [None, 1e-3])
    """(epsilon1, epsilon2): null epsilon1 picks one from the dtype."""
    d: float = 1.0
    """Clipping threshold of the update's RMS."""

    def validate(self, key: str = "optimizer") -> None:
        super().validate(key)
        check(self.d >= 1, f"{key}.d", f"must be >= 1 (got {self.d})", f"set {key}.d=1.0")
        check(self.beta2_decay <= 0, f"{key}.beta2_decay", f"must be <= 0 (got {self.beta2_decay})",
              f"set {key}.beta2_decay=-0.8")


@dataclass
class ScheduleFreeAdamWSpec(OptimizerSpec):
    """Schedule-free AdamW: iterate averaging instead of a decay schedule (use scheduler=constant)."""

    name: str = "schedulefree_adamw"
    lr: float = 2.5e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    """The optimizer's own linear warmup."""


@dataclass(frozen=True)
class OptimInfo:
    spec: type
    target: str
    """`module:Class` of the optimizer; imported only when it is built."""
    train_eval: bool = False
    """The optimizer has train()/eval() modes that must follow the model's (schedule-free)."""
    split: Optional[Callable[[Any, List[dict]], List[dict]]] = None
    """Re-splits the parameter groups before construction (Muon's matrix/non-matrix groups)."""


def _split_muon(spec: MuonSpec, groups: List[dict]) -> List[dict]:
    out = []
    for group in groups:
        for use_muon in (True, False):
            pairs = [(n, p) for n, p in zip(group["names"], group["params"])
                     if (p.ndim >= 2 and not any(fnmatch.fnmatchcase(n, pat) for pat in spec.adamw_patterns))
                     == use_muon]
            if pairs:
                out.append({**group, "names": [n for n, _ in pairs], "params": [p for _, p in pairs],
                            "use_muon": use_muon, "base_lr": spec.lr if use_muon else spec.adamw_lr})
    return out


OPTIMIZERS: Registry[OptimInfo] = Registry("optimizer")
OPTIMIZERS.add("sgd", OptimInfo(SGDSpec, "torch.optim:SGD"))
OPTIMIZERS.add("adagrad", OptimInfo(AdagradSpec, "torch.optim:Adagrad"))
OPTIMIZERS.add("rmsprop", OptimInfo(RMSpropSpec, "torch.optim:RMSprop"))
OPTIMIZERS.add("adam", OptimInfo(AdamSpec, "torch.optim:Adam"))
OPTIMIZERS.add("adamw", OptimInfo(AdamWSpec, "torch.optim:AdamW"))
OPTIMIZERS.add("adafactor", OptimInfo(AdafactorSpec, "torch.optim:Adafactor"))
OPTIMIZERS.add("lion", OptimInfo(LionSpec, "pytorch_optimizer:Lion"))
OPTIMIZERS.add("lamb", OptimInfo(LambSpec, "pytorch_optimizer:Lamb"))
OPTIMIZERS.add("lars", OptimInfo(LARSSpec, "pytorch_optimizer:LARS"))
OPTIMIZERS.add("muon", OptimInfo(MuonSpec, "pytorch_optimizer:Muon", split=_split_muon))
OPTIMIZERS.add("schedulefree_adamw", OptimInfo(ScheduleFreeAdamWSpec, "pytorch_optimizer:ScheduleFreeAdamW",
                                               train_eval=True))


def _import(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def split_by_lr_multiplier(groups: List[dict], multipliers: Dict[str, float], strict: bool = True) -> List[dict]:
    """Split each group by the first `optimizer.lr_multipliers` pattern its parameter names match
    (``strict``: a pattern that matches no parameter is an error)."""
    if not multipliers:
        return [{**g, "lr_scale": 1.0} for g in groups]
    used = set()
    out = []
    for group in groups:
        by_scale: Dict[float, dict] = {}
        for name, param in zip(group["names"], group["params"]):
            pattern = next((p for p in multipliers if fnmatch.fnmatchcase(name, p)), None)
            used.add(pattern)
            scale = 1.0 if pattern is None else float(multipliers[pattern])
            target = by_scale.setdefault(scale, {**group, "names": [], "params": [], "lr_scale": scale})
            target["names"].append(name)
            target["params"].append(param)
        out.extend(by_scale.values())
    unused = [p for p in multipliers if p not in used]
    if unused and strict:
        examples = ", ".join(n for g in groups for n in g["names"][:3])
        raise ConfigError("optimizer.lr_multipliers", f"pattern '{unused[0]}' matches no parameter "
                          f"(names look like: {examples})", "fix the pattern (shell-style, e.g. 'head.*')")
    return out


def optimizer_groups(spec: OptimizerSpec, groups: List[dict], strict: bool = True) -> List[dict]:
    """The optimizer's parameter groups (learning rate set, names dropped) from regularization's groups.
    ``strict=False`` for a subset of the model's parameters (parameters unfrozen during a run)."""
    info = OPTIMIZERS.get(spec.name)
    groups = split_by_lr_multiplier(groups, spec.lr_multipliers, strict)
    if info.split is not None:
        groups = info.split(spec, groups)
    final = []
    for group in groups:
        group = dict(group)
        group["lr"] = group.pop("base_lr", spec.lr) * group.pop("lr_scale")
        group.pop("names")
        final.append(group)
    return final


def build_optimizer(spec: OptimizerSpec, groups: List[dict], all_names: Optional[List[str]] = None
                    ) -> "torch.optim.Optimizer":
    """``groups`` are dicts with ``params``, ``names`` and ``weight_decay`` (from regularization).
    ``all_names``: every parameter name of the model, frozen ones included (a pattern of
    `optimizer.lr_multipliers` may name parameters that are unfrozen later)."""
    info = OPTIMIZERS.get(spec.name)
    if all_names is not None:
        split_by_lr_multiplier([{"names": all_names, "params": all_names}], spec.lr_multipliers)
    final = optimizer_groups(spec, groups, strict=all_names is None)
    cls = _import(info.target)
    try:
        return cls(final, lr=spec.lr, **spec.kwargs())
    except (ValueError, TypeError) as exc:  # a combination of settings the optimizer itself refuses
        raise ConfigError("optimizer", f"{cls.__name__} refused its settings: {exc}",
                          "change the optimizer.* value it names (`trainctl show` lists them)") from None


def has_train_eval_modes(spec: OptimizerSpec) -> bool:
    return OPTIMIZERS.get(spec.name).train_eval


RUNNING_GROUP_KEYS = frozenset({"lr", "train_mode", "weight_sum", "lr_max", "k", "step"})
"""Param-group entries that are running state (schedule-free averaging, step counters), not settings."""


def optimizer_settings(optimizer: "torch.optim.Optimizer") -> List[Dict[str, Any]]:
    """The hyperparameters of every parameter group (everything but the parameters)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def check_optimizer_state(optimizer: "torch.optim.Optimizer") -> None:
    """Every state tensor of a parameter must have the parameter's shape, or a factored one (each
    dimension equal or 1, as Adafactor keeps); a state saved for another model raises ValueError here
    instead of failing at the first step."""
    import torch

    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor) or value.ndim == 0:
                    continue
                if value.ndim != param.ndim or any(a not in (b, 1) for a, b in zip(value.shape, param.shape)):
                    raise ValueError(f"the optimizer state '{key}' has shape {tuple(value.shape)} for a parameter "
                                     f"of shape {tuple(param.shape)}")


def load_optimizer_state(optimizer: "torch.optim.Optimizer", scheduler: Any, saved_optimizer: Optional[Dict[str, Any]],
                         saved_scheduler: Dict[str, Any], new_settings: bool = False,
                         fresh: Optional[List[Dict[str, Any]]] = None) -> None:
    """Restore optimizer and schedule state from a checkpoint (exactly). With ``new_settings`` (the
    optimizer or regularization settings were changed for the resumed run), the current spec's
    hyperparameters replace the saved ones: a changed peak lr scales the current (scheduled) lr, and
    other settings (betas, momentum, weight decay) apply from the next step.

    ``saved_optimizer`` None: the optimizer state is loaded already (a sharded checkpoint), and
    ``fresh`` holds the settings it had before."""
    fresh = fresh or optimizer_settings(optimizer)
    if saved_optimizer is not None:
        optimizer.load_state_dict(saved_optimizer)
    check_optimizer_state(optimizer)
    scheduler.load_state_dict(saved_scheduler)
    if not new_settings:
        return
    for group, new in zip(optimizer.param_groups, fresh):
        old_peak, new_peak = group.get("initial_lr", group["lr"]), new.get("initial_lr", new["lr"])
        if old_peak != new_peak and old_peak:
            group["lr"] = group["lr"] * new_peak / old_peak
        for key, value in new.items():
            if key not in RUNNING_GROUP_KEYS:
                group[key] = value
    inner = getattr(scheduler, "scheduler", scheduler)
    if hasattr(inner, "base_lrs"):
        inner.base_lrs = [new.get("initial_lr", new["lr"]) for new in fresh]
