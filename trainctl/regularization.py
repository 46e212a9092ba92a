"""The `regularization` config group: weight decay (and which parameters get it), dropout override,
label smoothing, gradient clipping by norm or by value, sharpness-aware minimisation (SAM/ASAM),
adaptive gradient clipping (AGC) and L1 / coupled L2 penalties.

This module hands the optimizer its parameter groups and the precision policy its clipping function;
the loss builder reads `label_smoothing`, the model builder reads `dropout`; SAM, AGC and the penalties
are optimizer-step wrappers (:mod:`trainctl.sharpness`, :mod:`trainctl.penalties`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
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
    sam_rho: Optional[float] = None
    """Sharpness-aware minimisation: the radius of the weight perturbation (0.05 is typical; 0.5 to 2 with
    sam_adaptive); each step then takes a second forward/backward pass. null disables."""
    sam_adaptive: bool = False
    """ASAM: scale the perturbation per weight by T = |w| + sam_eta (invariant to weight rescaling)."""
    sam_eta: float = 0.01
    """ASAM's offset in T = |w| + eta, so weights at zero are perturbed too."""
    agc_clipping: Optional[float] = None
    """Adaptive gradient clipping: cap each unit's gradient norm at agc_clipping times its weight norm
    (0.01 to 0.16 in NFNets; smaller for larger batches). null disables."""
    agc_eps: float = 1e-3
    """AGC: weight norms below this count as this (so units at zero may still move)."""
    agc_exclude: List[str] = field(default_factory=list)
    """Parameter name patterns (fnmatch) AGC leaves alone, e.g. ['head.*'] for the classifier as in NFNets."""
    l1: float = 0.0
    """L1 penalty coefficient: adds l1 * sum|w| to the loss (pushes weights to exactly zero). 0 disables."""
    l2: float = 0.0
    """Coupled L2 penalty coefficient: adds l2/2 * sum w^2 to the loss, so its gradient l2 * w passes
    through the optimizer (Adam rescales it), unlike the decoupled weight_decay of AdamW. 0 disables."""
    penalty_params: Optional[List[str]] = None
    """Parameter name patterns (fnmatch) l1 and l2 apply to; null: the weight-decayed parameters (all of
    them, or without biases and norm weights when exclude_bias_and_norm is on)."""

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
        self._validate_step_methods(key)

    def _validate_step_methods(self, key: str) -> None:
        check(self.sam_rho is None or self.sam_rho > 0, f"{key}.sam_rho", f"must be > 0 or null (got {self.sam_rho})",
              f"set {key}.sam_rho=0.05")
        check(not self.sam_adaptive or self.sam_rho is not None, f"{key}.sam_adaptive",
              "ASAM needs a perturbation radius and sam_rho is null", f"set {key}.sam_rho=0.5")
        check(self.sam_eta >= 0, f"{key}.sam_eta", f"must be >= 0 (got {self.sam_eta})", f"set {key}.sam_eta=0.01")
        check(self.agc_clipping is None or self.agc_clipping > 0, f"{key}.agc_clipping",
              f"must be > 0 or null (got {self.agc_clipping})", f"set {key}.agc_clipping=0.01")
        check(self.agc_eps > 0, f"{key}.agc_eps", f"must be > 0 (got {self.agc_eps})", f"set {key}.agc_eps=0.001")
        check(not self.agc_exclude or self.agc_clipping is not None, f"{key}.agc_exclude",
              "names parameters for AGC, which is off (agc_clipping is null)", f"set {key}.agc_clipping=0.01")
        for name in ("l1", "l2"):
            value = getattr(self, name)
            check(value >= 0, f"{key}.{name}", f"must be >= 0 (got {value})", f"set {key}.{name}=0")
        check(self.penalty_params is None or self.l1 > 0 or self.l2 > 0, f"{key}.penalty_params",
              "names parameters for the penalties, which are off (l1 and l2 are 0)", f"set {key}.l1=1e-5")
        check(self.penalty_params is None or len(self.penalty_params) > 0, f"{key}.penalty_params",
              "is an empty list (no parameter would be penalised)", f"set {key}.penalty_params=null")

    def penalized(self, name: str, param: "torch.Tensor") -> bool:
        """Whether the l1/l2 penalties apply to parameter ``name``: it matches a `penalty_params` pattern,
        or (no patterns) it is weight-decayed by :func:`named_param_groups`' rule."""
        if self.penalty_params is not None:
            return matches(name, self.penalty_params)
        return not (self.exclude_bias_and_norm and param.ndim < 2)


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether parameter ``name`` matches one of the fnmatch ``patterns``."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


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


def _local(t: "torch.Tensor") -> "torch.Tensor":
    """Under FSDP: this rank's shard of a sharded tensor (sharing its storage); any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t
