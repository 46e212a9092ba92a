"""Weight initialisation of the built-in models (`model.init`), through ``torch.nn.init``.

A scheme re-draws the weight of every ``nn.Linear`` and convolution of a freshly built network and sets
their biases to zero; normalisation layers keep their ones and zeros. Embedding tables are lookups, not
linear maps of an activation, so fan-based schemes do not apply to them: they keep the model's own
initialisation, except under ``normal`` (every weight from N(0, init_std)). A linear layer that shares
its weight with an embedding (the GPT's tied head) is an embedding for this purpose.

``default`` leaves the network as its constructor made it (torch's layer defaults for mlp and cnn;
N(0, 0.02) with GPT-2's scaled residual projections for gpt). The scheme runs before `model.init_from`,
so weights loaded from a file replace what it drew.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

if TYPE_CHECKING:
    from torch import nn

SCHEMES = ("default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal",
           "normal")
LEAKY_RELU_SLOPE = 0.01
"""Negative slope of the built-in models' leaky_relu (torch's default)."""


def kaiming_nonlinearity(activation: str) -> Tuple[str, float]:
    """(nonlinearity, a) for ``torch.nn.init.kaiming_*_`` after ``activation``. torch has no gain for gelu
    and silu; they are close to relu for positive inputs and get relu's gain, sqrt(2)."""
    if activation == "leaky_relu":
        return "leaky_relu", LEAKY_RELU_SLOPE
    if activation == "tanh":
        return "tanh", 0.0
    return "relu", 0.0


def initialize(model: "nn.Module", scheme: str, std: float = 0.02, gain: float = 1.0,
               activation: str = "relu") -> int:
    """Apply ``scheme`` to ``model`` in place (draws from torch's global RNG, in module order); returns
    the number of weight tensors it re-drew."""
    if scheme == "default":
        return 0
    from torch import nn

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    nonlinearity, slope = kaiming_nonlinearity(activation)
    drawn = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            if scheme == "normal":
                nn.init.normal_(module.weight, mean=0.0, std=std)
                drawn += 1
            continue
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        if id(module.weight) not in embeddings:
            weight = module.weight
            if scheme == "xavier_uniform":
                nn.init.xavier_uniform_(weight, gain=gain)
            elif scheme == "xavier_normal":
                nn.init.xavier_normal_(weight, gain=gain)
            elif scheme == "kaiming_uniform":
                nn.init.kaiming_uniform_(weight, a=slope, mode="fan_in", nonlinearity=nonlinearity)
            elif scheme == "kaiming_normal":
                nn.init.kaiming_normal_(weight, a=slope, mode="fan_in", nonlinearity=nonlinearity)
            elif scheme == "orthogonal":
                nn.init.orthogonal_(weight, gain=gain)
            elif scheme == "normal":
                nn.init.normal_(weight, mean=0.0, std=std)
            else:
                raise ValueError(f"unknown initialisation scheme {scheme!r}")
            drawn += 1
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    return drawn
