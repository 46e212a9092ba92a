"""The encoding of a table (`data=csv`): how its columns become a model's inputs and targets, fitted on a
train split and stored with the run (`RUN_DIR/data_encoding.json`) so that evaluation applies the same one.

- a numeric feature: its fill value (the train split's mean, for `data.missing=mean`) and, with
  `data.standardize`, its mean and standard deviation;
- a categorical feature: the train split's categories (plus `<missing>` when the train split has missing
  cells under `data.missing=mean`). `data.categorical=onehot`: a 0/1 column per category, all zeros for a
  category the train split does not have. `data.categorical=codes`: one float column holding the
  category's number 1..k, 0 when unknown - for a model of your own that embeds those last columns (the
  built-in MLP would read them as magnitudes);
- the target: the class list, or a regression target's mean and standard deviation.

The inputs are the numeric features in their order, then the categorical ones (``Encoding.columns()``
names each input column). NumPy only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np

from trainctl.csvfile import Column
from trainctl.errors import ConfigError, check

if TYPE_CHECKING:
    from trainctl.data import CsvSpec

log = logging.getLogger("trainctl")

ENCODING_FORMAT = "trainctl.tables.encoding/1"
MISSING_LEVEL = "<missing>"


@dataclass
class Encoding:
    """How a table's columns become the model's inputs and targets, as fitted on a train split."""

    target: str
    task: str
    features: List[Dict[str, Any]]
    """Per feature, in the file's order: {name, kind: numeric, fill, mean, std} or
    {name, kind: categorical, levels, missing_level}."""
    categorical: str = "onehot"
    classes: Optional[List[Any]] = None
    """Classification: the target's values in class order (texts, or numbers)."""
    target_mean: Optional[List[float]] = None
    target_std: Optional[List[float]] = None

    def numeric(self) -> List[Dict[str, Any]]:
        return [f for f in self.features if f["kind"] == "numeric"]

    def categories(self) -> List[Dict[str, Any]]:
        return [f for f in self.features if f["kind"] == "categorical"]

    def columns(self) -> List[str]:
        """The name of each input column: numeric features, then the categorical ones."""
        names = [f["name"] for f in self.numeric()]
        for f in self.categories():
            if self.categorical == "codes":
                names.append(f"{f['name']}#code")
            else:
                levels = f["levels"] + ([MISSING_LEVEL] if f["missing_level"] else [])
                names += [f"{f['name']}={level}" for level in levels]
        return names

    def class_names(self) -> Optional[List[str]]:
        if self.classes is None:
            return None
        return [number_text(c) if isinstance(c, float) else str(c) for c in self.classes]

    def to_dict(self) -> Dict[str, Any]:
        return {"format": ENCODING_FORMAT, "target": self.target, "task": self.task, "classes": self.classes,
                "class_names": self.class_names(), "target_mean": self.target_mean, "target_std": self.target_std,
                "categorical": self.categorical, "features": self.features, "columns": self.columns()}

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "Encoding":
        """The encoding a run wrote; anything else is refused (the file is input, not trusted)."""
        try:
            features = [dict(f) for f in raw["features"]]
            classes, task = raw.get("classes"), raw["task"]
            fits = (raw["format"] == ENCODING_FORMAT and task in ("classification", "regression")
                    and raw["categorical"] in ("onehot", "codes") and isinstance(raw["target"], str)
                    and all(_feature_fits(f) for f in features)
                    and (task == "regression" or (isinstance(classes, list) and len(classes) >= 2
                                                  and all(isinstance(c, (str, float, int)) for c in classes)))
                    and all(_numbers(raw.get(k), 1) for k in ("target_mean", "target_std")))
        except (KeyError, TypeError, ValueError):
            fits = False
        if not fits:
            raise ConfigError("data.encoding", f"{where} is not an encoding trainctl wrote ({ENCODING_FORMAT})",
                              "point data.encoding at a run's data_encoding.json, or set data.encoding=null")
        return cls(raw["target"], raw["task"], features, raw["categorical"], raw.get("classes"),
                   raw.get("target_mean"), raw.get("target_std"))


def _numbers(value: Any, length: int) -> bool:
    """None, or a list of ``length`` numbers."""
    return value is None or (isinstance(value, list) and len(value) == length
                             and all(isinstance(v, (int, float)) for v in value))


