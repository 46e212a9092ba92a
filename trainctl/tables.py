"""`data=csv`: a table (CSV, TSV or Parquet, read by :mod:`trainctl.csvfile`) made into a run's arrays.

In order:

1. **Columns.** The target and the features (`data.features`, or every other column). A column of numbers
   is numeric; any other feature column - and any listed in `data.categorical_columns` - is categorical.
2. **Missing values** (`data.na_values` cells and empty cells), by `data.missing`:
   `error` (the default) refuses the file, naming the columns, how many rows and which lines;
   `drop` drops every row with a missing target or feature;
   `mean` drops the rows without a target and fills the rest: a numeric feature with its mean over the
   train split, a categorical one with a category of its own (`<missing>`).
   Rows dropped are counted in the log. Infinite numbers are refused (they are not "missing").
3. **Task.** `data.task=auto`: a text target, or an integer one with at most `data.max_classes` values, is
   classification; any other numeric target is regression.
4. **Split**, seeded by `data.seed` and stratified by class for classification: first the test rows
   (`data.test_fraction` of them), then `data.val_fraction` of the remaining rows for validation. A test
   split - these rows, or the file `data.test_path` - is never loaded for training; only
   `trainctl eval RUN --split test` reads it. Without a test split the train/validation split is the one
   trainctl always made (scikit-learn's `train_test_split` indices).
5. **Encoding**, fitted on the train split only: for each numeric feature the fill value (its mean) and,
   with `data.standardize`, its mean and standard deviation; for each categorical feature its categories
   (at most `data.max_categories`); the class list (from every row with a target, as the split needs
   it); a regression target's mean and standard deviation (metrics are reported in its own units). The
   model's inputs are the numeric features (in their order), then the categorical ones:
   - `data.categorical=onehot`: one 0/1 column per category; a category the train split does not have
     is an all-zero row (counted in the log).
   - `data.categorical=codes`: one column per categorical feature holding its category's number,
     1..k, and 0 for an unknown category, as float features. The built-in MLP then reads them as
     numbers, which only suits ordered categories; they are meant for a model of your own
     (`model=custom`) that passes those last columns through an embedding. `onehot` is the choice for
     the built-in models.

The encoding (:mod:`trainctl.table_encoding`) goes with the run: it is in ``DataInfo.encoding``, the run
writes it to `RUN_DIR/data_encoding.json`, and `trainctl eval` reads it back (`data.encoding`), so a model
is always evaluated on the inputs it was trained on, whatever file it is evaluated on.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np

from trainctl.arrays import Arrays, DataInfo, split_indices
from trainctl.csvfile import Column, place, read_columns, read_header
from trainctl.errors import ConfigError, check, check_choice
from trainctl.table_encoding import Encoding, Table, as_class, encode, fit_encoding, read_encoding, targets

if TYPE_CHECKING:
    from trainctl.data import CsvSpec

log = logging.getLogger("trainctl")

ENCODING_FILE = "data_encoding.json"
MIN_ROWS = 10


# --- the spec's checks --------------------------------------------------------------------------


def check_spec(spec: "CsvSpec", key: str = "data") -> None:
    """`data=csv`'s own checks, at validation: its settings, and its files' headers (no rows are read)."""
    check_choice(spec.task, ("auto", "classification", "regression"), f"{key}.task")
    check_choice(spec.missing, ("error", "drop", "mean"), f"{key}.missing")
    check_choice(spec.categorical, ("onehot", "codes"), f"{key}.categorical")
    check(spec.max_categories >= 1, f"{key}.max_categories", "must be >= 1", f"set {key}.max_categories=256")
    check(0 <= spec.test_fraction < 1 and spec.test_fraction + spec.val_fraction < 1, f"{key}.test_fraction",
          f"must be >= 0 and leave rows for training (with {key}.val_fraction={spec.val_fraction})",
          f"set {key}.test_fraction=0.1")
    check(not (spec.test_path and spec.test_fraction > 0), f"{key}.test_fraction", "the test split comes "
          f"from {key}.test_path or {key}.test_fraction, not both", f"set {key}.test_fraction=0")
    header = _header(spec.path, spec.delimiter, f"{key}.path")
    name = Path(spec.path).name
    check(spec.target in header, f"{key}.target",
          f"no column '{spec.target}' in {name}; its columns are: {', '.join(header)}", f"set {key}.target=COLUMN")
    for what, columns in (("features", spec.features or []), ("categorical_columns", spec.categorical_columns)):
        check(spec.target not in columns, f"{key}.{what}", f"the target '{spec.target}' cannot also be a feature",
              f"remove it from {key}.{what}")
        for column in columns:
            check(column in header, f"{key}.{what}", f"no feature column '{column}' in {name}",
                  f"choose from: {', '.join(c for c in header if c != spec.target)}")
    if spec.test_path:
        needed = [spec.target, *(spec.features or [c for c in header if c != spec.target])]
        test_header = _header(spec.test_path, spec.delimiter, f"{key}.test_path")
        absent = [c for c in needed if c not in test_header]
        check(not absent, f"{key}.test_path", f"{Path(spec.test_path).name} has no column "
              f"{', '.join(repr(c) for c in absent)}", f"give it the columns of {name}")
    check(spec.encoding is None or Path(spec.encoding).is_file(), f"{key}.encoding",
          f"no such file: {spec.encoding}", f"set {key}.encoding=RUN_DIR/data_encoding.json or null")


def _header(path: str, delimiter: Optional[str], key: str) -> List[str]:
    check(Path(path).is_file(), key, f"no such file: {path}", f"set {key}=FILE (a CSV, TSV or Parquet file)")
    return read_header(path, delimiter, key)[0]


# --- reading the columns, once -------------------------------------------------------------------


def probe(spec: "CsvSpec") -> Tuple[str, int]:
    """(task, 1): from `data.task`, the encoding, or else the target's values."""
    if spec.task != "auto":
        return spec.task, 1
    if spec.encoding:
        return read_encoding(spec.encoding).task, 1
    return _inferred_task(_read_args(spec, spec.path, "data.path", None), spec.max_classes), 1


