"""`data=images`: image files — a folder of class subfolders (the ImageFolder layout, optionally with
`train/` and `val/` inside) or a CSV of path,label — decoded, resized, augmented (training split only)
and normalised one sample at a time, in DataLoader workers when `data.num_workers > 0`.

Decoding is Pillow's. Augmentation is a few lines of torch on each (C, H, W) sample: torchvision's PyPI
wheels do not load beside every torch build (they are built against one release), and a general
augmentation library costs a second at import and milliseconds per sample, which is what bounds the
data-wait share of a small model. Presets:

- ``none``;
- ``light``: a random 4-pixel-padded crop (reflection padding) and a horizontal flip;
- ``standard``: a random resized crop (area 60-100%, aspect 3/4-4/3), a horizontal flip and colour
  jitter (brightness, contrast and saturation, each by up to 20%).

Every random choice draws from torch's generator, which :class:`trainctl.batches.SampleSource` seeds
per (seed, epoch, index): a resumed run sees the augmentations the uninterrupted one saw.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

import numpy as np

from trainctl.arrays import Arrays, DataInfo, split_indices
from trainctl.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from trainctl.data_sources import ImagesSpec

log = logging.getLogger("trainctl")

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
STATS_SAMPLES = 512
"""Training images read to compute the normalisation mean and standard deviation."""


def require_pillow() -> None:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise ConfigError("data", "data=images needs Pillow to decode images, which is not installed",
                          "pip install 'trainctl[images]'") from None


# --- listing -----------------------------------------------------------------------------------------


def class_folders(root: Path) -> List[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder(root: Path, classes: Optional[List[str]] = None) -> Tuple[List[str], List[int], List[str]]:
    """(paths, labels, class names) of a folder of class subfolders."""
    folders = class_folders(root)
    names = classes if classes is not None else [f.name for f in folders]
    paths, labels = [], []
    for folder in folders:
        if folder.name not in names:
            raise ConfigError("data.path", f"{folder} is a class the training folder does not have",
                              "give train/ and val/ the same class folders")
        for file in sorted(folder.rglob("*")):
            if file.suffix.lower() in EXTENSIONS and file.is_file():
                paths.append(str(file))
                labels.append(names.index(folder.name))
    return paths, labels, names


def _table(file: Path, spec: "ImagesSpec") -> Tuple[List[str], List[str]]:
    """(paths, label strings) of a CSV of image paths (relative to the CSV's folder) and labels."""
    with open(file, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t" if file.suffix.lower() == ".tsv" else ","))
    if not rows:
        raise ConfigError("data.path", f"{file} has no rows", "list one image per row: path,label")
    for column, key in ((spec.path_column, "data.path_column"), (spec.label_column, "data.label_column")):
        if column not in rows[0]:
            raise ConfigError(key, f"{file.name} has no column '{column}'; its columns are: {', '.join(rows[0])}",
                              f"set {key}=COLUMN")
    paths = [str((file.parent / r[spec.path_column]).resolve()) for r in rows]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ConfigError("data.path", f"{len(missing)} image(s) listed in {file.name} do not exist, e.g. {missing[0]}",
                          "fix the paths (relative to the CSV's folder)")
    return paths, [r[spec.label_column] for r in rows]


def listing(spec: "ImagesSpec") -> Tuple[List[str], np.ndarray, Optional[List[str]], Optional[np.ndarray], List[str]]:
    """(train paths, train labels, val paths or None, val labels or None, class names)."""
    root = Path(spec.path)
    if root.is_file():
        paths, raw = _table(root, spec)
        names = sorted(set(raw), key=lambda v: (0, int(v)) if v.lstrip("-").isdigit() else (1, v))
        return paths, np.array([names.index(v) for v in raw], dtype=np.int64), None, None, names
    if (root / "train").is_dir() and (root / "val").is_dir():
        paths, labels, names = _folder(root / "train")
        val_paths, val_labels, _ = _folder(root / "val", names)
        return paths, np.array(labels, dtype=np.int64), val_paths, np.array(val_labels, dtype=np.int64), names
    paths, labels, names = _folder(root)
    return paths, np.array(labels, dtype=np.int64), None, None, names


# --- decoding and augmenting ----------------------------------------------------------------------------


def decode(path: str, size: int, channels: int) -> "torch.Tensor":
    """The image at ``path`` as a float (C, size, size) tensor in [0, 1]."""
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ValueError(f"cannot read the image {path}: {exc}") from None
    tensor = torch.from_numpy(array.copy())
    tensor = tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1)
    return tensor.float().div_(255.0)


def _uniform(low: float, high: float) -> float:
    import torch

    return low + (high - low) * float(torch.rand(()))


def augment(x: "torch.Tensor", preset: str) -> "torch.Tensor":
    """One sample's random augmentation (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    if preset == "none":
        return x
    _, h, w = x.shape
    if preset == "light":
        padded = F.pad(x.unsqueeze(0), (4, 4, 4, 4), mode="reflect")[0]
        top, left = int(torch.randint(0, 9, ())), int(torch.randint(0, 9, ()))
        x = padded[:, top:top + h, left:left + w]
    else:
        area = _uniform(0.6, 1.0) * h * w
        ratio = math.exp(_uniform(math.log(3 / 4), math.log(4 / 3)))
        ch = min(h, max(1, round(math.sqrt(area / ratio))))
        cw = min(w, max(1, round(math.sqrt(area * ratio))))
        top, left = int(torch.randint(0, h - ch + 1, ())), int(torch.randint(0, w - cw + 1, ()))
        crop = x[:, top:top + ch, left:left + cw].unsqueeze(0)
        x = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    if float(torch.rand(())) < 0.5:
        x = x.flip(-1)
    if preset == "standard":
        x = x * _uniform(0.8, 1.2)  # brightness
        mean = x.mean()
        x = (x - mean) * _uniform(0.8, 1.2) + mean  # contrast
        if x.shape[0] == 3:
            gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
            x = (x - gray) * _uniform(0.8, 1.2) + gray  # saturation
        x = x.clamp_(0.0, 1.0)
    return x


def _source_class() -> type:
    from trainctl.batches import SampleSource

    class ImageSource(SampleSource):
        """Decoded, augmented (training split) and normalised images, one per index."""

        def __init__(self, paths: List[str], labels: np.ndarray, size: int, channels: int, mean: List[float],
                     std: List[float], preset: str, seed: int) -> None:
            super().__init__(seed)
            self.paths, self.labels, self.size, self.channels = paths, labels, size, channels
            self.mean, self.std, self.preset = mean, std, preset

        def __len__(self) -> int:
            return len(self.paths)

        def fetch(self, i: int) -> Tuple["torch.Tensor", "torch.Tensor"]:
            import torch

            x = augment(decode(self.paths[i], self.size, self.channels), self.preset)
            mean = torch.tensor(self.mean).view(-1, 1, 1)
            std = torch.tensor(self.std).view(-1, 1, 1)
            return (x - mean) / std, torch.tensor(int(self.labels[i]))

    return ImageSource


# --- loading -----------------------------------------------------------------------------------------


def load(spec: "ImagesSpec") -> Arrays:
    require_pillow()
    paths, labels, val_paths, val_labels, names = listing(spec)
    if len(names) < 2:
        raise ConfigError("data.path", f"{spec.path} holds {len(names)} class(es); classification needs two or more",
                          "put each class's images in a folder of its own")
    if val_paths is None:
        tr, va = split_indices(len(paths), spec.val_fraction, spec.seed, labels)
        val_paths, val_labels = [paths[i] for i in va], labels[va]
        paths, labels = [paths[i] for i in tr], labels[tr]
    channels = spec.channels or _channels_of(paths[0])
    mean, std = _statistics(paths, spec, channels) if spec.normalize else ([0.0] * channels, [1.0] * channels)
    source = _source_class()
    train = source(paths, labels, spec.image_size, channels, mean, std, spec.augment, spec.seed)
    val = source(val_paths, val_labels, spec.image_size, channels, mean, std, "none", spec.seed)
    info = DataInfo("classification", (channels, spec.image_size, spec.image_size), num_classes=len(names),
                    n_train=len(paths), n_val=len(val_paths), class_names=tuple(names),
                    class_counts=tuple(int(c) for c in np.bincount(labels, minlength=len(names))))
    log.info("data=images: %d train / %d validation images, %d classes, %dx%dx%d, augment=%s", len(paths),
             len(val_paths), len(names), channels, spec.image_size, spec.image_size, spec.augment)
    empty = np.zeros((0,), dtype=np.float32)
    return Arrays(info, empty, empty, empty, empty, sources=(train, val))


def _channels_of(path: str) -> int:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return 1 if image.mode in ("1", "L", "I", "I;16", "F") else 3
    except OSError as exc:
        raise ConfigError("data.path", f"cannot read the image {path}: {exc}", "remove or replace that file") from None


def _statistics(paths: List[str], spec: "ImagesSpec", channels: int) -> Tuple[List[float], List[float]]:
    """Per-channel mean and standard deviation over up to STATS_SAMPLES training images (a seeded choice)."""
    import torch

    rng = np.random.default_rng(spec.seed)
    chosen = sorted(rng.choice(len(paths), size=min(STATS_SAMPLES, len(paths)), replace=False).tolist())
    try:
        pixels = torch.stack([decode(paths[i], spec.image_size, channels) for i in chosen])
    except ValueError as exc:
        raise ConfigError("data.path", str(exc), "remove or replace that file") from None
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]