def _feature_fits(feature: Dict[str, Any]) -> bool:
    if not isinstance(feature.get("name"), str):
        return False
    if feature.get("kind") == "numeric":
        return all(isinstance(feature.get(k), (int, float)) for k in ("fill", "mean", "std")) and feature["std"] > 0
    return (feature.get("kind") == "categorical" and isinstance(feature.get("levels"), list)
            and all(isinstance(v, str) for v in feature["levels"]) and isinstance(feature.get("missing_level"), bool))


def read_encoding(path: str) -> Encoding:
    from trainctl.files import read_text_bounded

    try:
        raw = json.loads(read_text_bounded(Path(path)))
    except OSError as exc:
        raise ConfigError("data.encoding", f"cannot read {path}: {exc.strerror or exc}",
                          "point data.encoding at a run's data_encoding.json, or set data.encoding=null") from None
    except ValueError:
        raise ConfigError("data.encoding", f"{path} is not valid JSON",
                          "point data.encoding at a run's data_encoding.json, or set data.encoding=null") from None
    return Encoding.from_dict(raw, path)


def number_text(value: float) -> str:
    """A number as a category or class name: 3.0 is "3"."""
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass
class Table:
    """The rows of a file that are used: their feature columns, targets and task."""

    columns: Dict[str, Column]
    features: List[str]
    task: str
    y: np.ndarray
    """Class indices (classification) or the target's values, shape (n, 1) (regression)."""
    classes: Optional[List[Any]]
    file: str
    rows: np.ndarray
    """Each row's index in the file (for messages)."""
    parquet: bool
    filled: bool = False
    """Missing feature values are left in (as NaN / code -1) to be filled: `data.missing=mean`."""

    def __len__(self) -> int:
        return len(self.y)


def fit_encoding(spec: "CsvSpec", table: Table, train: np.ndarray) -> Encoding:
    """The encoding of ``table``'s features and targets, from its rows ``train`` only."""
    features = []
    for name in table.features:
        column = table.columns[name]
        if column.numeric:
            features.append(_fit_numeric(spec, name, column.values[train], table.file, table.filled))
        else:
            codes = column.codes[train]
            levels = sorted(column.levels[i] for i in np.unique(codes[codes >= 0]))
            missing_level = bool((codes < 0).any())  # only data.missing=mean keeps such rows
            count = len(levels) + missing_level
            others = [f for f in table.features if f != name]
            check(count <= spec.max_categories, "data.max_categories", f"column '{name}' of {table.file} has "
                  f"{count} categories in the train split, more than data.max_categories={spec.max_categories} "
                  "(an identifier, or numbers written as text?)", f"leave it out: data.features=[{','.join(others)}], "
                  f"or set data.max_categories={count}")
            features.append({"name": name, "kind": "categorical", "levels": levels, "missing_level": missing_level})
    encoding = Encoding(spec.target, table.task, features, spec.categorical, classes=table.classes)
    if table.task == "regression" and spec.standardize:
        y = table.y[train].astype(np.float64)
        std = y.std(axis=0)
        encoding.target_mean = [float(v) for v in y.mean(axis=0)]
        encoding.target_std = [float(v) for v in np.where(std > 0, std, 1.0)]
    return encoding


def _fit_numeric(spec: "CsvSpec", name: str, values: np.ndarray, file: str, filled: bool) -> Dict[str, Any]:
    """Fill value, mean and standard deviation of a numeric feature's train rows (with their missing
    values filled, when ``filled``)."""
    missing = np.isnan(values) if filled else None
    if missing is not None and missing.any():
        check(not missing.all(), "data.features", f"column '{name}' of {file} has no values in the train split",
              "leave it out of data.features")
        fill = float(values[~missing].mean())
        values = np.where(missing, fill, values)
    else:
        fill = float(values.mean())
    mean, std = 0.0, 1.0
    if spec.standardize:
        centred = values - fill  # the mean of the filled values is the fill value
        mean, std = fill, float(np.sqrt(np.dot(centred, centred) / len(centred)))
        std = std if std > 0 else 1.0
    return {"name": name, "kind": "numeric", "fill": fill, "mean": mean, "std": std}


