"""A small convolutional network with batch norm for (C, H, W) images."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trainctl.models import activation, dropout


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


class CNN(nn.Module):
    """One stage per entry of ``channels``: two 'same' convolutions, then 2x2 max-pooling while the
    image is larger than 1x1; global average pooling and a linear head."""

    def __init__(self, input_shape: Sequence[int], out_features: int, channels: Sequence[int] = (32, 64),
                 kernel_size: int = 3, activation_name: str = "relu", dropout_p: float = 0.0,
                 norm: str = "batch") -> None:
        super().__init__()
        c_in, height, width = input_shape
        bias = norm != "batch"
        blocks = []
        for c_out in channels:
            layers = []
            for c in (c_in, c_out):
                layers += [nn.Conv2d(c, c_out, kernel_size, padding=kernel_size // 2, bias=bias),
                           _norm(norm, c_out), activation(activation_name)]
            if min(height, width) >= 2:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            blocks.append(nn.Sequential(*layers))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), dropout(dropout_p))
        self.head = nn.Linear(c_in, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.pool(x))
