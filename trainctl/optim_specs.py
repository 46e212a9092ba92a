"""The specs of the `optimizer` config group, one dataclass per optimizer: fields (besides `name`, `lr`,
`lr_multipliers`) are the optimizer's own keyword arguments, with their checks. Weight decay is not among
them: it comes per parameter group from the regularization group. Torch-free at import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from trainctl.errors import check


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
    BETAS = 2
    """How many values `betas` holds."""

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
                check(len(betas) == self.BETAS and all(0.0 <= b < 1.0 for b in betas), f"{key}.{name}",
                      f"needs {self.BETAS} values in [0, 1) (got {list(betas)})",
                      f"set {key}.{name}=" + ",".join(["[0.9", "0.999", "0.9999"][:self.BETAS]) + "]")
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


@dataclass
class ShampooSpec(OptimizerSpec):
    """Shampoo: the gradient preconditioned by one matrix per dimension (inverse 2k-th roots of accumulated
    gradient outer products). Fewer steps than Adam on small dense models; an SVD per dimension per update."""

    name: str = "shampoo"
    lr: float = 0.05
    """Its statistics accumulate (as Adagrad's do), so steps shrink over time: use a larger lr than Adam's."""
    momentum: float = 0.0
    weight_decouple: bool = False
    """Decoupled weight decay (AdamW-style) instead of an L2 term added to the gradient."""
    fixed_decay: bool = False
    """Decoupled decay not scaled by the learning rate."""
    preconditioning_compute_steps: int = 1
    """Steps between recomputing the inverse roots (raise it for large layers)."""
    matrix_eps: float = 1e-6
    """Initial diagonal of the statistics (stabilises the inverse roots)."""

    def validate(self, key: str = "optimizer") -> None:
        super().validate(key)
        check(self.momentum < 1, f"{key}.momentum", f"must be < 1 (got {self.momentum})", f"set {key}.momentum=0.9")
        check(self.preconditioning_compute_steps >= 1, f"{key}.preconditioning_compute_steps", "must be >= 1",
              f"set {key}.preconditioning_compute_steps=1")
        check(self.matrix_eps > 0, f"{key}.matrix_eps", "must be > 0", f"set {key}.matrix_eps=1e-6")


@dataclass
class SOAPSpec(OptimizerSpec):
    """SOAP: Adam run in the eigenbasis of Shampoo's preconditioner, refreshed every few steps; decoupled
    weight decay. For transformers and MLPs where Adam works; its first step only sets up the basis."""

    name: str = "soap"
    lr: float = 3e-3
    betas: List[float] = field(default_factory=lambda: [0.95, 0.95])
    shampoo_beta: Optional[float] = None
    """Decay of the preconditioner statistics; null uses betas[1]."""
    precondition_frequency: int = 10
    """Steps between eigenbasis updates."""
    max_precondition_dim: int = 10000
    """Dimensions larger than this are not rotated."""
    merge_dims: bool = False
    """Merge small dimensions (convolution kernels) before preconditioning."""
    precondition_1d: bool = False
    """Also precondition 1-D parameters (biases, norm weights) with a full matrix."""
    correct_bias: bool = True
    normalize_gradient: bool = False
    data_format: str = "channels_first"
    """Layout of 4-D parameters for merge_dims: channels_first or channels_last."""
    eps: float = 1e-8

    def validate(self, key: str = "optimizer") -> None:
        super().validate(key)
        check(self.shampoo_beta is None or 0 <= self.shampoo_beta < 1, f"{key}.shampoo_beta",
              f"must be in [0, 1) or null (got {self.shampoo_beta})", f"set {key}.shampoo_beta=null")
        check(self.precondition_frequency >= 1, f"{key}.precondition_frequency", "must be >= 1",
              f"set {key}.precondition_frequency=10")
        check(self.max_precondition_dim >= 1, f"{key}.max_precondition_dim", "must be >= 1",
              f"set {key}.max_precondition_dim=10000")
        check(self.data_format in ("channels_first", "channels_last"), f"{key}.data_format",
              f"must be channels_first or channels_last (got {self.data_format})", f"set {key}.data_format=channels_first")


@dataclass
class ProdigySpec(OptimizerSpec):
    """Prodigy: Adam whose step size d is estimated from the distance travelled from the initial weights,
    so lr stays 1.0 (learning-rate free; lower it only if training is unstable). The estimate is `d` in
    every parameter group (and in the checkpoint)."""

    name: str = "prodigy"
    lr: float = 1.0
    """Multiplier of the estimated step size; schedules scale it as usual (cosine decay suits it)."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    beta3: Optional[float] = None
    """Decay of the step-size estimate's statistics; null uses sqrt(betas[1])."""
    d0: float = 1e-6
    """Initial step-size estimate: a far too small one, which Prodigy grows."""
    d_coef: float = 1.0
    """Factor on the estimate (0.5 more cautious, 2.0 more aggressive)."""
    growth_rate: Optional[float] = None
    """Largest factor d may grow by in one step; null: unbounded."""
    weight_decouple: bool = True
    fixed_decay: bool = False
    bias_correction: bool = False
    safeguard_warmup: bool = False
    """Leave lr out of the estimate's denominator, so a long warmup does not inflate d."""
    eps: Optional[float] = 1e-8
    """null: atan2 updates instead of division by sqrt(v) + eps."""

    def kwargs(self) -> Dict[str, Any]:
        kwargs = super().kwargs()
        kwargs["growth_rate"] = float("inf") if self.growth_rate is None else self.growth_rate
        return kwargs

    def validate(self, key: str = "optimizer") -> None:
        super().validate(key)
        check(not self.lr_multipliers, f"{key}.lr_multipliers", "Prodigy takes one step size (d times the "
              "first group's lr) for every parameter group", f"drop {key}.lr_multipliers")
        check(self.beta3 is None or 0 <= self.beta3 < 1, f"{key}.beta3", "must be in [0, 1) or null",
              f"set {key}.beta3=null")
        check(self.d0 > 0, f"{key}.d0", f"must be > 0 (got {self.d0})", f"set {key}.d0=1e-6")
        check(self.d_coef > 0, f"{key}.d_coef", f"must be > 0 (got {self.d_coef})", f"set {key}.d_coef=1.0")
        check(self.growth_rate is None or self.growth_rate >= 1, f"{key}.growth_rate", "must be >= 1 or null",
              f"set {key}.growth_rate=null")


@dataclass
class AdEMAMixSpec(OptimizerSpec):
    """AdEMAMix: Adam plus a slow momentum (betas[2]) weighted by alpha, which keeps using gradients many
    thousands of steps old; for long runs (the slow EMA needs about 1/(1-betas[2]) steps to matter)."""

    name: str = "ademamix"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999, 0.9999])
    """Fast momentum, second moment, slow momentum."""
    alpha: float = 5.0
    """Weight of the slow momentum."""
    t_alpha_beta3: Optional[int] = None
    """Steps over which alpha and betas[2] warm up (about the run's total steps); null: no warmup."""
    weight_decouple: bool = True
    """Decoupled (AdamW-style) weight decay, as the method was published; false adds an L2 term."""
    fixed_decay: bool = False
    eps: float = 1e-8

    BETAS = 3

    def validate(self, key: str = "optimizer") -> None:
        super().validate(key)
        check(self.t_alpha_beta3 is None or self.t_alpha_beta3 >= 1, f"{key}.t_alpha_beta3",
              "must be >= 1 or null", f"set {key}.t_alpha_beta3=null")


