"""The arithmetic of `trainctl merge`: state dicts of one model in, one state dict out. Torch only, no files.

- :func:`weighted_average`: the uniform (or weighted) average of the inputs' weights;
- :func:`greedy_soup`: Wortsman et al. 2022, "Model soups", recipe 1: the inputs sorted by their
  validation metric, best first; each is added to the soup when the average of the soup with it
  scores at least as well as the soup without it, so the soup is never worse than its best member;
- :func:`slerp`: spherical interpolation of two inputs, tensor by tensor, over the flattened weights
  (linear interpolation where the two are nearly parallel); t=0 and t=1 return the endpoints exactly;
- :func:`task_merge`: task arithmetic, TIES, DARE (linear and TIES), magnitude pruning relative to a base,
  with `peft.utils.merge_utils` applied to the task vectors (input - base) of each tensor.

Only floating-point tensors are merged; the others (`num_batches_tracked`) come from the first input.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from trainctl.errors import ConfigError

if TYPE_CHECKING:
    import torch

State = Mapping[str, "torch.Tensor"]
PARALLEL = 0.9995
"""|cos| of the angle above which SLERP falls back to linear interpolation (the vectors are nearly parallel)."""
PEFT_FUNCTIONS = {"task_arithmetic": "task_arithmetic", "ties": "ties", "dare": "dare_linear",
                  "dare_ties": "dare_ties", "magnitude_prune": "magnitude_prune"}
"""`--method` -> the function of `peft.utils.merge_utils` that merges the task vectors."""
DENSE = ("task_arithmetic",)
"""Task-vector methods without a density (they keep every entry)."""


def check_same_model(states: Sequence[State], names: Sequence[str]) -> None:
    """Every state dict holds the first one's tensor names with the same shapes; otherwise name the
    first tensor that differs and where."""
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        fix = "merge runs of one model: the same model.* settings (e.g. not model.width=64 with model.width=128)"
        for key, tensor in first.items():
            if key not in state:
                raise ConfigError(None, f"{name} is not the same model as {names[0]}: it has no tensor '{key}'", fix)
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise ConfigError(None, f"{name} is not the same model as {names[0]}: tensor '{key}' has shape "
                                  f"{list(state[key].shape)}, not {list(tensor.shape)}", fix)
        extra = [key for key in state if key not in first]
        if extra:
            raise ConfigError(None, f"{name} is not the same model as {names[0]}: it has a tensor '{extra[0]}' "
                              f"that {names[0]} has not", fix)


def _float_keys(state: State) -> List[str]:
    return [key for key, tensor in state.items() if tensor.is_floating_point()]


def _assemble(first: State, merged: Dict[str, "torch.Tensor"]) -> Dict[str, "torch.Tensor"]:
    """The merged tensors in the first input's order and dtypes; its own tensors where nothing was merged."""
    return {key: merged[key].to(tensor.dtype) if key in merged else tensor.clone() for key, tensor in first.items()}


def weighted_average(states: Sequence[State], weights: Optional[Sequence[float]] = None) -> Dict[str, "torch.Tensor"]:
    """sum_i w_i * state_i over the floating-point tensors (uniform 1/N without ``weights``), in float32."""
    import torch

    weights = [1.0 / len(states)] * len(states) if weights is None else list(weights)
    keys = _float_keys(states[0])
    total = torch._foreach_mul([states[0][k].float() for k in keys], weights[0])
    for state, weight in zip(states[1:], weights[1:]):
        torch._foreach_add_(total, [state[k].float() for k in keys], alpha=weight)
    return _assemble(states[0], dict(zip(keys, total)))


def slerp_tensor(a: "torch.Tensor", b: "torch.Tensor", t: float) -> "torch.Tensor":
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1) of the flattened tensors, computed in float64:
    sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b with θ the angle between them; linear where |cos θ| > 0.9995
    or either is zero. t=0 and t=1 return copies of the endpoints, bit for bit."""
    import torch

    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    v0, v1 = a.detach().double().flatten(), b.detach().double().flatten()
    n0, n1 = v0.norm(), v1.norm()
    if n0 == 0 or n1 == 0:
        return torch.lerp(v0, v1, t).view(a.shape).to(a.dtype)
    cos = float((v0 @ v1) / (n0 * n1))
    if abs(cos) > PARALLEL:
        return torch.lerp(v0, v1, t).view(a.shape).to(a.dtype)
    theta = math.acos(max(-1.0, min(1.0, cos)))
    sin = math.sin(theta)
    out = v0 * (math.sin((1 - t) * theta) / sin) + v1 * (math.sin(t * theta) / sin)
    return out.view(a.shape).to(a.dtype)


def slerp(a: State, b: State, t: float) -> Dict[str, "torch.Tensor"]:
    """:func:`slerp_tensor` for every floating-point tensor of two inputs."""
    return _assemble(a, {key: slerp_tensor(a[key], b[key], t) for key in _float_keys(a)})


def task_merge(base: State, states: Sequence[State], method: str, weights: Sequence[float], density: float,
               scale: float, seed: int = 0) -> Dict[str, "torch.Tensor"]:
    """base + scale · merge(task vectors), tensor by tensor: the task vectors are input - base (in float32)
    and ``merge`` is peft's function for ``method`` (see :data:`PEFT_FUNCTIONS`) with ``weights`` and
    ``density``. DARE's random drops come from a generator seeded with ``seed`` (the global RNG is left as
    it was), tensors in the state dict's order."""
    import torch
    from peft.utils import merge_utils

    function = getattr(merge_utils, PEFT_FUNCTIONS[method])
    w = torch.tensor(list(weights), dtype=torch.float32)
    merged = {}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that density 1 prunes nothing
        torch.manual_seed(seed)
        for key in _float_keys(states[0]):
            origin = base[key].float()
            tasks = [state[key].float() - origin for state in states]
            delta = function(tasks, w) if method in DENSE else function(tasks, w, density)
            merged[key] = origin + scale * delta
    return _assemble(states[0], merged)


def greedy_soup(states: Sequence[State], scores: Sequence[float], evaluate: Callable[[State, int], float],
                mode: str) -> Tuple[Dict[str, "torch.Tensor"], List[int], float, List[Dict[str, object]]]:
    """(soup, indices of the inputs kept in it, its score, the steps taken). ``scores`` are the inputs' own
    validation scores, ``evaluate(state, index)`` scores the soup with input ``index`` added, ``mode`` is
    "max" or "min"."""
    sign = 1.0 if mode == "max" else -1.0
    order = sorted(range(len(states)), key=lambda i: -sign * scores[i])  # best first; ties keep input order
    kept = [order[0]]
    soup: Dict[str, "torch.Tensor"] = _assemble(states[order[0]], {})
    best = scores[order[0]]
    steps: List[Dict[str, object]] = [{"input": order[0], "soup_score": best, "kept": True}]
    for index in order[1:]:
        candidate = weighted_average([states[i] for i in kept + [index]])
        score = evaluate(candidate, index)
        accept = sign * score >= sign * best  # recipe 1: add when the soup does not get worse
        steps.append({"input": index, "soup_score": score, "kept": accept})
        if accept:
            kept.append(index)
            soup, best = candidate, score
    return soup, kept, best, steps
