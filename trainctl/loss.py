"""The `loss` config group: training criteria matched to the data's task (`loss=auto` picks one).

Losses return a *sum* and the number of terms it covers (taken from shapes, so nothing syncs); the
training step divides by the total count of the accumulation window, which makes k accumulated
micro-batches exactly equal to one batch of their combined size, also for a short last window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple

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


@dataclass
class CrossEntropySpec(LossSpec):
    """Softmax cross-entropy over class (or token) logits."""

    name: str = "cross_entropy"


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


def _cross_entropy(spec, smoothing: float, outputs: int) -> SumLoss:
    import torch.nn.functional as F

    return SumLoss(lambda o, t: F.cross_entropy(o, t, reduction="sum", label_smoothing=smoothing), _logits_2d,
                   classes=True)


def _bce(spec, smoothing: float, outputs: int) -> SumLoss:
    import torch.nn.functional as F

    return SumLoss(lambda o, t: F.binary_cross_entropy_with_logits(o, t, reduction="sum"), _binary_targets,
                   terms_per_target=outputs, classes=True)


def _regression(name: str) -> Callable[[Any, float, int], SumLoss]:
    def build(spec, smoothing: float, outputs: int) -> SumLoss:
        import torch.nn.functional as F

        if name == "huber":
            return SumLoss(lambda o, t: F.huber_loss(o, t, reduction="sum", delta=spec.delta), _same)
        fn = {"mse": F.mse_loss, "l1": F.l1_loss}[name]
        return SumLoss(lambda o, t: fn(o, t, reduction="sum"), _same)
    return build


@dataclass(frozen=True)
class LossEntry:
    spec: type
    tasks: Tuple[str, ...]
    build: Optional[Callable[[Any, float, int], SumLoss]]
    """(spec, label smoothing, model outputs) -> criterion."""
    smoothing: bool = False
    """Supports label smoothing."""


LOSSES: Registry[LossEntry] = Registry("loss")
LOSSES.add("auto", LossEntry(AutoLossSpec, ("classification", "regression", "lm"), None))
LOSSES.add("cross_entropy", LossEntry(CrossEntropySpec, ("classification", "lm"), _cross_entropy, True))
LOSSES.add("bce", LossEntry(BCESpec, ("classification",), _bce))
LOSSES.add("mse", LossEntry(MSESpec, ("regression",), _regression("mse")))
LOSSES.add("l1", LossEntry(L1Spec, ("regression",), _regression("l1")))
LOSSES.add("huber", LossEntry(HuberSpec, ("regression",), _regression("huber")))


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
        return ConfigError("regularization.label_smoothing", f"label smoothing needs loss=cross_entropy, not {name}",
                           "set regularization.label_smoothing=0")
    return None


def out_features(spec: LossSpec, info: "DataInfo") -> int:
    """How many outputs the model needs for this loss on this data."""
    name = resolve_loss(spec, info.task).name
    if info.task == "lm":
        return info.vocab_size
    if info.task == "regression":
        return info.num_targets
    return 1 if name == "bce" and info.num_classes == 2 else info.num_classes


def build_loss(spec: LossSpec, info: "DataInfo", label_smoothing: float) -> Tuple[SumLoss, SumLoss]:
    """(training criterion, validation criterion without label smoothing)."""
    resolved = resolve_loss(spec, info.task)
    build = LOSSES.get(resolved.name).build
    outputs = out_features(spec, info)
    return build(resolved, label_smoothing, outputs), build(resolved, 0.0, outputs)
