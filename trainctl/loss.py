"""The `loss` config group: training criteria matched to the data's task (`loss=auto` picks one).

Losses return a *sum* and the number of terms it covers (taken from shapes, so nothing syncs); the
training step divides by the total count of the accumulation window, which makes k accumulated
micro-batches exactly equal to one batch of their combined size, also for a short last window.

Class weights (`loss.class_weights`, cross_entropy and focal) multiply each term by its class's weight, and
the mean over a batch still divides by the number of terms: torch's ``reduction='mean'`` divides by the sum
of the batch's weights instead. With `auto` weights (n / (k * n_c) on the training split) the weights of the
training examples average exactly 1, so over an epoch the two means agree.

The validation criterion (`val/loss`) is the training criterion - the same class weights, focal gamma and
alpha - without label smoothing, per validation example: train/loss and val/loss stay comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from omegaconf import MISSING

from trainctl.errors import ConfigError, check
from trainctl.registry import Registry

if TYPE_CHECKING:
    import torch

    from trainctl.data import DataInfo

DEFAULT_FOR_TASK = {"classification": "cross_entropy", "regression": "mse", "lm": "cross_entropy"}


@dataclass
class LossSpec:
    name: str = MISSING
    """Training criterion; the option picked with `loss=NAME` (`auto` matches the data's task)."""

    def validate(self, key: str = "loss") -> None:
        pass


@dataclass
class AutoLossSpec(LossSpec):
    """cross_entropy for classification and language modelling, mse for regression."""

    name: str = "auto"


def check_class_weights(weights: Any, key: str) -> None:
    """`auto`, null or a non-empty list of numbers >= 0, not all 0 (their count is checked against the data)."""
    if weights is None or weights == "auto":
        return
    fix = f"set {key}=auto (inverse class frequency) or {key}=[w0,w1,...] with one weight per class"
    check(isinstance(weights, (list, tuple)) and len(weights) > 0, key, f"'{weights}' is neither auto nor a list "
          "of weights", fix)
    for i, w in enumerate(weights):
        check(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0, key,
              f"weight {i} is {w!r}; each must be a number >= 0", fix)
    check(sum(weights) > 0, key, "every weight is 0", fix)


@dataclass
class WeightedLossSpec(LossSpec):
    """A classification criterion with one weight per class."""

    class_weights: Any = None
    """Imbalanced classes: `auto` (n / (k * n_c) from the training split's class counts: a class with half
    the average frequency weighs 2), a list [w0, w1, ...] with one weight per class, or null (all 1)."""

    def validate(self, key: str = "loss") -> None:
        check_class_weights(self.class_weights, f"{key}.class_weights")


@dataclass
class CrossEntropySpec(WeightedLossSpec):
    """Softmax cross-entropy over class (or token) logits; class weights and label smoothing as torch's
    ``F.cross_entropy(weight=..., label_smoothing=...)``."""

    name: str = "cross_entropy"


@dataclass
class FocalSpec(WeightedLossSpec):
    """Softmax focal loss (Lin et al. 2017), -alpha_t (1 - p_t)^gamma log p_t: down-weights the examples the
    model already gets right; gamma 0 is cross-entropy. Soft targets: -sum_c w_c t_c (1 - p_c)^gamma log p_c."""

    name: str = "focal"
    gamma: float = 2.0
    """Focusing exponent (>= 0): 0 is cross-entropy; Lin et al. use 2."""
    alpha: Optional[float] = None
    """Two classes only: the weight of class 1, and 1 - alpha that of class 0 (Lin et al.'s alpha_t); null:
    none. With more classes use class_weights (alpha is the same as class_weights=[1 - alpha, alpha])."""

    def validate(self, key: str = "loss") -> None:
        super().validate(key)
        check(self.gamma >= 0, f"{key}.gamma", f"must be >= 0 (got {self.gamma})", f"set {key}.gamma=2.0")
        if self.alpha is not None:
            check(0 < self.alpha < 1, f"{key}.alpha", f"must be between 0 and 1 (got {self.alpha})",
                  f"set {key}.alpha=0.25, or {key}.alpha=null")
            check(self.class_weights is None, f"{key}.alpha", "alpha and class_weights both weight the classes",
                  f"set {key}.alpha=null and {key}.class_weights=[{1 - self.alpha:g},{self.alpha:g}] "
                  f"(the same weights), or {key}.class_weights=null")


@dataclass
class KLDivSpec(LossSpec):
    """KL(target || softmax(outputs)) for soft targets (class probabilities, e.g. from mixup or a teacher);
    hard labels become one-hot, where it equals cross-entropy. It is cross-entropy minus the targets'
    entropy: the same gradients, and 0 at a perfect match."""

    name: str = "kl_div"


@dataclass
class BCESpec(LossSpec):
    """Sigmoid binary cross-entropy: one logit for two classes, one per class (one-vs-rest) otherwise."""

    name: str = "bce"


@dataclass
class MSESpec(LossSpec):
    """Mean squared error."""

    name: str = "mse"


@dataclass
class L1Spec(LossSpec):
    """Mean absolute error."""

    name: str = "l1"


@dataclass
class HuberSpec(LossSpec):
    """Huber loss: quadratic below `delta`, linear above."""

    name: str = "huber"
    delta: float = 1.0

    def validate(self, key: str = "loss") -> None:
        check(self.delta > 0, f"{key}.delta", "must be > 0", f"set {key}.delta=1.0")


@dataclass
class SmoothL1Spec(LossSpec):
    """Smooth L1 loss: 0.5 x^2 / beta below `beta`, |x| - 0.5 beta above (Huber divided by beta, torch's
    ``smooth_l1_loss``); less sensitive to outliers than mse."""

    name: str = "smooth_l1"
    beta: float = 1.0
    """Where the quadratic part ends (>= 0; 0 is the l1 loss)."""

    def validate(self, key: str = "loss") -> None:
        check(self.beta >= 0, f"{key}.beta", f"must be >= 0 (got {self.beta})", f"set {key}.beta=1.0")


class SumLoss:
    """``loss(outputs, targets)`` is the sum of per-term losses; ``loss.count(targets)`` the number of
    terms, known from shapes before the forward pass (so the window total needs no sync).

    A classification criterion (``classes``) also takes soft targets - class probabilities, one row per
    sample (or token), as a batch transform such as mixup produces - and counts one term per row."""

    def __init__(self, fn: Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"],
                 prepare: Callable[[Any, Any], Tuple[Any, Any]], terms_per_target: int = 1,
                 classes: bool = False) -> None:
        self.fn = fn
        self.prepare = prepare
        self.terms_per_target = terms_per_target
        self.classes = classes

    def __call__(self, outputs: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
        return self.fn(*self.prepare(outputs, targets))

    def count(self, targets: "torch.Tensor") -> int:
        soft = self.classes and targets.is_floating_point()
        return (targets.numel() // targets.shape[-1] if soft else targets.numel()) * self.terms_per_target


def _logits_2d(outputs, targets):
    if targets.is_floating_point():  # class probabilities
        return outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1, targets.shape[-1]).to(outputs.dtype)
    if outputs.dim() == 2:  # one row of logits per sample already
        return outputs, targets
    return outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)


def _same(outputs, targets):
    return outputs, targets


def _binary_targets(outputs, targets):
    import torch.nn.functional as F

    if targets.is_floating_point():  # class probabilities: the positive class's, or one per class
        return outputs, (targets[..., 1:2] if outputs.shape[-1] == 1 else targets).to(outputs.dtype)
    if outputs.shape[-1] == 1:
        return outputs, targets.reshape(-1, 1).to(outputs.dtype)
    return outputs, F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)


