"""Optimizer-step wrappers: methods that act on an optimizer step's gradients before they are clipped
and applied - rescaling them (adaptive gradient clipping) or replacing them with the gradients of a
second forward/backward pass at other weights (sharpness-aware minimisation).

The precision policy calls every wrapper after the accumulation window's backward and after the loss
scaler unscaled the gradients, before clipping: ``before_step(params, recompute)``. ``recompute()``
runs the window's forward and backward again (same micro-batches, same accumulation scaling, the
gradient exchange of DDP/FSDP on its last micro-batch) into freshly zeroed gradients. A wrapper that
recomputes cannot run under a loss scaler (the scaler unscales a step's gradients once).

A wrapper is one class plus a registry entry whose ``build(run_spec)`` returns it when the spec asks for
it (None otherwise), and its setting in a group's YAML; entries run in ``order`` (SAM 10, L1/L2 penalties
20, AGC 30; clipping by norm or value comes after all of them). Torch-free at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from trainctl.penalties import build_agc, build_penalties
from trainctl.registry import Registry
from trainctl.sharpness import build_sam

if TYPE_CHECKING:
    import torch


class StepWrapper:
    """Base class: leaves the gradients alone."""

    name = "step_wrapper"
    recomputes = False
    """Whether :meth:`before_step` calls ``recompute`` (refused under fp16's loss scaler)."""

    def before_step(self, params: List["torch.Tensor"], recompute: Callable[[], None]) -> None:
        """Change the gradients in ``p.grad`` of ``params`` (the trainable parameters)."""

    def log_values(self) -> Dict[str, float]:
        """At each training log step: values to add to the record (e.g. a penalty's size)."""
        return {}

    def bind(self, model: "torch.nn.Module") -> None:
        """Once, with the bare model, before training: resolve parameter names (patterns)."""


@dataclass(frozen=True)
class StepWrapperEntry:
    build: Callable[[Any], Optional[StepWrapper]]
    """The run spec -> the wrapper it asks for, or None."""
    order: int = 50
    """Wrappers act in increasing order (ties: by name)."""


STEP_WRAPPERS: Registry[StepWrapperEntry] = Registry("step wrapper")
"""Every optimizer-step wrapper trainctl knows; each decides from the run spec whether it is on."""
STEP_WRAPPERS.add("sam", StepWrapperEntry(build_sam, order=10))
STEP_WRAPPERS.add("penalties", StepWrapperEntry(build_penalties, order=20))
STEP_WRAPPERS.add("agc", StepWrapperEntry(build_agc, order=30))


def build_step_wrappers(spec: Any, scaled: bool, model: Optional["torch.nn.Module"] = None) -> List[StepWrapper]:
    """The wrappers ``spec`` turns on, in order. ``scaled``: the precision uses a loss scaler; ``model``:
    the bare model, which each wrapper is bound to."""
    from trainctl.errors import ConfigError

    entries = sorted(STEP_WRAPPERS.items(), key=lambda item: (item[1].order, item[0]))
    wrappers = [w for w in (entry.build(spec) for _, entry in entries) if w is not None]
    for wrapper in wrappers:
        if wrapper.recomputes and scaled:
            raise ConfigError("precision", f"{wrapper.name} takes a second forward/backward pass, which fp16's "
                              "loss scaler cannot unscale twice in one step", "set precision=bf16 (or fp32)")
        if model is not None and hasattr(wrapper, "bind"):
            wrapper.bind(model)
    return wrappers
