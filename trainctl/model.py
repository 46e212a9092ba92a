"""The `model` config group: built-in networks (mlp, cnn, gpt), Hugging Face models from a local
directory (hf) and user models through `_target_`. Every model can start from saved weights
(`model.init_from`, see :mod:`trainctl.pretrained`); the built-in ones can be re-initialised by a scheme
(`model.init`, see :mod:`trainctl.initialization`) before that.

Specs and checks are torch-free; :func:`build_model` imports the network it builds. A custom model is
built by :mod:`trainctl.targets`: every `_target_` in it must resolve to an ``nn.Module`` class defined
under an allowed module prefix, so a config cannot reach functions such as ``os.system``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Sequence, Tuple

from omegaconf import MISSING, DictConfig

from trainctl import targets
from trainctl.errors import ConfigError, check, check_choice
from trainctl.initialization import SCHEMES, initialize
from trainctl.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from trainctl.data import DataInfo

ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "leaky_relu")
AUTO_ARGS = ("input_shape", "in_features", "out_features", "num_classes", "vocab_size", "seq_len")
"""Constructor arguments of a custom model that trainctl fills from the data when the config omits them."""
INIT_KEYS = ("init_from", "init_strict")
"""Keys of a custom model node that trainctl reads itself (not constructor arguments)."""


@dataclass
class ModelSpec:
    """Fields every model shares."""

    name: str = MISSING
    init_from: Optional[str] = None
    """Weights to start from: a `.safetensors` file, a trainctl run directory (its final weights) or a
    checkpoint directory (e.g. RUN_DIR/checkpoints/best); null starts from the model's own initialisation."""
    init_strict: bool = True
    """Every tensor of `init_from` must fit the model exactly; false loads what fits (same name and shape)
    and reports the rest (e.g. a new classification head)."""
    init: str = "default"
    """Initialisation of the built-in models' Linear/Conv weights (biases set to zero, norm layers kept):
    default (the model's own), xavier_uniform, xavier_normal, kaiming_uniform, kaiming_normal (fan_in,
    gain from `model.activation`), orthogonal, normal (N(0, init_std), embeddings too). `init_from`
    weights replace it."""
    init_std: float = 0.02
    """Standard deviation of `model.init=normal`."""
    init_gain: float = 1.0
    """Scale of `model.init=xavier_*` and `orthogonal` (torch.nn.init's `gain`)."""

    def validate_init(self, key: str) -> None:
        if self.init_from is not None:
            check(self.init_from.strip() != "", f"{key}.init_from", "is empty", f"set {key}.init_from=null")
        check_choice(self.init, SCHEMES, f"{key}.init")
        check(self.init_std > 0, f"{key}.init_std", f"must be > 0 (got {self.init_std})", f"set {key}.init_std=0.02")
        check(self.init_gain > 0, f"{key}.init_gain", f"must be > 0 (got {self.init_gain})",
              f"set {key}.init_gain=1.0")

    def resolve_paths(self, base_dir: str) -> None:
        if self.init_from is not None:
            self.init_from = absolute_path(self.init_from, base_dir)


def absolute_path(path: str, base_dir: str) -> str:
    import os

    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


@dataclass
class MLPSpec(ModelSpec):
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
        self.validate_init(key)
        check(self.depth >= 0, f"{key}.depth", "must be >= 0", f"set {key}.depth=2")
        check(self.width >= 1, f"{key}.width", "must be >= 1", f"set {key}.width=256")
        check_choice(self.activation, ACTIVATIONS, f"{key}.activation")
        check_choice(self.norm, ("none", "batch", "layer"), f"{key}.norm")
        _check_dropout(self.dropout, f"{key}.dropout")


