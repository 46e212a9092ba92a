"""What a loaded dataset is (:class:`DataInfo`, :class:`Arrays`) and the splitting and scaling every
in-memory dataset shares: a seeded, stratified train/validation split with the indices of
scikit-learn's `train_test_split` (computed with NumPy alone), and standardisation with the training
split's statistics. NumPy only."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class DataInfo:
    """What the rest of the run needs to know about a dataset."""

    task: str
    """`classification`, `regression` or `lm`."""
    input_shape: Tuple[int, ...]
    """Shape of one input sample: (C, H, W) for images, (F,) for vectors, (L,) for token sequences, (2, L)
    for token ids (row 0) with their attention mask (row 1)."""
    num_classes: int = 0
    num_targets: int = 0
    vocab_size: int = 0
    n_train: int = 0
    n_val: int = 0
    target_mean: Optional[Tuple[float, ...]] = None
    """Regression targets were standardized with these; metrics are reported in the original units."""
    target_std: Optional[Tuple[float, ...]] = None
    class_names: Optional[Tuple[str, ...]] = None
    encoding: Optional[Dict[str, Any]] = field(default=None, compare=False)
    """How a table's columns became the inputs (`data=csv`, see :mod:`trainctl.tables`), fitted on the train
    split; the run writes it to RUN_DIR/data_encoding.json for `trainctl eval`."""
    class_counts: Optional[Tuple[int, ...]] = field(default=None, compare=False)
    """Classification: the training split's examples per class, where the labels are known when the data is
    loaded (`loss.class_weights=auto` is computed from them); None for data read per batch (a user's Dataset)."""


@dataclass
class Arrays:
    """A loaded dataset: numpy arrays for both splits plus its :class:`DataInfo`.

    For `lm` data, ``x_*`` hold the token stream (uint8 bytes, or int32 token ids) and ``starts_*`` the
    sequence offsets.
    """

    info: DataInfo
    x_train: np.ndarray
    y_train: Optional[np.ndarray]
    x_val: np.ndarray
    y_val: Optional[np.ndarray]
    starts_train: Optional[np.ndarray] = None
    starts_val: Optional[np.ndarray] = None
    seq_len: int = 0
    sources: Optional[Tuple[Any, Any]] = None
    """Datasets that do not fit the arrays above (files read per batch, a user's Dataset): the train and
    validation :class:`trainctl.batches.Source` objects themselves; ``x_*``/``y_*`` are then unused."""


def with_class_counts(arrays: Arrays) -> Arrays:
    """``arrays`` with ``info.class_counts`` filled from the training labels held in memory (classification)."""
    info = arrays.info
    if info.task != "classification" or info.class_counts is not None or arrays.sources is not None \
            or arrays.y_train is None:
        return arrays
    counts = np.bincount(np.asarray(arrays.y_train).reshape(-1), minlength=info.num_classes)
    arrays.info = replace(info, class_counts=tuple(int(c) for c in counts))
    return arrays


def split_indices(n: int, val_fraction: float, seed: int, labels: Optional[np.ndarray] = None):
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


def standardize(train: np.ndarray, val: np.ndarray):
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (val - mean) / std, mean, std


def tabular(x: np.ndarray, y: np.ndarray, spec: Any, task: str, class_names, scaled: bool) -> Arrays:
    """A table's arrays, split (stratified for classes) and, when ``scaled``, standardised: the features,
    and the targets of a regression (metrics are reported in their own units)."""
    tr, va = split_indices(len(y), spec.val_fraction, spec.seed, y if task == "classification" else None)
    x_tr, x_va = x[tr].astype(np.float64), x[va].astype(np.float64)
    y_tr, y_va = y[tr], y[va]
    mean = std = None
    if scaled:
        x_tr, x_va, _, _ = standardize(x_tr, x_va)
        if task == "regression":
            y_tr, y_va, m, s = standardize(y_tr.astype(np.float64), y_va.astype(np.float64))
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
