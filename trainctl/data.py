"""The `data` config group: built-in datasets (digits, synthetic, csv, text), their specs and loading.

Everything here is numpy-only so the CLI can validate a spec without importing torch;
:mod:`trainctl.batches` turns the loaded arrays into tensors and batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np
from omegaconf import MISSING

from trainctl import csvfile
from trainctl.arrays import Arrays, DataInfo, split_indices, tabular
from trainctl.errors import check, check_choice
from trainctl.registry import Registry

TASKS = ("classification", "regression", "lm")


@dataclass
class DataSpec:
    """Fields every dataset shares."""

    name: str = MISSING
    """Dataset; the option picked with `data=NAME`."""
    batch_size: int = 64
    """Samples per micro-batch (per process)."""
    eval_batch_size: Optional[int] = None
    """Samples per validation batch; null uses `data.batch_size`."""
    shuffle: bool = True
    """Reshuffle the training set every epoch (order seeded by `data.seed` and the epoch)."""
    drop_last: bool = False
    """Drop the last, smaller training batch of each epoch."""
    seed: int = 0
    """Seed of the train/validation split, of generated data and of the shuffling order."""
    num_workers: int = 0
    """DataLoader worker processes; 0 slices whole batches straight from in-memory tensors (fastest)."""
    val_fraction: float = 0.2
    """Share of the data held out for validation."""

    def validate(self, key: str = "data") -> None:
        check(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1 (got {self.batch_size})",
              f"set {key}.batch_size=64")
        check(self.eval_batch_size is None or self.eval_batch_size >= 1, f"{key}.eval_batch_size",
              "must be >= 1 or null", f"set {key}.eval_batch_size=null")
        check(self.num_workers >= 0, f"{key}.num_workers", "must be >= 0", f"set {key}.num_workers=0")
        check(0 <= self.seed < 2**32, f"{key}.seed", f"must be in 0 .. 2**32-1 (got {self.seed})", f"set {key}.seed=0")
        check(0.0 < self.val_fraction < 1.0, f"{key}.val_fraction",
              f"must be between 0 and 1 (got {self.val_fraction})", f"set {key}.val_fraction=0.2")

    def resolve_paths(self, base_dir: str) -> None:
        """Make user paths absolute against the directory the command was run from."""


@dataclass
class DigitsSpec(DataSpec):
    """scikit-learn's bundled 8x8 handwritten digits: 1,797 images, 10 classes, no download."""

    name: str = "digits"


@dataclass
class SyntheticSpec(DataSpec):
    """Classification or regression data generated from `data.seed`: scikit-learn's `make_classification` /
    `make_regression`, the same arrays, generated without importing scikit-learn."""

    name: str = "synthetic"
    task: str = "classification"
    """`classification` or `regression`."""
    n_samples: int = 2000
    """Number of samples generated (train + validation)."""
    n_features: int = 20
    """Input features per sample."""
    n_informative: int = 10
    """Features that carry signal; the rest are noise."""
    n_classes: int = 3
    """Classes (classification only)."""
    n_targets: int = 1
    """Regression outputs per sample (regression only)."""
    noise: float = 0.1
    """Label noise: the share of flipped labels (classification) or the target noise std (regression)."""

    def validate(self, key: str = "data") -> None:
        super().validate(key)
        check_choice(self.task, ("classification", "regression"), f"{key}.task")
        check(self.n_samples >= 10, f"{key}.n_samples", "must be >= 10", f"set {key}.n_samples=2000")
        check(1 <= self.n_informative <= self.n_features, f"{key}.n_informative",
              f"must be between 1 and data.n_features={self.n_features}",
              f"set {key}.n_informative={min(10, self.n_features)}")
        check(self.n_classes >= 2, f"{key}.n_classes", "must be >= 2", f"set {key}.n_classes=3")
        check(self.n_targets >= 1, f"{key}.n_targets", "must be >= 1", f"set {key}.n_targets=1")
        check(self.noise >= 0, f"{key}.noise", "must be >= 0", f"set {key}.noise=0.1")


@dataclass
class CsvSpec(DataSpec):
    """A CSV/TSV file with a header row: one target column, numeric feature columns."""

    name: str = "csv"
    path: str = MISSING
    """The file; relative paths are taken from the directory the command runs in."""
    target: str = MISSING
    """Header name of the column to predict."""
    features: Optional[List[str]] = None
    """Feature columns; null uses every column except the target."""
    task: str = "auto"
    """`auto` (a text target, or at most `max_classes` integer values, is classification), `classification` or `regression`."""
    max_classes: int = 20
    """With `task=auto`: an integer target with at most this many distinct values is a class label."""
    delimiter: Optional[str] = None
    """Column separator; null detects it (tab for .tsv files)."""
    standardize: bool = True
    """Scale features (and regression targets) to zero mean and unit variance using the train split only."""

    def validate(self, key: str = "data") -> None:
        super().validate(key)
        check_choice(self.task, ("auto", "classification", "regression"), f"{key}.task")
        path = Path(self.path)
        check(path.is_file(), f"{key}.path", f"no such file: {self.path}", f"set {key}.path=FILE (a CSV or TSV file)")
        header = csvfile.read_table(str(path), self.delimiter)[0]
        check(self.target in header, f"{key}.target",
              f"no column '{self.target}' in {path.name}; its columns are: {', '.join(header)}",
              f"set {key}.target=COLUMN")
        for column in self.features or []:
            check(column in header, f"{key}.features", f"no column '{column}' in {path.name}",
                  f"choose from: {', '.join(c for c in header if c != self.target)}")
        check(self.target not in (self.features or []), f"{key}.features",
              f"the target '{self.target}' cannot also be a feature", f"remove it from {key}.features")

    def resolve_paths(self, base_dir: str) -> None:
        self.path = _absolute(self.path, base_dir)