@dataclass
class CNNSpec(ModelSpec):
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
        self.validate_init(key)
        check(len(self.channels) >= 1 and min(self.channels) >= 1, f"{key}.channels",
              "needs at least one stage with >= 1 channel", f"set {key}.channels=[32,64]")
        check(self.kernel_size >= 1 and self.kernel_size % 2 == 1, f"{key}.kernel_size",
              "must be an odd number >= 1", f"set {key}.kernel_size=3")
        check_choice(self.activation, ACTIVATIONS, f"{key}.activation")
        check_choice(self.norm, ("batch", "none"), f"{key}.norm")
        _check_dropout(self.dropout, f"{key}.dropout")


@dataclass
class GPTSpec(ModelSpec):
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
    drop_path: float = 0.0
    """Stochastic depth: the rate at which the last block's attention and MLP branches are skipped, per
    sample, in training; block l of L gets drop_path * l/(L-1), the first none (timm's convention)."""

    def validate(self, key: str = "model") -> None:
        self.validate_init(key)
        check(self.n_layer >= 1, f"{key}.n_layer", "must be >= 1", f"set {key}.n_layer=4")
        check(0.0 <= self.drop_path < 1.0, f"{key}.drop_path", f"must be in [0, 1) (got {self.drop_path})",
              f"set {key}.drop_path=0.1")
        check(self.drop_path == 0 or self.n_layer >= 2, f"{key}.drop_path",
              f"has no effect with {key}.n_layer=1: the first block is never dropped",
              f"set {key}.n_layer=2 or more, or {key}.drop_path=0")
        check(self.n_head >= 1 and self.d_model % self.n_head == 0, f"{key}.n_head",
              f"must divide model.d_model={self.d_model}", f"set {key}.n_head=4 and {key}.d_model=128")
        _check_dropout(self.dropout, f"{key}.dropout")
        check(self.max_seq_len is None or self.max_seq_len >= 1, f"{key}.max_seq_len", "must be >= 1 or null",
              f"set {key}.max_seq_len=null")


HF_TASKS = ("auto", "causal_lm", "sequence_classification")


@dataclass
class HFSpec(ModelSpec):
    """A Hugging Face `transformers` model from a local directory (`save_pretrained` layout); never
    downloaded. Needs `pip install 'trainctl[hf]'`."""

    name: str = "hf"
    path: str = MISSING
    """The model's directory (config.json and weights); relative paths are taken from the directory the
    command runs in."""
    task: str = "auto"
    """causal_lm (next-token prediction), sequence_classification (a label per text; the number of
    labels comes from the data), or auto: from the data's task."""
    dropout: Optional[float] = None
    """Dropout of the model's own dropout layers; null keeps the values in its config
    (`regularization.dropout` overrides it)."""

    def validate(self, key: str = "model") -> None:
        self.validate_init(key)
        check(self.init == "default", f"{key}.init",
              f"re-initialising a Hugging Face model would discard the weights in {key}.path",
              f"set {key}.init=default")
        check_choice(self.task, HF_TASKS, f"{key}.task")
        path = Path(self.path)
        check(path.is_dir(), f"{key}.path", f"{self.path} is not a directory",
              f"set {key}.path to a directory written by save_pretrained (config.json and weights)")
        check((path / "config.json").is_file(), f"{key}.path", f"{self.path} has no config.json",
              f"set {key}.path to a directory written by save_pretrained")
        check(self.dropout is None or 0 <= self.dropout < 1, f"{key}.dropout", "must be in [0, 1) or null",
              f"set {key}.dropout=null")

    def resolve_paths(self, base_dir: str) -> None:
        super().resolve_paths(base_dir)
        self.path = absolute_path(self.path, base_dir)

    def hf_task(self, data_task: str) -> str:
        if self.task != "auto":
            return self.task
        return "causal_lm" if data_task == "lm" else "sequence_classification"


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
    tokens: bool = False
    """Whether it reads token ids (text data) rather than numeric features."""


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
               spec.tie_weights, spec.drop_path)