@dataclass
class LBFGSSpec(OptimizerSpec):
    """L-BFGS (torch.optim): a quasi-Newton method for small deterministic full-batch problems (batch =
    the whole training split, no dropout). Each trainctl step runs up to max_iter iterations, each
    re-running the window's forward and backward. No weight decay, clipping, fp16, step wrappers or DDP."""

    name: str = "lbfgs"
    lr: float = 1.0
    """Step length (with a line search: its first trial)."""
    max_iter: int = 20
    """Iterations per trainctl step."""
    max_eval: Optional[int] = None
    """Loss evaluations per step; null: 1.25 x max_iter."""
    tolerance_grad: float = 1e-7
    """A step ends early when every gradient element is this small."""
    tolerance_change: float = 1e-9
    """A step ends early when the loss or the weights change less than this."""
    history_size: int = 100
    """Curvature pairs kept."""
    line_search_fn: Optional[str] = "strong_wolfe"
    """strong_wolfe, or null for fixed steps of lr."""

    def validate(self, key: str = "optimizer") -> None:
        super().validate(key)
        check(not self.lr_multipliers, f"{key}.lr_multipliers", "L-BFGS takes one parameter group",
              f"drop {key}.lr_multipliers")
        check(self.max_iter >= 1, f"{key}.max_iter", "must be >= 1", f"set {key}.max_iter=20")
        check(self.max_eval is None or self.max_eval >= 1, f"{key}.max_eval", "must be >= 1 or null",
              f"set {key}.max_eval=null")
        check(self.history_size >= 1, f"{key}.history_size", "must be >= 1", f"set {key}.history_size=100")
        check(self.line_search_fn in (None, "strong_wolfe"), f"{key}.line_search_fn",
              f"must be strong_wolfe or null (got {self.line_search_fn})", f"set {key}.line_search_fn=strong_wolfe")
