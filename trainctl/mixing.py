"""Mixup and CutMix: batch transforms that blend each training sample with a partner from its own
micro-batch and blend the targets by the same weights, so the classification loss trains on class
probabilities (soft targets). Evaluation never sees them.

Two options of the `transforms` group, one class: `transforms=[mixup]` (mixup on, cutmix off) and
`transforms=[cutmix]` (cutmix on, mixup off). Setting both alphas in one of them picks one method per
batch (`switch_p`), as timm's `Mixup` does; listing both (`transforms=[mixup,cutmix]`) applies them
one after the other, and the second mixes the soft targets of the first as they are.

Per mixed batch, in this order, from torch's global (CPU) generator, whose state every checkpoint
holds: whether the batch is mixed (one ``torch.rand`` when ``p < 1``), whether it is cutmix (one
``torch.rand`` when both alphas are > 0), ``lam ~ Beta(alpha, alpha)``, the partners
(``torch.randperm(batch)``), and for cutmix the box centre (``torch.randint(H)``, ``torch.randint(W)``).
Nothing is drawn on the device and nothing is read back from it.

Mixup: ``x = lam * x + (1 - lam) * x[perm]``. CutMix: a box of about ``(1 - lam)`` of the image area
centred at a uniform point and clipped to the image takes the partner's pixels; the target weight is
the box's exact share of the image after clipping. Targets: class ids become one-hot rows over the
data's classes, class probabilities are taken as they are, and both are blended with the same weight.

This module imports nothing of :mod:`trainctl.transforms` (which registers the two options), so the
two have no import cycle; specs are torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Tuple

from trainctl.errors import ConfigError, check

if TYPE_CHECKING:
    import torch

    from trainctl.arrays import DataInfo


@dataclass
class MixSpec:
    """Settings shared by `transforms.mixup` and `transforms.cutmix` (they differ in their defaults)."""

    mixup_alpha: float = 0.0
    """Mixup's Beta(alpha, alpha) for the blend weight; 0 turns mixup off. 0.2 (the mixup paper's ImageNet value)
    to 0.8 (DeiT's); larger values blend more evenly."""
    cutmix_alpha: float = 0.0
    """CutMix's Beta(alpha, alpha) for the kept share of the image; 0 turns cutmix off; 1.0 is usual."""
    p: float = 1.0
    """Probability that a batch is mixed at all (the others train unchanged, with their hard labels)."""
    switch_p: float = 0.5
    """When both alphas are > 0: the probability that a mixed batch gets cutmix rather than mixup."""

    main = "mixup_alpha"  # the option's own alpha (class attributes, not settings)
    usual = 0.2

    def validate(self, key: str = "transforms.mixup") -> None:
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            check(value >= 0, f"{key}.{name}", f"must be >= 0 (got {value}; 0 turns it off)", f"set {key}.{name}=0")
        check(self.mixup_alpha > 0 or self.cutmix_alpha > 0, f"{key}.{self.main}",
              "is 0, and so is the other alpha: nothing would be mixed", f"set {key}.{self.main}={self.usual}")
        check(0 <= self.p <= 1, f"{key}.p", f"must be in [0, 1] (got {self.p})", f"set {key}.p=1.0")
        check(0 <= self.switch_p <= 1, f"{key}.switch_p", f"must be in [0, 1] (got {self.switch_p})",
              f"set {key}.switch_p=0.5")


@dataclass
class MixupSpec(MixSpec):
    """Mixup: blend each sample and its one-hot target with a partner's (features or images)."""

    mixup_alpha: float = 0.2
    cutmix_alpha: float = 0.0


@dataclass
class CutmixSpec(MixSpec):
    """CutMix: paste a box of a partner image into each image; targets weighted by the pasted area."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 1.0

    main = "cutmix_alpha"
    usual = 1.0


class Mix:
    """A batch transform (``__call__(x, y) -> (x, y)``, see :mod:`trainctl.transforms`) doing mixup
    and/or cutmix on one classification micro-batch."""

    def __init__(self, name: str, mixup_alpha: float, cutmix_alpha: float, p: float, switch_p: float,
                 num_classes: int) -> None:
        import torch

        self.name = name
        self.p, self.switch_p, self.num_classes = p, switch_p, num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self._beta = {alpha: torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
                      for alpha in {mixup_alpha, cutmix_alpha} if alpha > 0}

    def __call__(self, x: "torch.Tensor", y: "torch.Tensor") -> Tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        if not x.is_floating_point():
            raise ConfigError(f"transforms.{self.name}", f"mixes real-valued inputs, and this data's inputs are "
                              f"{x.dtype} (token ids?)", f"drop {self.name} from transforms=[...]")
        if self.p < 1 and not float(torch.rand(())) < self.p:
            return x, y
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or float(torch.rand(())) < self.switch_p)
        lam = float(self._beta[self.cutmix_alpha if cutmix else self.mixup_alpha].sample())
        perm = torch.randperm(x.shape[0]).to(x.device, non_blocking=True)
        if cutmix:
            x, lam = cut_and_paste(x, perm, lam)
        else:
            x = x.mul(lam).add_(x.index_select(0, perm), alpha=1.0 - lam)
        return x, self.mixed_targets(y, perm, lam)

    def mixed_targets(self, y: "torch.Tensor", perm: "torch.Tensor", lam: float) -> "torch.Tensor":
        """``lam * t + (1 - lam) * t[perm]`` with ``t`` the class probabilities of ``y``."""
        import torch.nn.functional as F

        probs = y if y.is_floating_point() else F.one_hot(y, self.num_classes).float()
        return probs.mul(lam).add_(probs.index_select(0, perm.to(probs.device)), alpha=1.0 - lam)


def cutmix_box(lam: float, height: int, width: int) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box of about ``1 - lam`` of the image, centred at a uniform random
    pixel (drawn here) and clipped to the image."""
    import torch

    cut = math.sqrt(1.0 - lam)
    box_h, box_w = int(height * cut), int(width * cut)
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    top, left = cy - box_h // 2, cx - box_w // 2
    return (max(top, 0), min(top + box_h, height), max(left, 0), min(left + box_w, width))


def cut_and_paste(x: "torch.Tensor", perm: "torch.Tensor", lam: float) -> Tuple["torch.Tensor", float]:
    """Images ``x`` (N, C, H, W) with one box taken from their partners ``x[perm]``, and the share of each
    image that is still its own (the target weight)."""
    height, width = x.shape[-2], x.shape[-1]
    top, bottom, left, right = cutmix_box(lam, height, width)
    out = x.clone()
    out[..., top:bottom, left:right] = x[..., top:bottom, left:right].index_select(0, perm)
    return out, 1.0 - (bottom - top) * (right - left) / (height * width)


def build_mix(name: str) -> Any:
    """The builder of option ``name``: (spec, data info) -> :class:`Mix`, refusing what cannot be mixed."""

    def build(spec: MixSpec, info: "DataInfo") -> Mix:
        key = f"transforms.{name}"
        check(info.num_classes >= 2, key, "mixes class labels, and this data has none", f"drop {name} from "
              "transforms=[...]")
        if spec.cutmix_alpha > 0:
            shape = tuple(info.input_shape)
            fix = (f"set {key}.cutmix_alpha=0" if spec.mixup_alpha > 0 else
                   f"use transforms=[mixup] instead of {name}") + " (mixup also works on feature vectors)"
            check(len(shape) == 3, key if name == "cutmix" else f"{key}.cutmix_alpha", f"cutmix pastes boxes "
                  f"of images (C, H, W), and data samples of shape {shape} are not images", fix)
        return Mix(name, spec.mixup_alpha, spec.cutmix_alpha, spec.p, spec.switch_p, info.num_classes)
    return build
