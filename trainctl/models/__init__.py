"""Built-in networks: an MLP for vectors, a small CNN for images, a decoder-only GPT for tokens.

Each keeps its repeated units in a ``blocks`` ModuleList and its output layer in ``head``, so per-block
features (activation checkpointing, Muon's hidden-matrix split) find them by name. Only the GPT is residual,
so stochastic depth (:class:`DropPath`) exists on it alone.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


def dropout(p: float) -> nn.Module:
    # Identity when off: an nn.Dropout(0) still costs a kernel launch per call.
    return nn.Dropout(p) if p > 0 else nn.Identity()


class DropPath(nn.Module):
    """Stochastic depth on a residual branch: in training, each sample's branch output is zeroed with
    probability ``p`` and the kept ones are scaled by 1/(1-p), so its expectation is unchanged; identity in
    eval mode. The per-sample mask comes from torch's global RNG, like dropout's."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path(p: float) -> nn.Module:
    return DropPath(p) if p > 0 else nn.Identity()


def drop_path_rates(rate: float, depth: int) -> list:
    """Rate of each of ``depth`` residual blocks: linear from 0 (first block) to ``rate`` (last), as in
    timm and torchvision (``rate * l / (depth - 1)``)."""
    return [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
