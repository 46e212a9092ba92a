"""A multi-layer perceptron over flattened inputs."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from trainctl.models import activation, dropout


class MLP(nn.Module):
    """``depth`` hidden blocks of Linear -> [norm] -> activation -> [dropout], then a linear head."""

    def __init__(self, input_shape: Sequence[int], out_features: int, depth: int = 2, width: int = 256,
                 activation_name: str = "relu", dropout_p: float = 0.0, norm: str = "none") -> None:
        super().__init__()
        width_in = math.prod(input_shape)
        blocks = []
        for _ in range(depth):
            layers = [nn.Linear(width_in, width)]
            if norm == "batch":
                layers.append(nn.BatchNorm1d(width))
            elif norm == "layer":
                layers.append(nn.LayerNorm(width))
            layers += [activation(activation_name), dropout(dropout_p)]
            blocks.append(nn.Sequential(*layers))
            width_in = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(width_in, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
