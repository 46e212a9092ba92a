"""CSV and TSV files for `data=csv`: reading the table (UTF-8, the separator detected, one name per
column), refusing holes with their line numbers, inferring the task, and turning the columns into
arrays. Pure Python and NumPy."""

from __future__ import annotations

import csv
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

import numpy as np

from trainctl.arrays import Arrays, tabular
from trainctl.errors import ConfigError, check

if TYPE_CHECKING:
    from trainctl.data import CsvSpec


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


def probe(spec: CsvSpec) -> Tuple[str, int]:
    columns, _ = _csv_columns(spec)
    return _csv_task(spec, columns[spec.target]), 1


def load(spec: CsvSpec) -> Arrays:
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
        return tabular(x, y, spec, task, names, spec.standardize)
    y = _as_float(target)
    check(y is not None and bool(np.all(np.isfinite(y))), "data.target",
          f"column '{spec.target}' is not numeric, so it cannot be a regression target",
          "set data.task=classification")
    return tabular(x, y.reshape(-1, 1), spec, task, None, spec.standardize)