@functools.lru_cache(maxsize=16)
def _inferred_task(read_args: tuple, max_classes: int) -> str:
    return _task_of(_columns(*read_args)[read_args[-2]], max_classes)


@functools.lru_cache(maxsize=1)
def _columns(path: str, mtime_ns: int, size: int, delimiter: Optional[str], names: Tuple[str, ...],
             na_values: Tuple[str, ...], categorical: Tuple[str, ...], target: str, key: str) -> Dict[str, Column]:
    """The columns of one file. Parsing a text file costs about the same for one column as for all of them,
    so the probe's task inference (at validation) reads every column the load needs, and the load that
    follows takes them from here - the file is parsed once - and then empties the cache."""
    return read_columns(path, delimiter, names, na_values, categorical, target=target, key=key)


def _read_args(spec: "CsvSpec", path: str, key: str, encoding: Optional[Encoding]) -> tuple:
    """The arguments of :func:`_columns` for ``path``: its identity and the settings that shape its columns
    (checked: every column is in the file)."""
    features = _feature_names(spec, encoding)
    check(len(features) > 0, "data.features", "no feature columns left", "set data.features=[COL1,COL2]")
    header = read_header(path, spec.delimiter, key)[0]
    name = Path(path).name
    absent = [c for c in [spec.target, *features] if c not in header]
    check(not absent, key, f"{name} has no column {', '.join(repr(c) for c in absent)}; its columns are: "
          f"{', '.join(header)}", f"give {name} the same columns as data.path")
    info = os.stat(path)
    return (path, info.st_mtime_ns, info.st_size, spec.delimiter, (spec.target, *features), tuple(spec.na_values),
            tuple(spec.categorical_columns), spec.target, key)


def _task_of(column: Column, max_classes: int) -> str:
    if not column.numeric:
        return "classification"
    values = column.values[~np.isnan(column.values)]
    integral = bool(np.all(np.isfinite(values)) and np.all(values == np.round(values)))
    return "classification" if integral and len(np.unique(values)) <= max_classes else "regression"


# --- reading a file ------------------------------------------------------------------------------


def _feature_names(spec: "CsvSpec", encoding: Optional[Encoding]) -> List[str]:
    if encoding is not None:
        fitted = [f["name"] for f in encoding.features]
        check(not spec.features or list(spec.features) == fitted, "data.features",
              f"the encoding in {spec.encoding} was fitted on the features {fitted}, not {list(spec.features or [])}",
              "set data.features=null to use the encoding's features")
        return fitted
    if spec.features:
        return list(spec.features)
    return [c for c in read_header(spec.path, spec.delimiter)[0] if c != spec.target]


