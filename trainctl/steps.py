"""Optimizer-step wrappers: methods that act on an optimizer step's gradients before they are clipped
and applied - rescaling them (adaptive gradient clipping) or replacing them with the gradients of a
second forward/backward pass at other weights (sharpness-aware minimisation).

The precision policy calls every wrapper after the accumulation window's backward and after the loss
scaler unscaled the gradients, before clipping: ``before_step(params, recompute)``. ``recompute()``
runs the window's forward and backward again (same micro-batches, same accumulation scaling, the
gradient exchange of DDP/FSDP on its last micro-batch) into freshly zeroed gradients. A wrapper that
recomputes cannot run under a loss scaler (the scaler unscales a step's gradients once).

A wrapper is one class plus a registry entry whose ``build(run_spec)`` returns it when the spec asks for
it (None otherwise), and its setting in a group's YAML. Torch-free at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, List, Optional

from trainctl.registry import Registry

if TYPE_CHECKING:
    import torch


class StepWrapper:
    """Base class: leaves the gradients alone."""

    name = "step_wrapper"
    recomputes = False
    """Whether :meth:`before_step` calls ``recompute`` (refused under fp16's loss scaler)."""

    def before_step(self, params: List["torch.Tensor"], recompute: Callable[[], None]) -> None:
        """Change the gradients in ``p.grad`` of ``params`` (the trainable parameters)."""


@dataclass(frozen=True)
class StepWrapperEntry:
    build: Callable[[Any], Optional[StepWrapper]]
    """The run spec -> the wrapper it asks for, or None."""


STEP_WRAPPERS: Registry[StepWrapperEntry] = Registry("step wrapper")
"""Every optimizer-step wrapper trainctl knows; each decides from the run spec whether it is on."""


def build_step_wrappers(spec: Any, scaled: bool) -> List[StepWrapper]:
    """The wrappers ``spec`` turns on, in registry order. ``scaled``: the precision uses a loss scaler."""
    from trainctl.errors import ConfigError

    wrappers = [w for w in (entry.build(spec) for _, entry in STEP_WRAPPERS.items()) if w is not None]
    for wrapper in wrappers:
        if wrapper.recomputes and scaled:
            raise ConfigError("precision", f"{wrapper.name} takes a second forward/backward pass, which fp16's "
                              "loss scaler cannot unscale twice in one step", "set precision=bf16 (or fp32)")
    return wrappers
