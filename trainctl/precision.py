"""The `precision` config group: owns autocast, loss scaling and the unscale -> clip -> step order,
so every precision runs the same lines of the training step."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, Optional, Tuple

from omegaconf import MISSING

from trainctl.errors import ConfigError, check
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


@dataclass
class BF16Spec(PrecisionSpec):
    """bfloat16 autocast: matmuls and convolutions in bf16, weights and optimizer state in fp32."""

    name: str = "bf16"


@dataclass
class FP16Spec(PrecisionSpec):
    """float16 autocast with a GradScaler: the loss is scaled up for backward, gradients are unscaled
    before clipping, and steps whose gradients overflow are skipped (counted as train/amp_skipped_steps)."""

    name: str = "fp16"
    init_scale: float = 65536.0
    """Starting loss scale."""
    growth_interval: int = 2000
    """Steps without overflow before the scale doubles."""

    def validate(self, key: str = "precision") -> None:
        check(self.init_scale > 0, f"{key}.init_scale", "must be > 0", f"set {key}.init_scale=65536")
        check(self.growth_interval >= 1, f"{key}.growth_interval", "must be >= 1", f"set {key}.growth_interval=2000")


@dataclass
class BF16TrueSpec(PrecisionSpec):
    """Parameters, gradients and optimizer state in bfloat16 (half the memory of fp32 weights), with
    bf16 autocast; less accurate than `bf16` for long runs."""

    name: str = "bf16_true"


@dataclass
class TF32Spec(PrecisionSpec):
    """float32 with TensorFloat-32 matmuls and convolutions (CUDA, Ampere or newer)."""

    name: str = "tf32"


class Precision:
    """float32 policy; subclasses override the hooks for autocast and loss scaling."""

    name = "fp32"
    dtype: Optional["torch.dtype"] = None
    """Autocast dtype (None: no autocast)."""
    scales_loss = False
    """Whether backward runs on a scaled loss (fp16's GradScaler)."""

    def __init__(self, device: Optional["torch.device"] = None) -> None:
        self.device_type = device.type if device is not None else "cpu"
        self.overflow = False
        """Whether the last step was skipped by the loss scaler (gradients overflowed)."""
        self.overflow_skips = 0
        self.policy: Optional[str] = None
        """Set when another mechanism stands in for autocast (FSDP's mixed-precision policy)."""

    def convert_model(self, model: "torch.nn.Module") -> "torch.nn.Module":
        """Put the model's parameters in the policy's storage dtype (before the optimizer is built)."""
        return model

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: "torch.Tensor") -> None:
        loss.backward()

    def step(self, optimizer: "torch.optim.Optimizer", clip: Callable[[], Optional["torch.Tensor"]],
             guard: Optional[Callable[[Optional["torch.Tensor"]], bool]] = None,
             before: Optional[Callable[[], None]] = None,
             closure: Optional[Callable[[], "torch.Tensor"]] = None) -> Tuple[Optional["torch.Tensor"], bool]:
        """``before()`` (callbacks and step wrappers see the gradients), clip, then step unless
        ``guard(norm)`` says no; ``closure`` re-evaluates the loss for optimizers that step with one
        (L-BFGS). Returns (pre-clip grad norm or None, stepped)."""
        if before is not None:
            before()
        norm = clip()
        if guard is not None and not guard(norm):
            return norm, False
        if closure is not None:
            optimizer.step(closure)
        else:
            optimizer.step()
        return norm, True

    def log_values(self) -> Dict[str, float]:
        """What this policy reports with each training log record."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class AutocastPrecision(Precision):
    def __init__(self, device: "torch.device", dtype: "torch.dtype", name: str) -> None:
        super().__init__(device)
        self.dtype, self.name = dtype, name


class TruePrecision(AutocastPrecision):
    def convert_model(self, model: "torch.nn.Module") -> "torch.nn.Module":
        return model.to(self.dtype)


class ScaledPrecision(AutocastPrecision):
    """fp16 autocast with torch.amp.GradScaler: scale -> backward -> unscale -> clip -> step -> update."""

    scales_loss = True

    def __init__(self, device: "torch.device", spec: FP16Spec) -> None:
        import torch

        super().__init__(device, torch.float16, "fp16")
        self.scaler = torch.amp.GradScaler(device.type, init_scale=spec.init_scale,
                                           growth_interval=spec.growth_interval)
        self.scale = spec.init_scale
        """The scale after the last update; a lower one after the next update means it skipped."""

    def backward(self, loss: "torch.Tensor") -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer, clip, guard=None, before=None, closure=None):
        if closure is not None:
            raise ConfigError("precision", "the optimizer re-evaluates the loss within its step, and fp16's "
                              "loss scaler unscales a step's gradients once", "set precision=bf16 (or fp32)")
        scaler = self.scaler
        scaler.unscale_(optimizer)  # callbacks, wrappers, clipping and the guard see the true gradients
        if before is not None:
            before()
        norm = clip()
        if guard is not None and not guard(norm):
            scaler.update()  # an overflow still lowers the scale
            self.scale = scaler.get_scale()
            self.overflow = False
            return norm, False
        scaler.step(optimizer)  # skipped when the unscaled gradients hold inf/nan
        scaler.update()
        scale, self.scale = self.scale, scaler.get_scale()  # one read per step; step() has synced already
        self.overflow = self.scale < scale
        self.overflow_skips += self.overflow
        return norm, not self.overflow

    def log_values(self) -> Dict[str, float]:
        return {"train/amp_skipped_steps": self.overflow_skips, "train/loss_scale": self.scaler.get_scale()}

    def state_dict(self) -> Dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "overflow_skips": self.overflow_skips}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
            self.scale = self.scaler.get_scale()
            self.overflow_skips = state.get("overflow_skips", 0)


def _tf32(spec: TF32Spec, device: "torch.device") -> Precision:
    import torch

    if device.type != "cuda":
        raise ConfigError("precision", f"tf32 is a CUDA feature and the run is on {device.type}",
                          "set precision=fp32 (or bf16)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    precision = Precision(device)
    precision.name = "tf32"
    return precision


def _autocast(dtype_name: str, name: str, cls: type = AutocastPrecision) -> Callable[[Any, "torch.device"], Precision]:
    def build(spec: Any, device: "torch.device") -> Precision:
        import torch

        if device.type == "mps" and dtype_name == "bfloat16":
            raise ConfigError("precision", f"{name} needs bfloat16, which this MPS device does not support",
                              "set precision=fp16 or fp32")
        return cls(device, getattr(torch, dtype_name), name)
    return build


@dataclass(frozen=True)
class PrecisionEntry:
    spec: type
    build: Callable[[Any, "torch.device"], Precision]


PRECISIONS: Registry[PrecisionEntry] = Registry("precision")
PRECISIONS.add("fp32", PrecisionEntry(FP32Spec, lambda spec, device: Precision(device)))
PRECISIONS.add("bf16", PrecisionEntry(BF16Spec, _autocast("bfloat16", "bf16")))
PRECISIONS.add("fp16", PrecisionEntry(FP16Spec, lambda spec, device: ScaledPrecision(device, spec)))
PRECISIONS.add("bf16_true", PrecisionEntry(BF16TrueSpec, _autocast("bfloat16", "bf16_true", TruePrecision)))
PRECISIONS.add("tf32", PrecisionEntry(TF32Spec, _tf32))


def build_precision(spec: PrecisionSpec, device: "torch.device") -> Precision:
    return PRECISIONS.get(spec.name).build(spec, device)