class ClassWeights:
    """One weight per class, as a tensor made once per device and dtype (nothing is copied per step)."""

    def __init__(self, values: List[float]) -> None:
        self.values = values
        self._tensors: Dict[Any, "torch.Tensor"] = {}

    def like(self, outputs: "torch.Tensor") -> "torch.Tensor":
        import torch

        key = (outputs.device, outputs.dtype)
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(self.values, device=outputs.device, dtype=outputs.dtype)
        return self._tensors[key]


def _soft_targets(logits, targets, smoothing: float):
    """Class probabilities, one row per logits row: hard labels one-hot; label smoothing mixes in the
    uniform distribution as torch's cross-entropy does, (1 - s) t + s / k."""
    import torch.nn.functional as F

    k = logits.shape[-1]
    probs = targets if targets.is_floating_point() else F.one_hot(targets, k).to(logits.dtype)
    return probs * (1 - smoothing) + smoothing / k if smoothing else probs


def _cross_entropy(spec, smoothing: float, outputs: int, weights: Optional[ClassWeights]) -> SumLoss:
    import torch.nn.functional as F

    if weights is None:
        return SumLoss(lambda o, t: F.cross_entropy(o, t, reduction="sum", label_smoothing=smoothing), _logits_2d,
                       classes=True)
    return SumLoss(lambda o, t: F.cross_entropy(o, t, weight=weights.like(o), reduction="sum",
                                                label_smoothing=smoothing), _logits_2d, classes=True)


