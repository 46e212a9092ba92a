"""Built-in networks: an MLP for vectors, a small CNN for images, a decoder-only GPT for tokens.

Each keeps its repeated units in a ``blocks`` ModuleList and its output layer in ``head``, so
per-block features (activation checkpointing, Muon's hidden-matrix split) find them by name.
"""

from __future__ import annotations

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


def dropout(p: float) -> nn.Module:
    # Identity when off: an nn.Dropout(0) still costs a kernel launch per call.
    return nn.Dropout(p) if p > 0 else nn.Identity()
