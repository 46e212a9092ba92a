"""The `data` config group: built-in datasets (digits, synthetic, csv, text), their specs and loading.

Everything here is numpy-only so the CLI can validate a spec without importing torch;
:mod:`trainctl.batches` turns the loaded arrays into tensors and batches.
"""

from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np
from omegaconf import MISSING

from trainctl.errors import ConfigError, check, check_choice
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
    """Classification or regression data generated from `data.seed` (scikit-learn's generators)."""

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
        header = read_table(str(path), self.delimiter)[0]
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
class DataInfo:
    """What the rest of the run needs to know about a dataset."""

    task: str
    """`classification`, `regression` or `lm`."""
    input_shape: Tuple[int, ...]
    """Shape of one input sample: (C, H, W) for images, (F,) for vectors, (L,) for token sequences."""
    num_classes: int = 0
    num_targets: int = 0
    vocab_size: int = 0
    n_train: int = 0
    n_val: int = 0
    target_mean: Optional[Tuple[float, ...]] = None
    """Regression targets were standardized with these; metrics are reported in the original units."""
    target_std: Optional[Tuple[float, ...]] = None
    class_names: Optional[Tuple[str, ...]] = None


@dataclass
class Arrays:
    """A loaded dataset: numpy arrays for both splits plus its :class:`DataInfo`.

    For `lm` data, ``x_*`` hold the token stream (uint8) and ``starts_*`` the sequence offsets.
    """

    info: DataInfo
    x_train: np.ndarray
    y_train: Optional[np.ndarray]
    x_val: np.ndarray
    y_val: Optional[np.ndarray]
    starts_train: Optional[np.ndarray] = None
    starts_val: Optional[np.ndarray] = None
    seq_len: int = 0


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


def _split(n: int, val_fraction: float, seed: int, labels: Optional[np.ndarray] = None):
    """Sorted train and validation indices: a seeded shuffle split, stratified by class when every class
    can appear on both sides. The indices are those of scikit-learn's ``train_test_split(test_size=
    val_fraction, random_state=seed, stratify=labels)`` (a test holds them equal); computing them with
    NumPy alone spares every run the ~2 s that importing scikit-learn costs."""
    n_val = int(np.ceil(n * val_fraction))
    n_train = n - n_val
    rng = np.random.RandomState(seed)
    if labels is not None:
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        if counts.min() >= 2 and min(n_val, n_train) >= len(counts):
            members = np.split(np.argsort(inverse.ravel(), kind="stable"), np.cumsum(counts)[:-1])
            train_counts = _apportion(counts, n_train, rng)
            val_counts = _apportion(counts - train_counts, n_val, rng)
            train, val = [], []
            for indices, k_train, k_val in zip(members, train_counts, val_counts):
                shuffled = indices[rng.permutation(len(indices))]
                train.append(shuffled[:k_train])
                val.append(shuffled[k_train:k_train + k_val])
            return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    order = rng.permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _apportion(counts: np.ndarray, total: int, rng: np.random.RandomState) -> np.ndarray:
    """``total`` samples shared among classes in proportion to ``counts``: each class gets the floor of
    its share, and the samples left over go to the largest fractional parts, ties drawn at random."""
    share = counts / counts.sum() * total
    given = np.floor(share)
    left = int(total - given.sum())
    fractions = share - given
    for value in np.unique(fractions)[::-1]:
        if left <= 0:
            break
        (tied,) = np.where(fractions == value)
        chosen = rng.choice(tied, size=min(len(tied), left), replace=False)
        given[chosen] += 1
        left -= len(chosen)
    return given.astype(int)


def _standardize(train: np.ndarray, val: np.ndarray):
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (val - mean) / std, mean, std


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
    tr, va = _split(len(y), spec.val_fraction, spec.seed, y)
    info = DataInfo("classification", (1, 8, 8), num_classes=10, n_train=len(tr), n_val=len(va),
                    class_names=tuple(str(c) for c in range(10)))
    return Arrays(info, x[tr], y[tr], x[va], y[va])


