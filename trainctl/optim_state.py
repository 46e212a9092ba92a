"""Optimizer state across a checkpoint: the settings of the parameter groups, the check that a loaded
state fits the model's parameters, and restoring state and schedule (exactly, or with new settings).

Most optimizers keep state tensors of their parameter's shape (or a factored one, as Adafactor keeps).
Shampoo and SOAP keep preconditioner matrices (one per dimension) and L-BFGS keeps flat vectors over
all parameters; each of these has a rule here giving the shape a fresh state of that kind has. Torch-free
at import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    import torch

RUNNING_GROUP_KEYS = frozenset({"lr", "train_mode", "weight_sum", "lr_max", "k", "step",
                                "d", "d_max", "d_hat", "d_numerator", "d_de_nom"})
"""Param-group entries that are running state (schedule-free averaging, step counters, Prodigy's step-size
estimate), not settings. Adafactor's `d` is a setting (its clipping threshold): a new value applies."""

Shape = Tuple[int, ...]


def _shampoo(optimizer: Any, group: dict, param: "torch.Tensor", key: str) -> Optional[Shape]:
    """`pre_cond_I` / `inv_pre_cond_I`: a square matrix as wide as the parameter's dimension I."""
    if not key.startswith(("pre_cond_", "inv_pre_cond_")):
        return None
    dim = int(key.rpartition("_")[2])
    side = param.shape[dim] if dim < param.ndim else -1
    return (side, side)


def _soap(optimizer: Any, group: dict, param: "torch.Tensor", key: str) -> Optional[Shape]:
    """`GG.I` / `Q.I`: statistics and eigenbasis of dimension I (dimensions merged with `merge_dims`;
    1-D parameters only with `precondition_1d`)."""
    name, _, index = key.partition(".")
    if name not in ("GG", "Q") or not index:
        return None
    import torch

    shape = param.shape
    if param.ndim > 1 and group["merge_dims"]:
        shape = optimizer.merge_dims(torch.empty(param.shape, device="meta"), group["max_precondition_dim"]).shape
    elif param.ndim == 1 and not group["precondition_1d"]:
        shape = (0,)
    sides = [d if 0 < d <= group["max_precondition_dim"] else 0 for d in shape]
    side = sides[int(index)] if int(index) < len(sides) else -1
    return (side, side)


def _lbfgs(optimizer: Any, group: dict, param: "torch.Tensor", key: str) -> Optional[Shape]:
    """Directions, steps and the previous gradient: flat vectors over every parameter of the group."""
    return (sum(p.numel() for p in group["params"]),)


STATE_SHAPES: Dict[str, Callable[[Any, dict, Any, str], Optional[Shape]]] = {
    "Shampoo": _shampoo, "SOAP": _soap, "LBFGS": _lbfgs}
"""Optimizer class name -> the shape a state entry must have (None: the parameter's shape, or factored)."""


def optimizer_settings(optimizer: "torch.optim.Optimizer") -> List[Dict[str, Any]]:
    """The hyperparameters of every parameter group (everything but the parameters)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _tensors(key: str, value: Any) -> List[Tuple[str, Any]]:
    """The state tensors under ``key``; a list of them (SOAP, L-BFGS) as ``key.I``."""
    if isinstance(value, (list, tuple)):
        return [(f"{key}.{i}", v) for i, v in enumerate(value)]
    return [(key, value)]


def check_optimizer_state(optimizer: "torch.optim.Optimizer") -> None:
    """Every state tensor must have the shape a fresh state of its kind has: the parameter's shape, or a
    factored one (each dimension equal or 1, as Adafactor keeps), or the one its optimizer's rule in
    :data:`STATE_SHAPES` gives. A state saved for another model raises ValueError here instead of failing
    (or silently broadcasting) at the first step."""
    import torch

    rule = STATE_SHAPES.get(type(optimizer).__name__)
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in (pair for k, v in optimizer.state.get(param, {}).items() for pair in _tensors(k, v)):
                if not isinstance(value, torch.Tensor) or value.ndim == 0:
                    continue
                expected = rule(optimizer, group, param, key) if rule is not None else None
                if expected is not None:
                    fits = tuple(value.shape) == expected
                else:
                    fits = value.ndim == param.ndim and all(a in (b, 1) for a, b in zip(value.shape, param.shape))
                if not fits:
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
    running = RUNNING_GROUP_KEYS - {"d"} if type(optimizer).__name__ == "Adafactor" else RUNNING_GROUP_KEYS
    for group, new in zip(optimizer.param_groups, fresh):
        old_peak, new_peak = group.get("initial_lr", group["lr"]), new.get("initial_lr", new["lr"])
        if old_peak != new_peak and old_peak:
            group["lr"] = group["lr"] * new_peak / old_peak
        for key, value in new.items():
            if key not in running:
                group[key] = value
    inner = getattr(scheduler, "scheduler", scheduler)
    if hasattr(inner, "base_lrs"):
        inner.base_lrs = [new.get("initial_lr", new["lr"]) for new in fresh]