@dataclass
class TextSpec(DataSpec):
    """A text file modelled byte by byte (vocabulary of 256) for next-token prediction."""

    name: str = "text"
    path: str = MISSING
    """The text file; relative paths are taken from the directory the command runs in."""
    seq_len: int = 128
    """Tokens (bytes) per training sequence."""
    stride: Optional[int] = None
    """Distance between the starts of consecutive training sequences; null uses `seq_len`."""
    val_fraction: float = 0.1

    def validate(self, key: str = "data") -> None:
        super().validate(key)
        check(Path(self.path).is_file(), f"{key}.path", f"no such file: {self.path}", f"set {key}.path=FILE")
        check(self.seq_len >= 2, f"{key}.seq_len", "must be >= 2", f"set {key}.seq_len=128")
        check(self.stride is None or self.stride >= 1, f"{key}.stride", "must be >= 1 or null",
              f"set {key}.stride=null")
        size = os.path.getsize(self.path)
        needed = int((self.seq_len + 1) / min(self.val_fraction, 1 - self.val_fraction)) + 1
        check(size >= needed, f"{key}.seq_len",
              f"{Path(self.path).name} has {size} bytes, too few for sequences of {self.seq_len} "
              f"in both splits (needs >= {needed})", f"lower {key}.seq_len or use a longer file")

    def resolve_paths(self, base_dir: str) -> None:
        self.path = _absolute(self.path, base_dir)


@dataclass(frozen=True)
class DataEntry:
    spec: type
    probe: Any
    """spec -> (task, input rank): cheap facts for cross-group checks, without loading."""
    load: Any
    """spec -> Arrays."""


DATASETS: Registry[DataEntry] = Registry("data")


def probe(spec: DataSpec) -> Tuple[str, int]:
    """(task, input rank) of a validated spec, reading no more than a CSV's target column."""
    return DATASETS.get(spec.name).probe(spec)


def load(spec: DataSpec) -> Arrays:
    return DATASETS.get(spec.name).load(spec)


# --- loaders --------------------------------------------------------------------------------------


def _absolute(path: str, base_dir: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """The 1797 8×8 digit images (pixel values 0-16) and their labels, as scikit-learn ships them. The
    file is read directly (a few ms) rather than through ``sklearn.datasets.load_digits``, whose import
    takes about 2 s."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():  # another layout: the public loader
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data, bunch.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


def _load_digits(spec: DigitsSpec) -> Arrays:
    pixels, labels = digits_arrays()
    x = (pixels / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = labels.astype(np.int64)
    tr, va = split_indices(len(y), spec.val_fraction, spec.seed, y)
    info = DataInfo("classification", (1, 8, 8), num_classes=10, n_train=len(tr), n_val=len(va),
                    class_names=tuple(str(c) for c in range(10)))
    return Arrays(info, x[tr], y[tr], x[va], y[va])


def _load_synthetic(spec: SyntheticSpec) -> Arrays:
    from trainctl import synthetic

    if spec.task == "classification":
        x, y = synthetic.make_classification(spec.n_samples, spec.n_features, spec.n_informative, spec.n_classes,
                                             spec.noise, spec.seed)
        return tabular(x, y.astype(np.int64), spec, "classification", None, True)
    x, y = synthetic.make_regression(spec.n_samples, spec.n_features, spec.n_informative, spec.n_targets,
                                     spec.noise, spec.seed)
    return tabular(x, y.reshape(len(y), -1), spec, "regression", None, True)


def _load_text(spec: TextSpec) -> Arrays:
    tokens = np.frombuffer(Path(spec.path).read_bytes(), dtype=np.uint8)
    cut = int(len(tokens) * (1 - spec.val_fraction))
    train, val = tokens[:cut], tokens[cut:]
    stride = spec.stride or spec.seq_len
    window = spec.seq_len + 1
    starts_train = np.arange(0, len(train) - window + 1, stride, dtype=np.int64)
    starts_val = np.arange(0, len(val) - window + 1, spec.seq_len, dtype=np.int64)
    info = DataInfo("lm", (spec.seq_len,), vocab_size=256, n_train=len(starts_train), n_val=len(starts_val))
    return Arrays(info, train, None, val, None, starts_train, starts_val, spec.seq_len)


DATASETS.add("digits", DataEntry(DigitsSpec, lambda s: ("classification", 3), _load_digits))
DATASETS.add("synthetic", DataEntry(SyntheticSpec, lambda s: (s.task, 1), _load_synthetic))
DATASETS.add("csv", DataEntry(CsvSpec, csvfile.probe, csvfile.load))
DATASETS.add("text", DataEntry(TextSpec, lambda s: ("lm", 1), _load_text))
