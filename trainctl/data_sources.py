"""Specs of the data users bring (torch-free): their own Datasets (`data=custom`, loaded by
:mod:`trainctl.custom_data`), image files (`data=images`, :mod:`trainctl.images`) and pre-tokenised corpora
(`data=tokens`, :mod:`trainctl.tokens_data` and :mod:`trainctl.token_source`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from trainctl.arrays import Arrays
from trainctl.dataspec import DataSpec
from trainctl.dataspec import absolute as _absolute
from trainctl.errors import check, check_choice


@dataclass
class CustomDataSpec(DataSpec):
    """Your own torch Datasets (see the module docstring)."""

    name: str = "custom"
    _target_: str = MISSING
    """A Dataset subclass or a function marked @dataset_factory, in a module listed in
    `allowed_target_prefixes` (e.g. my_data.make_datasets)."""
    args: Dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the factory: `data.args={root: data/, size: 32}`."""
    task: str = "auto"
    """auto (integer targets: classification; float: regression; integer sequences of the input's length:
    lm), classification, regression or lm."""
    num_classes: Optional[int] = None
    """Classes of a classification dataset; null: the dataset's `classes` attribute, else the largest
    label seen + 1 (every label is read once, for up to 200,000 samples)."""
    vocab_size: Optional[int] = None
    """Vocabulary of token data (lm); null: the dataset's `vocab_size` attribute."""
    input_key: Optional[str] = None
    """Key of the input in dict samples; null tries input, x, inputs, image, input_ids, features."""
    target_key: Optional[str] = None
    """Key of the target in dict samples; null tries label, y, target, labels, targets."""

    module_dir: Optional[str] = None
    """Directory the factory's module is imported from; null: the directory trainctl runs in."""

    def allowed_prefixes(self) -> List[str]:
        """The run's `allowed_target_prefixes` (set on this spec when the run spec resolves its paths)."""
        return list(getattr(self, "_allowed_prefixes", []))

    def resolve_paths(self, base_dir: str) -> None:
        self.module_dir = _absolute(self.module_dir or ".", base_dir)

    def validate(self, key: str = "data") -> None:
        super().validate(key)
        check_choice(self.task, ("auto", "classification", "regression", "lm"), f"{key}.task")
        check(self.num_classes is None or self.num_classes >= 2, f"{key}.num_classes", "must be >= 2 or null",
              f"set {key}.num_classes=null")
        check(self.vocab_size is None or self.vocab_size >= 2, f"{key}.vocab_size", "must be >= 2 or null",
              f"set {key}.vocab_size=null")


@dataclass
class ImagesSpec(DataSpec):
    """Image files for classification: a folder of class subfolders (with `train/` and `val/` inside, or
    split by `val_fraction`) or a CSV of path,label; needs Pillow (`pip install 'trainctl[images]'`)."""

    name: str = "images"
    path: str = MISSING
    """The folder (class subfolders, or train/ and val/ holding them) or a CSV/TSV file of image paths
    (relative to its folder) and labels."""
    image_size: int = 32
    """Images are resized to image_size x image_size."""
    channels: int = 0
    """1 (grayscale) or 3 (RGB); 0: from the first image's mode."""
    augment: str = "none"
    """Training-split augmentation: none, light (padded crop, flip) or standard (resized crop, flip,
    colour jitter)."""
    normalize: bool = True
    """Subtract the per-channel mean and divide by the standard deviation of (up to 512) training images."""
    path_column: str = "path"
    """CSV: the column of image paths."""
    label_column: str = "label"
    """CSV: the column of labels (integers in numeric order, other values in sorted order)."""

    def validate(self, key: str = "data") -> None:
        super().validate(key)
        check_choice(self.augment, ("none", "light", "standard"), f"{key}.augment")
        check(self.image_size >= 8, f"{key}.image_size", f"must be >= 8 (got {self.image_size})",
              f"set {key}.image_size=32")
        check(self.channels in (0, 1, 3), f"{key}.channels", "must be 0 (auto), 1 or 3", f"set {key}.channels=0")
        path = Path(self.path)
        check(path.exists(), f"{key}.path", f"{self.path} does not exist",
              f"set {key}.path to a folder of class subfolders or a CSV of path,label")
        if path.is_dir():
            root = path / "train" if (path / "train").is_dir() and (path / "val").is_dir() else path
            folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
            check(len(folders) >= 2, f"{key}.path", f"{root} has {len(folders)} class folder(s); the ImageFolder "
                  "layout is one folder per class", "put each class's images in a folder of its own")

    def resolve_paths(self, base_dir: str) -> None:
        self.path = _absolute(self.path, base_dir)


@dataclass
class TokensSpec(DataSpec):
    """A pre-tokenised corpus of any size for next-token prediction: flat token files (train.bin/val.bin
    as nanoGPT's prepare.py or `trainctl prepare-tokens` writes them, or 1-D .npy arrays), memory-mapped
    and read a batch of windows at a time, so the corpus never has to fit in memory (trainctl/tokens_data.py).
    Every token id is checked against the vocabulary once before training (meta.json from prepare-tokens
    vouches for its own files; otherwise the files are read once, and the result kept in RUN_DIR/cache).
    The files are the splits: `data.val_fraction` is not used."""

    name: str = "tokens"
    path: Optional[str] = None
    """A directory holding train.bin and val.bin (or train.npy and val.npy), and meta.json when
    `trainctl prepare-tokens` wrote it. Relative paths are taken from the directory the command runs in."""
    train_path: Optional[str] = None
    """The training split's file; null: `<data.path>/train.bin`. meta.json is read from its directory."""
    val_path: Optional[str] = None
    """The validation split's file; null: `<data.path>/val.bin`."""
    dtype: Optional[str] = None
    """Token type of .bin files, uint16 or uint32; null: meta.json's (a .npy file records its own)."""
    vocab_size: Optional[int] = None
    """Vocabulary size (the model's embedding rows, which may exceed the tokenizer's, e.g. 50304);
    null: meta.json's `vocab_size`."""
    seq_len: int = 128
    """Tokens per training sequence (a window holds seq_len + 1: input and the target shifted by one)."""
    sampling: str = "random"
    """`random`: windows start anywhere, drawn as a pure function of (data.seed, epoch, index), as
    nanoGPT samples; `sequential`: non-overlapping windows at stride seq_len, shuffled per epoch by
    `data.shuffle`."""
    samples_per_epoch: Optional[int] = None
    """Windows in a `random` epoch; null: the training tokens // seq_len (one pass's worth)."""
    max_val_windows: Optional[int] = None
    """Validate on at most this many sequential windows of the validation file, spread evenly over it;
    null: all of them."""

    def validate(self, key: str = "data") -> None:
        super().validate(key)
        from trainctl import tokens_data

        tokens_data.check_spec(self, key)

    def resolve_paths(self, base_dir: str) -> None:
        self.path, self.train_path, self.val_path = (
            _absolute(p, base_dir) if p else p for p in (self.path, self.train_path, self.val_path))

    def load(self, cache_dir: Optional[Path] = None) -> Arrays:
        from trainctl import token_source

        return token_source.load(self, cache_dir)
