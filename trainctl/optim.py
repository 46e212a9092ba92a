"""The `optimizer` config group: a registry of optimizers from torch.optim and pytorch-optimizer.

Each option is a spec dataclass (:mod:`trainctl.optim_specs`) whose fields are the optimizer's own
keyword arguments. Weight decay comes per parameter group from the regularization group; this module
adds per-name learning-rate multipliers and, for Muon, the hidden-matrix split (L-BFGS: one group).
Checkpointed optimizer state is handled in :mod:`trainctl.optim_state`.
"""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from trainctl.errors import ConfigError, check
from trainctl.optim_state import (RUNNING_GROUP_KEYS, check_optimizer_state,  # noqa: F401 (re-exported)
                                  load_optimizer_state, optimizer_settings)
from trainctl.optim_specs import (AdafactorSpec, AdagradSpec, AdamSpec, AdamWSpec, AdEMAMixSpec,  # noqa: F401
                                  LambSpec, LARSSpec, LBFGSSpec, LionSpec, MuonSpec, OptimizerSpec, ProdigySpec,
                                  RMSpropSpec, ScheduleFreeAdamWSpec, SGDSpec, ShampooSpec, SOAPSpec)
from trainctl.registry import Registry

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class OptimInfo:
    spec: type
    target: str
    """`module:Class` of the optimizer; imported only when it is built."""
    train_eval: bool = False
    """The optimizer has train()/eval() modes that must follow the model's (schedule-free)."""
    split: Optional[Callable[[Any, List[dict]], List[dict]]] = None
    """Re-splits the parameter groups before construction (Muon's matrix/non-matrix groups)."""
    closure: bool = False
    """``step(closure)`` re-evaluates the loss and gradients several times per step (L-BFGS)."""


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


def _one_group(spec: LBFGSSpec, groups: List[dict]) -> List[dict]:
    decayed = [g for g in groups if g["weight_decay"]]
    if decayed:
        raise ConfigError("regularization.weight_decay", f"optimizer={spec.name} has no weight decay "
                          f"(got {decayed[0]['weight_decay']})", "set regularization.weight_decay=0")
    return [{"names": [n for g in groups for n in g["names"]], "params": [p for g in groups for p in g["params"]],
             "lr_scale": 1.0}]


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
OPTIMIZERS.add("shampoo", OptimInfo(ShampooSpec, "pytorch_optimizer:Shampoo"))
OPTIMIZERS.add("soap", OptimInfo(SOAPSpec, "pytorch_optimizer:SOAP"))
OPTIMIZERS.add("prodigy", OptimInfo(ProdigySpec, "pytorch_optimizer:Prodigy"))
OPTIMIZERS.add("ademamix", OptimInfo(AdEMAMixSpec, "pytorch_optimizer:AdEMAMix"))
OPTIMIZERS.add("lbfgs", OptimInfo(LBFGSSpec, "torch.optim:LBFGS", split=_one_group, closure=True))


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


def takes_closure(optimizer: Any) -> bool:
    """Whether the built optimizer's step re-evaluates the loss through a closure (L-BFGS)."""
    return type(optimizer).__name__ in _CLOSURE_CLASSES


_CLOSURE_CLASSES = frozenset(info.target.rpartition(":")[2] for _, info in OPTIMIZERS.items() if info.closure)


def check_closure_fits(optimizer: str, *, fp16: bool, clipping: bool, wrappers: List[str], processes: int,
                       unfreezes: bool) -> None:
    """An optimizer that re-evaluates the loss within its step gets plain gradients of the window's loss at
    every evaluation, so nothing may change the first one alone, and every process must take the same
    iterations. Raises ConfigError naming what does not fit."""
    if not OPTIMIZERS.get(optimizer).closure:
        return
    why = f"optimizer={optimizer} re-evaluates the loss and gradients several times per step"
    check(not fp16, "precision", f"{why}; fp16's loss scaler unscales a step's gradients once",
          "set precision=bf16 (or fp32)")
    check(not clipping, "regularization.max_grad_norm", f"{why}; only the first gradient would be clipped",
          "set regularization.max_grad_norm=null regularization.clip_value=null")
    check(not wrappers, "optimizer", f"{why}; {', '.join(wrappers)} would change only the first gradient",
          f"turn {', '.join(wrappers)} off, or pick another optimizer")
    check(processes == 1, "parallelism", f"{why}; its iteration count depends on each process's own loss, so "
          "processes would fall out of step", "train with one process (parallelism=single)")
    check(not unfreezes, "peft.unfreeze_at", f"{why} over one fixed parameter group; unfrozen modules "
          "would not be trained", "list those modules in peft.trainable from the start")


def step_closure(run: Any, window_loss: "torch.Tensor", terms: int, forward_backward: Callable[[], "torch.Tensor"]
                 ) -> Optional[Callable[[], "torch.Tensor"]]:
    """For an optimizer that re-evaluates the loss within its step (L-BFGS): a closure returning the
    window's mean loss with its gradients in ``p.grad``; None for the others. Its first evaluation is at
    the weights the window's forward/backward just used, so it returns ``window_loss / terms`` and keeps
    those gradients; later ones zero the gradients and run ``forward_backward()`` (the window's loss sum)
    at the optimizer's trial weights."""
    optimizer = run.optimizer
    if not takes_closure(optimizer):
        return None
    check_closure_fits(run.spec.optimizer.name, fp16=run.precision.scales_loss, clipping=run.clipper.active,
                       wrappers=[w.name for w in run.step_wrappers], processes=run.world_size,
                       unfreezes=run.unfreezer is not None)
    evaluations = [window_loss]

    def closure() -> "torch.Tensor":
        if evaluations:
            return evaluations.pop() / terms
        optimizer.zero_grad(set_to_none=True)
        return forward_backward() / terms
    return closure

