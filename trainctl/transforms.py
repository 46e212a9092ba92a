"""Batch transforms: what happens to a training batch between the data and the forward pass (noise,
token dropout; mixup and cutmix belong here too). A transform gets the inputs and targets of one
micro-batch and returns new ones; targets may come back as class probabilities (soft targets), which
the classification losses accept. Evaluation always sees the untouched batches.

A transform is one class plus a registry entry and a YAML file in `conf/transforms/`; users pick any
number, applied in the order given: `trainctl run 'transforms=[noise]'`. They draw from torch's
global generator, whose state every checkpoint holds, so a resumed run draws what the uninterrupted one
would. Specs are torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Tuple

from trainctl.errors import check
from trainctl.registry import Registry

if TYPE_CHECKING:
    import torch

    from trainctl.data import DataInfo


class Transform:
    """Base class: ``__call__(x, y) -> (x, y)`` on one training micro-batch."""

    name = "transform"

    def __call__(self, x: "torch.Tensor", y: "torch.Tensor") -> Tuple["torch.Tensor", "torch.Tensor"]:
        return x, y


@dataclass(frozen=True)
class TransformEntry:
    spec: type
    """The dataclass of its settings (`transforms.<name>.*`)."""
    build: Callable[[Any, "DataInfo"], Transform]
    tasks: Tuple[str, ...]
    """Data tasks it applies to."""


TRANSFORMS: Registry[TransformEntry] = Registry("transforms")


# --- noise ------------------------------------------------------------------------------------------

@dataclass
class NoiseSpec:
    """Add Gaussian noise to real-valued inputs (images, tabular features)."""

    std: float = 0.1
    """Standard deviation of the noise, in the units of the (standardised) inputs."""
    p: float = 1.0
    """Share of the samples of a batch that get noise."""

    def validate(self, key: str = "transforms.noise") -> None:
        check(self.std > 0, f"{key}.std", f"must be > 0 (got {self.std})", f"set {key}.std=0.1")
        check(0 < self.p <= 1, f"{key}.p", f"must be in (0, 1] (got {self.p})", f"set {key}.p=1.0")


class Noise(Transform):
    name = "noise"

    def __init__(self, std: float, p: float) -> None:
        self.std, self.p = std, p

    def __call__(self, x, y):
        import torch

        noise = torch.randn_like(x) * self.std
        if self.p < 1:
            keep = torch.rand(x.shape[0], device=x.device) < self.p
            noise = noise * keep.view(-1, *([1] * (x.dim() - 1))).to(noise.dtype)
        return x + noise, y


TRANSFORMS.add("noise", TransformEntry(NoiseSpec, lambda spec, info: Noise(spec.std, spec.p),
                                       ("classification", "regression")))


# --- token dropout ------------------------------------------------------------------------------------

@dataclass
class TokenDropoutSpec:
    """Replace a share of the input tokens by random tokens (the targets stay the true next tokens)."""

    p: float = 0.1
    """Probability that an input token is replaced."""

    def validate(self, key: str = "transforms.token_dropout") -> None:
        check(0 < self.p < 1, f"{key}.p", f"must be in (0, 1) (got {self.p})", f"set {key}.p=0.1")


class TokenDropout(Transform):
    name = "token_dropout"

    def __init__(self, p: float, vocab_size: int) -> None:
        self.p, self.vocab_size = p, vocab_size

    def __call__(self, x, y):
        import torch

        replace = torch.rand(x.shape, device=x.device) < self.p
        random = torch.randint_like(x, self.vocab_size)
        return torch.where(replace, random, x), y


TRANSFORMS.add("token_dropout", TransformEntry(TokenDropoutSpec, lambda spec, info: TokenDropout(spec.p, info.vocab_size),
                                               ("lm",)))


# --- mixup and cutmix (trainctl.mixing imports nothing of this module) --------------------------------

from trainctl.mixing import CutmixSpec, MixupSpec, build_mix  # noqa: E402

TRANSFORMS.add("mixup", TransformEntry(MixupSpec, build_mix("mixup"), ("classification",)))
TRANSFORMS.add("cutmix", TransformEntry(CutmixSpec, build_mix("cutmix"), ("classification",)))
