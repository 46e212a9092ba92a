"""L1 / coupled L2 penalties and adaptive gradient clipping (AGC) as optimizer-step wrappers.

Penalties (`regularization.l1`, `regularization.l2`): ``g <- g + l1 * sign(w) + l2 * w`` on the chosen
parameters, the gradient of ``l1 * sum|w| + l2/2 * sum w^2`` added to the loss, so the optimizer sees
it (coupled; AdamW's weight decay is decoupled instead). The penalty's value is logged as
`train/penalty` at log steps only, apart from the data loss `train/loss`.

AGC (Brock et al. 2021, `regularization.agc_clipping`): for each unit i of a parameter (a row along
dim 0 of a Linear/Conv/embedding weight; the whole tensor for vectors and scalars), when
``||G_i|| > clipping * max(||W_i||, eps)`` the unit's gradient is rescaled to that norm; units under
the threshold are left exactly as they were.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

if TYPE_CHECKING:
    import torch


class _Selective:
    """A wrapper acting on the parameters a rule picks; name patterns are resolved when bound."""

    name = "selective"
    recomputes = False
    patterns: Optional[List[str]] = None
    """Name patterns the wrapper needs resolved against the model (None: decided per tensor)."""

    def __init__(self) -> None:
        self._chosen: Optional[set] = None
        """ids of the chosen parameters (after :meth:`bind`)."""
        self._cache: Optional[tuple] = None

    def choose(self, name: str, param: "torch.Tensor") -> bool:
        raise NotImplementedError

    def bind(self, model: "torch.nn.Module") -> None:
        from trainctl.performance import clean_name

        named = [(clean_name(n), p) for n, p in model.named_parameters()]
        self._chosen = {id(p) for n, p in named if self.choose(n, p)}
        if self.patterns:
            self._check_patterns([n for n, _ in named])

    def _check_patterns(self, names: List[str]) -> None:
        from trainctl.errors import ConfigError
        from trainctl.regularization import matches

        assert self.patterns is not None
        unused = [p for p in self.patterns if not any(matches(n, [p]) for n in names)]
        if unused:
            raise ConfigError(self.key, f"pattern '{unused[0]}' matches no parameter name (they are "
                              f"{', '.join(names[:2])}, ..., {names[-1]})",
                              f"set {self.key} to patterns of these names, e.g. ['{names[-1].split('.')[0]}.*']")

    key = "regularization"

    def chosen(self, params: List["torch.Tensor"]) -> List["torch.Tensor"]:
        """The chosen ones of ``params`` (worked out once per parameter list)."""
        if self._cache is None or self._cache[0] is not params:
            if self._chosen is None and self.patterns:
                raise RuntimeError(f"the {self.name} step wrapper was not bound to the model")
            picked = [p for p in params if (id(p) in self._chosen if self._chosen is not None
                                            else self.choose("", p))]
            self._cache = (params, picked)
        return self._cache[1]

    def log_values(self) -> Dict[str, float]:
        return {}


class Penalties(_Selective):
    """Coupled L1 and L2 penalties on the chosen parameters (see the module docstring)."""

    name = "penalties"
    key = "regularization.penalty_params"

    def __init__(self, reg: Any) -> None:
        super().__init__()
        self.l1, self.l2, self.reg = reg.l1, reg.l2, reg
        self.patterns = reg.penalty_params
        self._params: List["torch.Tensor"] = []

    def choose(self, name: str, param: "torch.Tensor") -> bool:
        return self.reg.penalized(name, param)

    def before_step(self, params: List["torch.Tensor"], recompute: Callable[[], None]) -> None:
        import torch

        self._params = self.chosen(params)
        live = [p for p in self._params if p.grad is not None]
        if not live:
            return
        grads = [p.grad for p in live]
        with torch.no_grad():
            if self.l1:
                torch._foreach_add_(grads, torch._foreach_sign(live), alpha=self.l1)
            if self.l2:
                torch._foreach_add_(grads, live, alpha=self.l2)

    def penalty(self) -> "torch.Tensor":
        """l1 * sum|w| + l2/2 * sum w^2 over the chosen parameters (a tensor on their device)."""
        import torch

        from trainctl.regularization import _full

        with torch.no_grad():
            value = torch.zeros((), device=self._params[0].device)
            if self.l1:
                value = value + self.l1 * _full(torch.nn.utils.get_total_norm(self._params, norm_type=1.0))
            if self.l2:
                value = value + self.l2 / 2 * _full(torch.nn.utils.get_total_norm(self._params)) ** 2
        return value

    def log_values(self) -> Dict[str, float]:
        if not self._params:
            return {}
        return {"train/penalty": float(self.penalty())}


class AGC(_Selective):
    """Adaptive gradient clipping, unit-wise (see the module docstring)."""

    name = "agc"
    key = "regularization.agc_exclude"

    def __init__(self, clipping: float, eps: float, exclude: List[str]) -> None:
        super().__init__()
        self.clipping, self.eps = clipping, eps
        self.patterns = list(exclude)

    def choose(self, name: str, param: "torch.Tensor") -> bool:
        from trainctl.regularization import matches

        return not matches(name, self.patterns or [])

    def before_step(self, params: List["torch.Tensor"], recompute: Callable[[], None]) -> None:
        import torch

        with torch.no_grad():
            for p in self.chosen(params):
                if p.grad is not None:
                    clip_unitwise_(p, p.grad, self.clipping, self.eps)


def unit_norms(t: "torch.Tensor") -> "torch.Tensor":
    """The 2-norm of each unit of ``t`` (rows along dim 0; the whole tensor when it has < 2 dims), in
    float32, shaped to broadcast against ``t``."""
    import torch

    if t.ndim < 2:
        return torch.linalg.vector_norm(t, dtype=torch.float32)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), keepdim=True, dtype=torch.float32)


def clip_unitwise_(w: "torch.Tensor", g: "torch.Tensor", clipping: float, eps: float) -> None:
    """AGC on one parameter: rescale, in place, the units of ``g`` whose norm exceeds
    ``clipping * max(||w_i||, eps)`` to that norm."""
    import torch

    limit = unit_norms(w).clamp_min(eps) * clipping  # out of place: a sharded vector's norm is a partial sum
    norm = unit_norms(g)
    factor = torch.where(norm > limit, limit / norm.clamp_min(1e-12), 1.0)
    g.mul_(factor.to(g.dtype))


def build_penalties(spec: Any) -> Optional[Penalties]:
    """`regularization.l1` or `regularization.l2` > 0: the penalties wrapper."""
    reg = spec.regularization
    return Penalties(reg) if reg.l1 > 0 or reg.l2 > 0 else None


def build_agc(spec: Any) -> Optional[AGC]:
    """`regularization.agc_clipping` set: the AGC wrapper."""
    reg = spec.regularization
    return None if reg.agc_clipping is None else AGC(reg.agc_clipping, reg.agc_eps, reg.agc_exclude)
