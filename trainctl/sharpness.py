"""Sharpness-aware minimisation (SAM, Foret et al. 2021) and its adaptive variant (ASAM, Kwon et al. 2021)
as an optimizer-step wrapper around whichever optimizer is configured (`regularization.sam_rho`).

With the window's gradient g already in ``p.grad`` (after the gradient exchange of DDP/FSDP, unscaled):

    SAM:  e = rho * g / ||g||                 ASAM: e = rho * T^2 g / ||T g||,  T = |w| + eta
    w <- w + e;  recompute the window's forward/backward at w + e;  w <- w (restored exactly)

and the optimizer then steps from w with the gradient taken at w + e (clipping comes after). The norm is
the global one over every trainable parameter. Batch-norm running statistics are restored after the
second pass, so they are updated once per window as without SAM. Dropout draws new masks in the second
pass (from the seeded generator, so a resumed run draws the same ones).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

if TYPE_CHECKING:
    import torch


class SAM:
    """The SAM/ASAM step wrapper (see the module docstring)."""

    recomputes = True

    def __init__(self, rho: float, adaptive: bool = False, eta: float = 0.01) -> None:
        self.rho, self.adaptive, self.eta = rho, adaptive, eta
        self.name = "asam" if adaptive else "sam"
        self._norm_layers: Optional[List[Any]] = None
        """Batch-norm layers with running statistics (None until bound to the model)."""

    def bind(self, model: "torch.nn.Module") -> None:
        from torch.nn.modules.batchnorm import _NormBase

        self._norm_layers = [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]

    def log_values(self) -> Dict[str, float]:
        return {}

    def before_step(self, params: List["torch.Tensor"], recompute: Callable[[], None]) -> None:
        import torch

        if self._norm_layers is None:
            raise RuntimeError("the SAM step wrapper was not bound to the model (build_step_wrappers(..., model))")
        live = [p for p in params if p.grad is not None]
        if not live:
            recompute()
            return
        local = _locals(live)
        with torch.no_grad():
            saved = [t.detach().clone() for t in local]
            torch._foreach_add_(local, self.perturbation(live))
            stats = [(b, b.clone()) for m in self._norm_layers for b in m.buffers() if b is not None]
        try:
            recompute()  # fresh gradients at w + e, into zeroed p.grad
        finally:
            with torch.no_grad():
                torch._foreach_copy_(local, saved)
                for buffer, value in stats:
                    buffer.copy_(value)

    def perturbation(self, live: List["torch.Tensor"]) -> List["torch.Tensor"]:
        """e for each parameter in ``live`` (its local shard under FSDP), computed in place in their gradients
        (replaced by recompute)."""
        import torch

        grads = [p.grad for p in live]
        local = _locals(grads)
        if self.adaptive:
            scale = torch._foreach_abs(_locals(live))
            torch._foreach_add_(scale, self.eta)  # T = |w| + eta
            torch._foreach_mul_(local, scale)  # T g
            norm = _global_norm(grads)
            torch._foreach_mul_(local, scale)  # T^2 g
        else:
            norm = _global_norm(grads)
        torch._foreach_mul_(local, self.rho / (norm + 1e-12))
        return local


def _locals(tensors: List["torch.Tensor"]) -> List["torch.Tensor"]:
    """Each tensor, or under FSDP this rank's shard of it (sharing its storage): the elementwise steps run
    on the shards as one foreach op each, the norm on the sharded tensors (a global value)."""
    from trainctl.regularization import _local

    return [_local(t) for t in tensors]


def _global_norm(tensors: List["torch.Tensor"]) -> "torch.Tensor":
    """The 2-norm over all ``tensors`` (the global value under FSDP's sharding), in float32."""
    import torch

    from trainctl.regularization import _full

    return _full(torch.nn.utils.get_total_norm([t.float() for t in tensors], foreach=True))


def build_sam(spec: Any) -> Optional[SAM]:
    """`regularization.sam_rho` set: the SAM (or, with `sam_adaptive`, ASAM) wrapper."""
    reg = spec.regularization
    if reg.sam_rho is None:
        return None
    return SAM(reg.sam_rho, reg.sam_adaptive, reg.sam_eta)