def _focal(spec, smoothing: float, outputs: int, weights: Optional[ClassWeights]) -> SumLoss:
    import torch
    import torch.nn.functional as F

    gamma = float(spec.gamma)

    def focused(log_p):
        """(1 - p)^gamma log p. 1 - p comes from expm1 (accurate near p = 1) and is kept off exact 0, where
        the gradient of a power gamma < 1 would be infinite."""
        return torch.pow((-torch.expm1(log_p)).clamp_min(1e-12), gamma) * log_p if gamma else log_p

    def focal(o, t):
        log_p = F.log_softmax(o.float(), dim=-1)
        if t.is_floating_point() or smoothing:  # -sum_c w_c t_c (1 - p_c)^gamma log p_c
            terms = _soft_targets(log_p, t, smoothing) * focused(log_p)
            return -(terms * weights.like(log_p) if weights is not None else terms).sum()
        terms = focused(log_p.gather(1, t.unsqueeze(1)).squeeze(1))  # -w_y (1 - p_y)^gamma log p_y
        return -(terms * weights.like(log_p)[t] if weights is not None else terms).sum()
    return SumLoss(focal, _logits_2d, classes=True)


def _kl_div(spec, smoothing: float, outputs: int, weights: Optional[ClassWeights]) -> SumLoss:
    import torch.nn.functional as F

    def kl(o, t):
        log_q = F.log_softmax(o.float(), dim=-1)
        return F.kl_div(log_q, _soft_targets(log_q, t, smoothing), reduction="sum")  # 0 log 0 = 0
    return SumLoss(kl, _logits_2d, classes=True)


def _bce(spec, smoothing: float, outputs: int, weights: Optional[ClassWeights]) -> SumLoss:
    import torch.nn.functional as F

    return SumLoss(lambda o, t: F.binary_cross_entropy_with_logits(o, t, reduction="sum"), _binary_targets,
                   terms_per_target=outputs, classes=True)


def _regression(name: str) -> Callable[..., SumLoss]:
    def build(spec, smoothing: float, outputs: int, weights: Optional[ClassWeights]) -> SumLoss:
        import torch.nn.functional as F

        if name == "huber":
            return SumLoss(lambda o, t: F.huber_loss(o, t, reduction="sum", delta=spec.delta), _same)
        if name == "smooth_l1":
            return SumLoss(lambda o, t: F.smooth_l1_loss(o, t, reduction="sum", beta=spec.beta), _same)
        fn = {"mse": F.mse_loss, "l1": F.l1_loss}[name]
        return SumLoss(lambda o, t: fn(o, t, reduction="sum"), _same)
    return build


@dataclass(frozen=True)
class LossEntry:
    spec: type
    tasks: Tuple[str, ...]
    build: Optional[Callable[[Any, float, int, Optional[ClassWeights]], SumLoss]]
    """(spec, label smoothing, model outputs, class weights or None) -> criterion."""
    smoothing: bool = False
    """Supports label smoothing."""


