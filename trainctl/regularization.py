"""The `regularization` config group: weight decay (and which parameters get it), dropout override,
label smoothing and gradient clipping by norm or by value.

This module hands the optimizer its parameter groups and the precision policy its clipping function;
the loss builder reads `label_smoothing`, the model builder reads `dropout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, List, Optional, Tuple

from trainctl.errors import check

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class RegularizationSpec:
    weight_decay: float = 0.01
    """Weight decay passed to the optimizer (decoupled for AdamW/Lion/Lamb/Muon, L2 for SGD/Adam)."""
    exclude_bias_and_norm: bool = True
    """No weight decay on biases and normalisation weights (every parameter with fewer than 2 dims)."""
    dropout: Optional[float] = None
    """Dropout probability for every dropout layer of the model; null keeps the model's own."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss (training only; validation loss is unsmoothed)."""
    max_grad_norm: Optional[float] = None
    """Clip the global gradient norm after the accumulation window; null disables."""
    clip_value: Optional[float] = None
    """Clamp every gradient element to [-clip_value, clip_value]; null disables."""

    def validate(self, key: str = "regularization") -> None:
        check(self.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0 (got {self.weight_decay})",
              f"set {key}.weight_decay=0.01")
        check(self.dropout is None or 0 <= self.dropout < 1, f"{key}.dropout", "must be in [0, 1) or null",
              f"set {key}.dropout=null")
        check(0 <= self.label_smoothing < 1, f"{key}.label_smoothing", "must be in [0, 1)",
              f"set {key}.label_smoothing=0.1")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, f"{key}.max_grad_norm",
              "must be > 0 or null", f"set {key}.max_grad_norm=1.0")
        check(self.clip_value is None or self.clip_value > 0, f"{key}.clip_value", "must be > 0 or null",
              f"set {key}.clip_value=null")


def param_groups(model: "nn.Module", spec: RegularizationSpec) -> List[dict]:
    """Trainable parameters split into a decayed and a non-decayed group (names kept for later splits)."""
    return named_param_groups(model.named_parameters(), spec)


def named_param_groups(named: Iterable[Tuple[str, "torch.nn.Parameter"]], spec: RegularizationSpec) -> List[dict]:
    """:func:`param_groups` of some (name, parameter) pairs."""
    decay: dict = {"names": [], "params": [], "weight_decay": spec.weight_decay}
    no_decay: dict = {"names": [], "params": [], "weight_decay": 0.0}
    from trainctl.performance import clean_name

    for name, param in named:
        if not param.requires_grad:
            continue
        group = no_decay if spec.exclude_bias_and_norm and param.ndim < 2 else decay
        group["names"].append(clean_name(name))
        group["params"].append(param)
    return [g for g in (decay, no_decay) if g["params"]]


class GradClipper:
    """Clips gradients in place after the accumulation window; returns the pre-clip global norm when
    clipping by norm (None otherwise), left on the device so nothing waits for it."""

    def __init__(self, params: Iterable["torch.Tensor"], spec: RegularizationSpec) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.max_grad_norm = spec.max_grad_norm
        self.clip_value = spec.clip_value

    @property
    def active(self) -> bool:
        return self.max_grad_norm is not None or self.clip_value is not None

    def __call__(self) -> Optional["torch.Tensor"]:
        import torch

        if self.clip_value is not None:
            torch.nn.utils.clip_grad_value_(self.params, self.clip_value, foreach=True)
        if self.max_grad_norm is not None:
            return _full(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True))
        return None

    def total_norm(self) -> "torch.Tensor":
        """The global gradient norm (for the non-finite guard when no clipping computes it)."""
        import torch

        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        return _full(torch.nn.utils.get_total_norm([g.float() for g in grads], foreach=True))


def _full(norm: "torch.Tensor") -> "torch.Tensor":
    """A norm over FSDP's sharded gradients is a DTensor; the global value as a plain tensor."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