def _load_synthetic(spec: SyntheticSpec) -> Arrays:
    from sklearn import datasets

    if spec.task == "classification":
        x, y = datasets.make_classification(
            n_samples=spec.n_samples, n_features=spec.n_features, n_informative=spec.n_informative,
            n_redundant=0, n_classes=spec.n_classes, flip_y=spec.noise, random_state=spec.seed)
        return _tabular(x, y.astype(np.int64), spec, "classification", None, True)
    x, y = datasets.make_regression(
        n_samples=spec.n_samples, n_features=spec.n_features, n_informative=spec.n_informative,
        n_targets=spec.n_targets, noise=spec.noise, random_state=spec.seed)
    return _tabular(x, y.reshape(len(y), -1), spec, "regression", None, True)


def _tabular(x: np.ndarray, y: np.ndarray, spec: DataSpec, task: str, class_names, standardize: bool) -> Arrays:
    tr, va = _split(len(y), spec.val_fraction, spec.seed, y if task == "classification" else None)
    x_tr, x_va = x[tr].astype(np.float64), x[va].astype(np.float64)
    y_tr, y_va = y[tr], y[va]
    mean = std = None
    if standardize:
        x_tr, x_va, _, _ = _standardize(x_tr, x_va)
        if task == "regression":
            y_tr, y_va, m, s = _standardize(y_tr.astype(np.float64), y_va.astype(np.float64))
            mean, std = tuple(float(v) for v in m), tuple(float(v) for v in s)
    if task == "classification":
        n_classes = len(class_names) if class_names else int(y.max()) + 1
        info = DataInfo(task, (x.shape[1],), num_classes=n_classes, n_train=len(tr), n_val=len(va),
                        class_names=tuple(class_names) if class_names else None)
        return Arrays(info, x_tr.astype(np.float32), y_tr.astype(np.int64), x_va.astype(np.float32),
                      y_va.astype(np.int64))
    info = DataInfo(task, (x.shape[1],), num_targets=y.shape[1], n_train=len(tr), n_val=len(va),
                    target_mean=mean, target_std=std)
    return Arrays(info, x_tr.astype(np.float32), y_tr.astype(np.float32), x_va.astype(np.float32),
                  y_va.astype(np.float32))


