"""Loading a large CSV for `data=csv`: the pyarrow reader (trainctl.csvfile + trainctl.tables) against the
pure-Python parser it replaced, side by side in one process, on the same file.

The file (written into a temporary directory with pyarrow): ROWS rows of 47 numeric columns (normal
numbers, 5 decimals), 2 categorical columns (4 and 3 text values) and an integer label of 3 classes -
50 columns. Timed, from the file to the arrays a run trains on (split, standardised; the task inferred
from the target as `data.task=auto` does):

- old: the parser trainctl had before (the `csv` module into lists of strings, then float() per cell),
  copied below verbatim; it cannot use the categorical columns, so it gets the 47 numeric ones;
- new, the same 47 numeric features (the arrays are checked equal to the old ones);
- new, all 49 features (the categorical ones one-hot encoded);
- new, all 49 features from the same table written as Parquet.

Each new figure is the median of --repeats (caches cleared); the old parser runs once (it takes a minute).
The new reader parses with a thread per core, the old one used one: on a busy machine the ratio shrinks.

    python benchmarks/csv_load.py [--rows 1000000] [--repeats 3] [--skip-old]
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, List, Optional, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NUMERIC = 47


def write_files(directory: Path, rows: int) -> Tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    columns = {f"x{i}": rng.normal(size=rows).round(5) for i in range(NUMERIC)}
    columns["city"] = np.array(["paris", "rome", "oslo", "lima"])[rng.integers(0, 4, rows)]
    columns["kind"] = np.array(["a", "b", "c"])[rng.integers(0, 3, rows)]
    columns["label"] = rng.integers(0, 3, rows)
    table = pa.table(columns)
    text, parquet = directory / "big.csv", directory / "big.parquet"
    pacsv.write_csv(table, text, pacsv.WriteOptions(quoting_style="none"))
    pq.write_table(table, parquet)
    return text, parquet


# --- the old parser (trainctl/csvfile.py before pyarrow), verbatim but for its cache and imports -------


def _old_read_table(path: str, delimiter: Optional[str]) -> Tuple[List[str], List[List[str]]]:
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
    header = [h.strip() for h in rows[0]]
    return header, rows[1:]


def _old_as_float(values: List[str]) -> Optional[np.ndarray]:
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return None


def _old_task(spec, target_values: List[str]) -> str:
    if spec.task != "auto":
        return spec.task
    numeric = _old_as_float(target_values)
    if numeric is None:
        return "classification"
    integral = bool(np.all(np.isfinite(numeric)) and np.all(numeric == np.round(numeric)))
    return "classification" if integral and len(np.unique(numeric)) <= spec.max_classes else "regression"


def old_load(spec):
    from trainctl.arrays import tabular

    header, rows = _old_read_table(spec.path, spec.delimiter)
    width = len(header)
    for line, row in enumerate(rows, start=2):
        if len(row) != width:
            raise ValueError(f"line {line}")
    columns = {name: [row[i].strip() for row in rows] for i, name in enumerate(header)}
    features = spec.features or [h for h in header if h != spec.target]
    matrix = []
    for name in features:
        values = _old_as_float(columns[name])
        if values is None:
            raise ValueError(f"column '{name}' is not numeric")
        matrix.append(values)
    x = np.stack(matrix, axis=1)
    target = columns[spec.target]
    task = _old_task(spec, target)
    numeric = _old_as_float(target)
    classes = sorted(set(numeric.tolist())) if numeric is not None else sorted(set(target))
    lookup = {c: i for i, c in enumerate(classes)}
    keys = numeric.tolist() if numeric is not None else target
    y = np.array([lookup[k] for k in keys], dtype=np.int64)
    names = [str(int(c)) if isinstance(c, float) and c.is_integer() else str(c) for c in classes]
    return tabular(x, y, spec, task, names, spec.standardize)


# --- the new loader --------------------------------------------------------------------------------


def new_load(path: Path, features: Optional[List[str]]):
    """As a run does it: the spec's probe (task inference, at validation) and then the load."""
    from trainctl import csvfile, tables
    from trainctl.data import CsvSpec

    tables._inferred_task.cache_clear()  # what a previous repeat cached
    tables._columns.cache_clear()
    csvfile._header_cached.cache_clear()
    spec = CsvSpec(path=str(path), target="label", features=features)
    tables.probe(spec)
    return tables.load(spec)


def timed(load: Callable[[], object], repeats: int) -> Tuple[float, float, object]:
    """Median wall seconds, median CPU seconds (all threads of the process), the last result."""
    wall, cpu, result = [], [], None
    for _ in range(repeats):
        result = None
        gc.collect()
        start, start_cpu = time.perf_counter(), time.process_time()
        result = load()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-old", action="store_true", help="time only the new loader")
    args = parser.parse_args()
    numeric = [f"x{i}" for i in range(NUMERIC)]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        text, parquet = write_files(Path(tmp), args.rows)
        print(f"{args.rows:,} rows x 50 columns: {text.stat().st_size / 1e6:.0f} MB CSV, "
              f"{parquet.stat().st_size / 1e6:.0f} MB Parquet (written in {time.perf_counter() - start:.1f} s)")
        *numeric_times, arrays = timed(lambda: new_load(text, numeric), args.repeats)
        *all_times, wide = timed(lambda: new_load(text, None), args.repeats)
        *parquet_times, _ = timed(lambda: new_load(parquet, None), args.repeats)
        rows = [("new, 47 numeric features (CSV)", *numeric_times, arrays.x_train.shape[1]),
                ("new, all 49 features, one-hot (CSV)", *all_times, wide.x_train.shape[1]),
                ("new, all 49 features, one-hot (Parquet)", *parquet_times, wide.x_train.shape[1])]
        old = None
        if not args.skip_old:
            spec = SimpleNamespace(path=str(text), delimiter=None, target="label", features=numeric, task="auto",
                                   max_classes=20, standardize=True, val_fraction=0.2, seed=0)
            old, old_cpu, reference = timed(lambda: old_load(spec), 1)
            assert np.array_equal(reference.y_train, arrays.y_train) and np.array_equal(reference.y_val, arrays.y_val)
            assert np.allclose(reference.x_train, arrays.x_train, atol=1e-5)
            assert np.allclose(reference.x_val, arrays.x_val, atol=1e-5)
            del reference
            rows.insert(0, ("old pure-Python parser, 47 numeric features", old, old_cpu, NUMERIC))
    print(f"\n{'loader':<44} {'seconds':>8} {'CPU s':>7} {'inputs':>7} {'vs old':>7}")
    for name, seconds, cpu, width in rows:
        ratio = f"{old / seconds:6.1f}x" if old else ""
        print(f"{name:<44} {seconds:8.2f} {cpu:7.2f} {width:7d} {ratio:>7}")
    print(f"\nseconds: wall time (median of {args.repeats} for the new loader), from the file to the arrays; CPU s: "
          "all threads; the machine has", os.cpu_count(), "CPUs")
    if old:
        print("\nthe old and new arrays of the 47 numeric features are equal (atol 1e-5), labels identical")


if __name__ == "__main__":
    main()