def _read(spec: "CsvSpec", path: str, key: str, encoding: Optional[Encoding]) -> Table:
    """The file's rows that ``data.missing`` keeps, with their targets as classes or numbers."""
    features = _feature_names(spec, encoding)
    columns = dict(_columns(*_read_args(spec, path, key, encoding)))
    name = Path(path).name
    parquet = read_header(path, spec.delimiter, key)[1] is None
    target = columns.pop(spec.target)
    if encoding is not None:
        task = encoding.task
    else:
        task = spec.task if spec.task != "auto" else _task_of(target, spec.max_classes)  # as probe() infers it
    for column in features:
        _check_finite(columns[column], column, "data.features", name, parquet)
    keep = _kept_rows(spec, columns, target, features, name, parquet)
    filled = spec.missing == "mean"
    rows = np.flatnonzero(keep)
    columns = {c: col.take(rows) for c, col in columns.items()} if len(rows) < len(keep) else columns
    target = target.take(rows) if len(rows) < len(keep) else target
    if task == "regression":
        check(target.numeric, "data.target", f"column '{spec.target}' of {name} is not numeric, so it cannot be "
              "a regression target", "set data.task=classification")
        _check_finite(target, spec.target, "data.target", name, parquet)
        return Table(columns, features, task, target.values.reshape(-1, 1), None, name, rows, parquet, filled)
    y, classes = _class_indices(spec, target, encoding, name, parquet, rows)
    return Table(columns, features, task, y, classes, name, rows, parquet, filled)


def _check_finite(column: Column, name: str, key: str, file: str, parquet: bool) -> None:
    if not column.numeric or column.complete():
        return
    bad = np.flatnonzero(np.isinf(column.values))
    check(len(bad) == 0, key, f"column '{name}' of {file} holds infinite values on {len(bad)} row(s) "
          f"({place(bad, parquet)})", "fix those cells, or list their text in data.na_values to count them as missing")


def _kept_rows(spec: "CsvSpec", columns: Dict[str, Column], target: Column, features: List[str], file: str,
               parquet: bool) -> np.ndarray:
    """``data.missing``: refuse missing values, or the rows to keep (dropped ones are counted in the log)."""
    target_missing = target.missing()
    holes = {spec.target: target_missing} if target_missing.any() else {}
    holes.update({c: columns[c].missing() for c in features if not columns[c].complete()})
    holes = {c: m for c, m in holes.items() if m.any()}
    if not holes:
        return np.ones(len(target), dtype=bool)
    described = "; ".join(f"column '{c}' on {int(m.sum())} row(s) ({place(np.flatnonzero(m), parquet)})"
                          for c, m in holes.items())
    any_missing = np.logical_or.reduce(list(holes.values()))
    if spec.missing == "error":
        fix = ("set data.missing=drop to drop those rows, or data.missing=mean to fill numeric features with "
               "their mean over the train split (a missing category becomes a category of its own)")
        if spec.target in holes:
            fix += "; rows without a target are dropped under both"
        else:
            others = [f for f in features if f not in holes]
            fix += f"; or leave the column(s) out: data.features=[{','.join(others)}]" if others else ""
        raise ConfigError("data.missing", f"{file} has missing values in {int(any_missing.sum())} row(s): "
                          f"{described}", fix)
    dropped = target_missing | (any_missing if spec.missing == "drop" else False)
    if dropped.any():
        why = "a missing value" if spec.missing == "drop" else "no target"
        log.info("data.missing=%s: dropped %d of %d rows of %s with %s (%s)", spec.missing, int(dropped.sum()),
                 len(dropped), file, why, described)
    return ~dropped


def _class_indices(spec: "CsvSpec", target: Column, encoding: Optional[Encoding], file: str, parquet: bool,
                   rows: np.ndarray) -> Tuple[np.ndarray, List[Any]]:
    """Class indices of the target and the class values: those of the encoding, or else every value in the
    file (numbers in numeric order, texts in text order)."""
    if target.numeric:
        keys, inverse = np.unique(target.values, return_inverse=True)
        keys = keys.tolist()
    else:
        keys, inverse = list(target.levels), target.codes
    if encoding is not None:
        classes = encoding.classes
        numeric_classes = all(isinstance(c, (int, float)) for c in classes)
        keys = [as_class(k, numeric_classes) for k in keys]
    else:
        present = np.unique(inverse)
        classes = sorted(keys[i] for i in present)
        check(len(classes) >= 2, "data.target", f"column '{spec.target}' of {file} has a single class",
              "choose another data.target")
    index = {c: i for i, c in enumerate(classes)}
    lookup = np.array([index.get(k, -1) for k in keys] or [0], dtype=np.int64)
    y = lookup[inverse]
    unknown = np.flatnonzero(y < 0)
    if len(unknown):
        values = sorted({str(keys[inverse[i]]) for i in unknown})[:5]
        raise ConfigError("data.target", f"{file} has {len(unknown)} row(s) whose class the model was not trained "
                          f"on: {', '.join(values)} ({place(rows[unknown], parquet)})",
                          f"evaluate on rows of the classes {', '.join(map(str, encoding.class_names()))}")
    return y, classes