LOSSES: Registry[LossEntry] = Registry("loss")
LOSSES.add("auto", LossEntry(AutoLossSpec, ("classification", "regression", "lm"), None))
LOSSES.add("cross_entropy", LossEntry(CrossEntropySpec, ("classification", "lm"), _cross_entropy, True))
LOSSES.add("focal", LossEntry(FocalSpec, ("classification",), _focal, True))
LOSSES.add("kl_div", LossEntry(KLDivSpec, ("classification",), _kl_div, True))
LOSSES.add("bce", LossEntry(BCESpec, ("classification",), _bce))
LOSSES.add("mse", LossEntry(MSESpec, ("regression",), _regression("mse")))
LOSSES.add("l1", LossEntry(L1Spec, ("regression",), _regression("l1")))
LOSSES.add("huber", LossEntry(HuberSpec, ("regression",), _regression("huber")))
LOSSES.add("smooth_l1", LossEntry(SmoothL1Spec, ("regression",), _regression("smooth_l1")))


def resolve_loss(spec: LossSpec, task: str) -> LossSpec:
    """`auto` -> the task's default criterion."""
    if spec.name != "auto":
        return spec
    return LOSSES.get(DEFAULT_FOR_TASK[task]).spec()


def loss_problem(spec: LossSpec, task: str, label_smoothing: float) -> Optional[ConfigError]:
    name = resolve_loss(spec, task).name
    entry = LOSSES.get(name)
    if task not in entry.tasks:
        fits = [n for n, e in LOSSES.items() if task in e.tasks and n != "auto"]
        return ConfigError("loss", f"loss={name} does not fit {task} data", f"set loss=auto (or one of {', '.join(fits)})")
    if label_smoothing and not entry.smoothing:
        smooth = [n for n, e in LOSSES.items() if e.smoothing]
        return ConfigError("regularization.label_smoothing", f"label smoothing needs loss={' or '.join(smooth)}, "
                           f"not {name}", "set regularization.label_smoothing=0")
    if getattr(spec, "class_weights", None) is not None and task != "classification":
        return ConfigError("loss.class_weights", f"class weights are for classification data, not {task}",
                           "set loss.class_weights=null")
    return None


def class_weights(spec: LossSpec, info: "DataInfo") -> Optional[List[float]]:
    """The per-class weights of a criterion on this data (None: unweighted); `auto` from the training split's
    class counts, n / (k * n_c) - a class absent from the training split weighs 0."""
    k = info.num_classes
    alpha = getattr(spec, "alpha", None)
    if alpha is not None:
        check(k == 2, "loss.alpha", f"alpha weights the two classes of binary data; this data has {k} classes",
              f"set loss.alpha=null and loss.class_weights=auto (or a list of {k} weights)")
        return [1.0 - alpha, float(alpha)]
    weights = getattr(spec, "class_weights", None)
    if weights is None:
        return None
    if weights == "auto":
        counts = info.class_counts
        check(counts is not None, "loss.class_weights", "auto needs the training labels' class counts, and this "
              "dataset is read batch by batch without them", f"give the weights: set loss.class_weights=[w0,w1,...] "
              f"with {k} numbers")
        n = sum(counts)
        return [n / (k * c) if c else 0.0 for c in counts]
    check(len(weights) == k, "loss.class_weights", f"has {len(weights)} weights, but the data has {k} classes",
          f"give {k} weights, one per class in label order, or set loss.class_weights=auto")
    return [float(w) for w in weights]


def out_features(spec: LossSpec, info: "DataInfo") -> int:
    """How many outputs the model needs for this loss on this data."""
    name = resolve_loss(spec, info.task).name
    if info.task == "lm":
        return info.vocab_size
    if info.task == "regression":
        return info.num_targets
    return 1 if name == "bce" and info.num_classes == 2 else info.num_classes


def build_loss(spec: LossSpec, info: "DataInfo", label_smoothing: float) -> Tuple[SumLoss, SumLoss]:
    """(training criterion, validation criterion): the same criterion and class weights, the validation one
    without label smoothing."""
    resolved = resolve_loss(spec, info.task)
    build = LOSSES.get(resolved.name).build
    outputs = out_features(spec, info)
    values = class_weights(resolved, info) if info.task == "classification" else None
    weights = ClassWeights(values) if values is not None else None
    return build(resolved, label_smoothing, outputs, weights), build(resolved, 0.0, outputs, weights)