@functools.lru_cache(maxsize=4)
def _read_table_cached(path: str, delimiter: Optional[str], mtime_ns: int) -> Tuple[List[str], List[List[str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            sample = handle.read(64 * 1024)
            handle.seek(0)
            if delimiter is None:
                if path.lower().endswith((".tsv", ".tab")):
                    delimiter = "\t"
                else:
                    try:
                        delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
                    except csv.Error:
                        delimiter = ","
            rows = [row for row in csv.reader(handle, delimiter=delimiter) if row]
    except UnicodeDecodeError as exc:
        raise ConfigError("data.path", f"{Path(path).name} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                          f"at offset {exc.start})", f"save it as UTF-8, e.g. iconv -f latin1 -t utf-8 "
                          f"{Path(path).name} > utf8.csv") from None
    except csv.Error as exc:
        raise ConfigError("data.path", f"{Path(path).name} cannot be read as CSV: {exc}",
                          "fix the file or set data.delimiter") from None
    except OSError as exc:
        raise ConfigError("data.path", f"cannot read {path}: {exc.strerror or exc}") from None
    if not rows:
        raise ConfigError("data.path", f"{path} is empty", "point data.path at a CSV file with a header row")
    header = [h.strip() for h in rows[0]]
    seen = set()
    for name in header:
        if name in seen:
            raise ConfigError("data.path", f"{Path(path).name} has two columns named '{name}'",
                              "give every column of the header its own name")
        seen.add(name)
    return header, rows[1:]


def read_table(path: str, delimiter: Optional[str]) -> Tuple[List[str], List[List[str]]]:
    """Header and rows of a delimited text file (cached by path and modification time)."""
    return _read_table_cached(path, delimiter, os.stat(path).st_mtime_ns)


def _as_float(values: List[str]) -> Optional[np.ndarray]:
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return None


def _empty_cells(values: List[str]) -> List[int]:
    """File line numbers (the header is line 1) of the empty cells of a column."""
    return [i + 2 for i, v in enumerate(values) if v == ""]


def _lines(numbers: List[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:5])
    return shown + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")


def _csv_task(spec: CsvSpec, target_values: List[str]) -> str:
    if spec.task != "auto":
        return spec.task
    numeric = _as_float(target_values)
    if numeric is None:
        return "classification"
    integral = bool(np.all(np.isfinite(numeric)) and np.all(numeric == np.round(numeric)))
    return "classification" if integral and len(np.unique(numeric)) <= spec.max_classes else "regression"


def _csv_columns(spec: CsvSpec):
    header, rows = read_table(spec.path, spec.delimiter)
    width = len(header)
    for line, row in enumerate(rows, start=2):
        if len(row) != width:
            raise ConfigError("data.path", f"{Path(spec.path).name} line {line} has {len(row)} fields, "
                              f"the header has {width}", "fix the file or set data.delimiter")
    columns = {name: [row[i].strip() for row in rows] for i, name in enumerate(header)}
    features = spec.features or [h for h in header if h != spec.target]
    empty = _empty_cells(columns[spec.target])
    if empty:  # an empty label is not a class of its own, and not a number either
        raise ConfigError("data.target", f"column '{spec.target}' of {Path(spec.path).name} is empty on "
                          f"{len(empty)} row(s) (line {_lines(empty)})",
                          "fill in or drop those rows: a row without a target cannot be trained on")
    return columns, features


def _probe_csv(spec: CsvSpec) -> Tuple[str, int]:
    columns, _ = _csv_columns(spec)
    return _csv_task(spec, columns[spec.target]), 1


def _load_csv(spec: CsvSpec) -> Arrays:
    columns, features = _csv_columns(spec)
    check(len(features) > 0, "data.features", "no feature columns left", "set data.features=[COL1,COL2]")
    matrix = []
    for name in features:
        empty = _empty_cells(columns[name])
        if empty:
            others = [f for f in features if f != name]
            raise ConfigError("data.features", f"column '{name}' has {len(empty)} empty cell(s) (line "
                              f"{_lines(empty)}); missing values are not filled in",
                              "fill in or drop those rows, or leave the column out: "
                              f"data.features=[{','.join(others)}]")
        values = _as_float(columns[name])
        if values is None:
            bad = next(v for v in columns[name] if _as_float([v]) is None)
            numeric = [f for f in features if _as_float(columns[f]) is not None]
            raise ConfigError("data.features", f"column '{name}' is not numeric (e.g. '{bad}')",
                              f"list only numeric columns: data.features=[{','.join(numeric)}]")
        matrix.append(values)
    x = np.stack(matrix, axis=1)
    check(bool(np.all(np.isfinite(x))), "data.path", "the feature columns contain missing or infinite values",
          "fill or drop those rows in the file")
    target = columns[spec.target]
    task = _csv_task(spec, target)
    check(len(target) >= 10, "data.path", f"{len(target)} rows is too few to split into train and validation",
          "use a file with at least 10 rows")
    if task == "classification":
        numeric = _as_float(target)
        classes = sorted(set(numeric.tolist())) if numeric is not None else sorted(set(target))
        lookup = {c: i for i, c in enumerate(classes)}
        keys = numeric.tolist() if numeric is not None else target
        y = np.array([lookup[k] for k in keys], dtype=np.int64)
        names = [str(int(c)) if isinstance(c, float) and c.is_integer() else str(c) for c in classes]
        check(len(names) >= 2, "data.target", f"column '{spec.target}' has a single class",
              "choose another data.target")
        return _tabular(x, y, spec, task, names, spec.standardize)
    y = _as_float(target)
    check(y is not None and bool(np.all(np.isfinite(y))), "data.target",
          f"column '{spec.target}' is not numeric, so it cannot be a regression target",
          "set data.task=classification")
    return _tabular(x, y.reshape(-1, 1), spec, task, None, spec.standardize)


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
DATASETS.add("csv", DataEntry(CsvSpec, _probe_csv, _load_csv))
DATASETS.add("text", DataEntry(TextSpec, lambda s: ("lm", 1), _load_text))
