"""The `precision` config group: owns autocast, loss scaling and the unscale -> clip -> step order,
so every precision runs the same lines of the training step."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, Optional, Tuple

from omegaconf import MISSING

from trainctl.registry import Registry

if TYPE_CHECKING:
    import torch


@dataclass
class PrecisionSpec:
    name: str = MISSING
    """Numeric precision; the option picked with `precision=NAME`."""

    def validate(self, key: str = "precision") -> None:
        pass


@dataclass
class FP32Spec(PrecisionSpec):
    """Full float32: no autocast, no loss scaling."""

    name: str = "fp32"


class Precision:
    """float32 policy; subclasses override the hooks for autocast and loss scaling."""

    name = "fp32"

    def autocast(self) -> ContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: "torch.Tensor") -> None:
        loss.backward()

    def step(self, optimizer: "torch.optim.Optimizer", clip: Callable[[], Optional["torch.Tensor"]],
             guard: Optional[Callable[[Optional["torch.Tensor"]], bool]] = None
             ) -> Tuple[Optional["torch.Tensor"], bool]:
        """Clip, then step unless ``guard(norm)`` says no. Returns (pre-clip grad norm or None, stepped)."""
        norm = clip()
        if guard is not None and not guard(norm):
            return norm, False
        optimizer.step()
        return norm, True

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class PrecisionEntry:
    spec: type
    build: Callable[[Any, "torch.device"], Precision]


PRECISIONS: Registry[PrecisionEntry] = Registry("precision")
PRECISIONS.add("fp32", PrecisionEntry(FP32Spec, lambda spec, device: Precision()))


def build_precision(spec: PrecisionSpec, device: "torch.device") -> Precision:
    return PRECISIONS.get(spec.name).build(spec, device)