# --- split and loaders ---------------------------------------------------------------------------


def _split(spec: "CsvSpec", table: Table) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test row indices: the test rows first, then validation from the rest."""
    n = len(table)
    check(n >= MIN_ROWS, "data.path", f"{n} rows is too few to split into train and validation",
          f"use a file with at least {MIN_ROWS} rows")
    labels = table.y if table.task == "classification" else None
    rest, test = np.arange(n), np.arange(0)
    if spec.test_fraction > 0:
        rest, test = split_indices(n, spec.test_fraction, spec.seed, labels)
    train, val = split_indices(len(rest), spec.val_fraction, spec.seed, labels[rest] if labels is not None else None)
    return rest[train], rest[val], test


def _saved_encoding(spec: "CsvSpec") -> Optional[Encoding]:
    if not spec.encoding:
        return None
    encoding = read_encoding(spec.encoding)
    check(encoding.target == spec.target, "data.encoding", f"{spec.encoding} was fitted for the target "
          f"'{encoding.target}', not '{spec.target}'", f"set data.target={encoding.target}, or data.encoding=null")
    check(spec.task in ("auto", encoding.task), "data.task", f"the encoding in {spec.encoding} is for "
          f"{encoding.task}, not {spec.task}", f"set data.task={encoding.task}")
    return encoding


def load(spec: "CsvSpec") -> Arrays:
    """The train and validation arrays (never the test rows) and the encoding, in ``DataInfo.encoding``."""
    encoding = _saved_encoding(spec)
    table = _read(spec, spec.path, "data.path", encoding)
    train, val, _ = _split(spec, table)
    if encoding is None:
        encoding = fit_encoding(spec, table, train)
    x_train, x_val = encode(encoding, table, train, "train"), encode(encoding, table, val, "validation")
    y_train, y_val = targets(encoding, table, train), targets(encoding, table, val)
    common = dict(n_train=len(train), n_val=len(val), encoding=encoding.to_dict())
    if encoding.task == "classification":
        info = DataInfo("classification", (x_train.shape[1],), num_classes=len(encoding.classes),
                        class_names=tuple(encoding.class_names()), **common)
    else:
        scaled = encoding.target_mean is not None
        info = DataInfo("regression", (x_train.shape[1],), num_targets=1, **common,
                        target_mean=tuple(encoding.target_mean) if scaled else None,
                        target_std=tuple(encoding.target_std) if scaled else None)
    _columns.cache_clear()  # the arrays are made: let the columns go
    return Arrays(info, x_train, y_train, x_val, y_val)


def has_test_split(spec: Any) -> bool:
    return bool(getattr(spec, "test_path", None)) or getattr(spec, "test_fraction", 0) > 0


def check_test_split(spec: Any) -> None:
    """``--split test`` needs a test split: `data.test_path` or `data.test_fraction` (data=csv only)."""
    if spec.name != "csv":
        raise ConfigError("--split", f"data={spec.name} has no test split (only data=csv has one)",
                          "evaluate the validation split: leave out --split test")
    check(has_test_split(spec), "data.test_path", "this run has no test split: it was trained without "
          "data.test_fraction or data.test_path", "pass a test file with the same columns: trainctl eval RUN "
          "--split test data.test_path=FILE (or train with data.test_fraction=0.1)")


def load_test(spec: "CsvSpec") -> Tuple[np.ndarray, np.ndarray]:
    """The test split's inputs and targets, encoded as the run's train split was (its saved encoding, or
    else fitted again on the same train split)."""
    check_test_split(spec)
    encoding = _saved_encoding(spec)
    if encoding is None or not spec.test_path:
        table = _read(spec, spec.path, "data.path", encoding)
        train, _, test = _split(spec, table)
        encoding = encoding or fit_encoding(spec, table, train)
    if spec.test_path:
        table = _read(spec, spec.test_path, "data.test_path", encoding)
        test = np.arange(len(table))
    check(len(test) > 0, "data.test_path", f"the test split of {table.file} has no rows",
          "give data.test_path a file with rows, or train with a larger data.test_fraction")
    _columns.cache_clear()
    return encode(encoding, table, test, "test"), targets(encoding, table, test)