ENCODE_BLOCK_ROWS = 1 << 13
"""Rows written at a time: each block's columns are filled while it is in the cache."""


def encode(encoding: Encoding, table: Table, rows: np.ndarray, split: str) -> np.ndarray:
    """The model's inputs for ``rows`` of ``table`` (float32, one row per sample)."""
    parts: List[Tuple[Any, ...]] = []  # numeric: (values, fill, mean, std); categorical: (indices, width)
    for feature in encoding.numeric():
        column = table.columns[feature["name"]]
        check(column.numeric, "data.features", f"column '{feature['name']}' of {table.file} holds text, but it "
              "was a numeric feature in training", "give it numbers only (missing cells as in data.na_values)")
        parts.append((column.values, feature["fill"] if table.filled else None, feature["mean"], feature["std"]))
    for feature in encoding.categories():
        parts.append(_category_indices(encoding.categorical, feature, table.columns[feature["name"]], rows, split))
    x = np.empty((len(rows), len(encoding.columns())), dtype=np.float32)
    for start in range(0, len(rows), ENCODE_BLOCK_ROWS):
        _encode_block(parts, encoding.categorical == "codes", rows, x, start)
    return x


def _encode_block(parts: List[Tuple[Any, ...]], codes: bool, rows: np.ndarray, x: np.ndarray, start: int) -> None:
    stop = start + ENCODE_BLOCK_ROWS
    block, out, j = rows[start:stop], x[start:stop], 0
    for part in parts:
        if len(part) == 4:
            values, fill, mean, std = part
            values = values[block]
            if fill is not None:
                values = np.where(np.isnan(values), fill, values)
            out[:, j] = (values - mean) / std
            j += 1
        elif codes:
            out[:, j] = part[0][start:stop] + 1  # 0: unknown
            j += 1
        else:
            width = part[1]
            out[:, j:j + width] = part[0][start:stop, None] == np.arange(width)
            j += width


def _category_indices(mode: str, feature: Dict[str, Any], column: Column, rows: np.ndarray,
                      split: str) -> Tuple[np.ndarray, int]:
    """(each row's category index, -1 for one the train split does not have; the one-hot width) of a
    categorical feature. Unknown categories are counted in the log."""
    if column.numeric:  # a text column in training, numbers only in this file
        column = _as_categories(column)
    levels = feature["levels"]
    index = {level: i for i, level in enumerate(levels)}
    missing_index = len(levels) if feature["missing_level"] else -1
    lookup = np.array([index.get(level, -1) for level in column.levels] + [missing_index], dtype=np.int64)
    codes = column.codes[rows]
    idx = lookup[codes]  # code -1 (missing) takes the last entry
    unseen = idx < 0
    if unseen.any():
        code = codes[unseen][0]
        example = column.levels[code] if code >= 0 else MISSING_LEVEL
        as_what = "code 0" if mode == "codes" else "all-zero one-hot rows"
        log.warning("column '%s': %d row(s) of the %s split have a category the train split does not have (e.g. "
                    "'%s'); they are encoded as %s", feature["name"], int(unseen.sum()), split, example, as_what)
    return idx, len(levels) + feature["missing_level"]


def _as_categories(column: Column) -> Column:
    present = ~np.isnan(column.values)
    values, inverse = np.unique(column.values[present], return_inverse=True)
    codes = np.full(len(column), -1, dtype=np.int64)
    codes[present] = inverse
    return Column(codes=codes, levels=[number_text(v) for v in values.tolist()])


def targets(encoding: Encoding, table: Table, rows: np.ndarray) -> np.ndarray:
    """The targets of ``rows``: class indices, or a regression target scaled as in training."""
    y = table.y[rows]
    if encoding.task == "classification":
        return y.astype(np.int64)
    if encoding.target_mean is not None:
        y = (y - np.asarray(encoding.target_mean)) / np.asarray(encoding.target_std)
    return y.astype(np.float32)


def as_class(key: Any, numeric: bool) -> Any:
    """A target value as the type of a stored class list (numbers, or texts)."""
    if numeric:
        try:
            return float(key)
        except ValueError:
            return key
    return number_text(key) if isinstance(key, float) else key