def _build_hf(spec: HFSpec, info: "DataInfo", out_features: int) -> "nn.Module":
    from trainctl.hf import build_hf_model

    model = build_hf_model(spec, info, out_features)
    apply_dropout(model, spec.dropout)  # null keeps the model's own
    return model


MODELS: Registry[ModelEntry] = Registry("model")
MODELS.add("mlp", ModelEntry(MLPSpec, ("classification", "regression"), None, _build_mlp))
MODELS.add("cnn", ModelEntry(CNNSpec, ("classification", "regression"), 3, _build_cnn))
MODELS.add("gpt", ModelEntry(GPTSpec, ("lm",), None, _build_gpt, tokens=True))
MODELS.add("hf", ModelEntry(HFSpec, ("lm", "classification"), None, _build_hf, tokens=True))


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
    init_from, strict = spec.get("init_from"), spec.get("init_strict", True)
    check(init_from is None or (isinstance(init_from, str) and init_from.strip() != ""), f"{key}.init_from",
          "must be a path or null", f"set {key}.init_from=null")
    check(isinstance(strict, bool), f"{key}.init_strict", "must be true or false", f"set {key}.init_strict=true")
    targets.check_paths(constructor_args(spec), key, targets.normalize_prefixes(allowed_prefixes))


def constructor_args(spec: Mapping) -> dict:
    """A custom model node without the keys trainctl reads itself (`init_from`, `init_strict`)."""
    return {k: v for k, v in spec.items() if k not in INIT_KEYS}


def init_settings(spec: Any) -> Tuple[Optional[str], bool]:
    """(`model.init_from`, `model.init_strict`) of any model spec."""
    if is_custom(spec):
        return spec.get("init_from"), bool(spec.get("init_strict", True))
    return spec.init_from, spec.init_strict


def task_compatible(spec: Any, task: str, input_rank: int, tokens: bool = False) -> Optional[str]:
    """Why ``spec`` cannot train on data of ``task``/``input_rank`` (token ids when ``tokens``), or None
    when it can."""
    if is_custom(spec):
        return None
    entry = MODELS.get(spec.name)
    if task not in entry.tasks:
        return f"model={spec.name} trains on {' or '.join(entry.tasks)} data, not {task}"
    if tokens != entry.tokens:
        return (f"model={spec.name} reads numeric features, not token ids" if tokens
                else f"model={spec.name} reads token ids, not numeric features")
    if entry.input_rank is not None and input_rank != entry.input_rank:
        return f"model={spec.name} needs image inputs (C, H, W)"
    return None


def with_dropout(spec: Any, p: Optional[float]) -> Any:
    """The spec with its dropout replaced by `regularization.dropout` (built-in models)."""
    return spec if p is None or is_custom(spec) else replace(spec, dropout=p)


def build_model(spec: Any, info: "DataInfo", out_features: int, base_dir: str,
                allowed_prefixes: Sequence[str] = ()) -> "nn.Module":
    """The network of ``spec``; a built-in one gets its `model.init` scheme (before any `init_from`)."""
    if is_custom(spec):
        return _build_custom(spec, info, out_features, base_dir, allowed_prefixes)
    model = MODELS.get(spec.name).build(spec, info, out_features)
    if spec.init != "default":
        # The GPT's only activation is GELU, which kaiming treats as relu.
        initialize(model, spec.init, spec.init_std, spec.init_gain, getattr(spec, "activation", "gelu"))
    return model


def _build_custom(spec: Mapping, info: "DataInfo", out_features: int, base_dir: str,
                  allowed_prefixes: Sequence[str]) -> "nn.Module":
    from torch import nn

    facts = {"input_shape": tuple(info.input_shape), "in_features": math.prod(info.input_shape),
             "out_features": out_features, "num_classes": out_features, "vocab_size": info.vocab_size,
             "seq_len": info.input_shape[0]}
    return targets.build(constructor_args(spec), "model", targets.normalize_prefixes(allowed_prefixes), nn.Module,
                         base_dir, facts)


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

