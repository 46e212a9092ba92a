"""The `model` config group: built-in networks (mlp, cnn, gpt) and user models through `_target_`.

Specs and checks are torch-free; :func:`build_model` imports the network it builds. A custom model is
built by :mod:`trainctl.targets`: every `_target_` in it must resolve to an ``nn.Module`` class defined
under an allowed module prefix, so a config cannot reach functions such as ``os.system``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig

from trainctl import targets
from trainctl.errors import ConfigError, check, check_choice
from trainctl.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from trainctl.data import DataInfo

ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "leaky_relu")
AUTO_ARGS = ("input_shape", "in_features", "out_features", "num_classes", "vocab_size", "seq_len")
"""Constructor arguments of a custom model that trainctl fills from the data when the config omits them."""


@dataclass
class MLPSpec:
    """Multi-layer perceptron over flattened inputs (tabular data, small images)."""

    name: str = "mlp"
    depth: int = 2
    """Number of hidden layers."""
    width: int = 256
    """Units per hidden layer."""
    activation: str = "relu"
    """One of relu, gelu, silu, tanh, leaky_relu."""
    dropout: float = 0.1
    """Dropout after each hidden activation (`regularization.dropout` overrides it)."""
    norm: str = "none"
    """Normalisation after each hidden linear layer: none, batch or layer."""

    def validate(self, key: str = "model") -> None:
        check(self.depth >= 0, f"{key}.depth", "must be >= 0", f"set {key}.depth=2")
        check(self.width >= 1, f"{key}.width", "must be >= 1", f"set {key}.width=256")
        check_choice(self.activation, ACTIVATIONS, f"{key}.activation")
        check_choice(self.norm, ("none", "batch", "layer"), f"{key}.norm")
        _check_dropout(self.dropout, f"{key}.dropout")


@dataclass
class CNNSpec:
    """Small convolutional network with batch norm for (C, H, W) images."""

    name: str = "cnn"
    channels: List[int] = field(default_factory=lambda: [32, 64])
    """Output channels of each stage (two convolutions, then 2x2 max-pooling)."""
    kernel_size: int = 3
    """Convolution kernel size (odd, 'same' padding)."""
    activation: str = "relu"
    """One of relu, gelu, silu, tanh, leaky_relu."""
    dropout: float = 0.1
    """Dropout before the head (`regularization.dropout` overrides it)."""
    norm: str = "batch"
    """batch or none."""

    def validate(self, key: str = "model") -> None:
        check(len(self.channels) >= 1 and min(self.channels) >= 1, f"{key}.channels",
              "needs at least one stage with >= 1 channel", f"set {key}.channels=[32,64]")
        check(self.kernel_size >= 1 and self.kernel_size % 2 == 1, f"{key}.kernel_size",
              "must be an odd number >= 1", f"set {key}.kernel_size=3")
        check_choice(self.activation, ACTIVATIONS, f"{key}.activation")
        check_choice(self.norm, ("batch", "none"), f"{key}.norm")
        _check_dropout(self.dropout, f"{key}.dropout")


@dataclass
class GPTSpec:
    """Decoder-only transformer for next-token prediction on token data (`data=text`)."""

    name: str = "gpt"
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads; must divide `d_model`."""
    d_model: int = 128
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residual branches (`regularization.dropout` overrides it)."""
    bias: bool = True
    """Biases in linear and norm layers."""
    tie_weights: bool = True
    """Share the token embedding with the output head."""
    max_seq_len: Optional[int] = None
    """Longest sequence the position embedding covers; null uses `data.seq_len`."""

    def validate(self, key: str = "model") -> None:
        check(self.n_layer >= 1, f"{key}.n_layer", "must be >= 1", f"set {key}.n_layer=4")
        check(self.n_head >= 1 and self.d_model % self.n_head == 0, f"{key}.n_head",
              f"must divide model.d_model={self.d_model}", f"set {key}.n_head=4 and {key}.d_model=128")
        _check_dropout(self.dropout, f"{key}.dropout")
        check(self.max_seq_len is None or self.max_seq_len >= 1, f"{key}.max_seq_len", "must be >= 1 or null",
              f"set {key}.max_seq_len=null")


def _check_dropout(p: float, key: str) -> None:
    check(0.0 <= p < 1.0, key, f"must be in [0, 1) (got {p})", f"set {key}=0.1")


@dataclass(frozen=True)
class ModelEntry:
    spec: type
    tasks: Tuple[str, ...]
    """Data tasks the network can train on."""
    input_rank: Optional[int]
    """Rank of one input sample it needs (3 for images), or None for any."""
    build: Callable[[Any, "DataInfo", int], "nn.Module"]


def _build_mlp(spec: MLPSpec, info: "DataInfo", out_features: int) -> "nn.Module":
    from trainctl.models.mlp import MLP

    return MLP(info.input_shape, out_features, spec.depth, spec.width, spec.activation, spec.dropout, spec.norm)


def _build_cnn(spec: CNNSpec, info: "DataInfo", out_features: int) -> "nn.Module":
    from trainctl.models.cnn import CNN

    return CNN(info.input_shape, out_features, spec.channels, spec.kernel_size, spec.activation, spec.dropout,
               spec.norm)


def _build_gpt(spec: GPTSpec, info: "DataInfo", out_features: int) -> "nn.Module":
    from trainctl.models.gpt import GPT

    seq_len = spec.max_seq_len or info.input_shape[0]
    if seq_len < info.input_shape[0]:
        raise ConfigError("model.max_seq_len", f"{seq_len} is shorter than data.seq_len={info.input_shape[0]}",
                          "set model.max_seq_len=null")
    return GPT(info.vocab_size, seq_len, spec.n_layer, spec.n_head, spec.d_model, spec.dropout, spec.bias,
               spec.tie_weights)


MODELS: Registry[ModelEntry] = Registry("model")
MODELS.add("mlp", ModelEntry(MLPSpec, ("classification", "regression"), None, _build_mlp))
MODELS.add("cnn", ModelEntry(CNNSpec, ("classification", "regression"), 3, _build_cnn))
MODELS.add("gpt", ModelEntry(GPTSpec, ("lm",), None, _build_gpt))


def is_custom(spec: Any) -> bool:
    return isinstance(spec, Mapping) or isinstance(spec, DictConfig)


def model_name(spec: Any) -> str:
    return f"custom ({spec.get('_target_')})" if is_custom(spec) else spec.name


def validate_model(spec: Any, allowed_prefixes: Sequence[str], key: str = "model") -> None:
    if not is_custom(spec):
        spec.validate(key)
        return
    check(isinstance(spec.get("_target_"), str) and spec.get("_target_") not in ("", "???"), f"{key}._target_",
          "a custom model needs the import path of its class", f"set {key}._target_=my_package.MyNet")
    targets.check_paths(spec, key, targets.normalize_prefixes(allowed_prefixes))


def task_compatible(spec: Any, task: str, input_rank: int) -> Optional[str]:
    """Why ``spec`` cannot train on data of ``task``/``input_rank``, or None when it can."""
    if is_custom(spec):
        return None
    entry = MODELS.get(spec.name)
    if task not in entry.tasks:
        return f"model={spec.name} trains on {' or '.join(entry.tasks)} data, not {task}"
    if entry.input_rank is not None and input_rank != entry.input_rank:
        return f"model={spec.name} needs image inputs (C, H, W)"
    return None


def with_dropout(spec: Any, p: Optional[float]) -> Any:
    """The spec with its dropout replaced by `regularization.dropout` (built-in models)."""
    return spec if p is None or is_custom(spec) else replace(spec, dropout=p)


def build_model(spec: Any, info: "DataInfo", out_features: int, base_dir: str,
                allowed_prefixes: Sequence[str] = ()) -> "nn.Module":
    if not is_custom(spec):
        return MODELS.get(spec.name).build(spec, info, out_features)
    return _build_custom(spec, info, out_features, base_dir, allowed_prefixes)


def _build_custom(spec: Mapping, info: "DataInfo", out_features: int, base_dir: str,
                  allowed_prefixes: Sequence[str]) -> "nn.Module":
    from torch import nn

    facts = {"input_shape": tuple(info.input_shape), "in_features": math.prod(info.input_shape),
             "out_features": out_features, "num_classes": out_features, "vocab_size": info.vocab_size,
             "seq_len": info.input_shape[0]}
    return targets.build(spec, "model", targets.normalize_prefixes(allowed_prefixes), nn.Module, base_dir, facts)


def apply_dropout(model: "nn.Module", p: Optional[float]) -> int:
    """Set ``p`` on every nn.Dropout of a custom model; returns how many were changed."""
    if p is None:
        return 0
    from torch import nn

    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = p
            changed += 1
    return changed

