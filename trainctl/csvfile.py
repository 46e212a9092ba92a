"""Tabular files: CSV, TSV (tab separated) and Parquet - their header, cheaply, and their columns.

The reader is pyarrow, not pandas. pyarrow parses CSV in C++ with a thread per core (from a 1,000,000 x 50
CSV of 404 MB to a run's arrays takes 2-3 s on two cores, where the pure-Python parser it replaces took
38 s: benchmarks/csv_load.py), reads Parquet natively (pandas would need pyarrow for that too), and
`pyarrow` + `pyarrow.csv` + `pyarrow.compute` import in 0.18 s, where pandas alone takes 0.36 s (measured
here) and parses with one thread. One dependency covers the three formats, without a second copy of the
data as pandas objects.

Start-up stays fast: pyarrow is imported only when a table is read. :func:`read_header` (what a spec's
`validate()` needs) reads a CSV's first line with the `csv` module and a Parquet file's schema from its
footer, never the rows.

A column arrives as a :class:`Column`: numbers (float64, NaN where the cell is missing) or categories
(integer codes into its ``levels``, -1 where missing). A text column whose cells are nearly all numbers
is refused, naming the rows that are not, rather than turned into categories by a typo.

:func:`read_table` is the small pure-Python reader that `data=hf_classification` uses for its texts.
"""

from __future__ import annotations

import codecs
import csv
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from trainctl.errors import ConfigError

PARQUET_SUFFIXES = (".parquet", ".pq")
TAB_SUFFIXES = (".tsv", ".tab")
NUMBER = r"^[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|infinity|nan)$"
"""A cell that reads as a number (after trimming spaces): what pyarrow's cast to float64 accepts."""
MOSTLY_NUMERIC = 0.9
"""A text column with at least this share of number cells is taken for a numeric column with typos."""
PYARROW_FIX = "pip install 'pyarrow>=16'"
NA_VALUES = ("", "NA", "N/A", "n/a", "#N/A", "NaN", "nan", "null", "NULL", "?")
"""The cells `data.na_values` counts as missing by default."""


def is_parquet(path: str) -> bool:
    return path.lower().endswith(PARQUET_SUFFIXES)


def place(rows: Sequence[int], parquet: bool) -> str:
    """Where rows (0-based, header excluded) are: "line 4, 9 and 2 more" in a text file (the header is
    line 1), "row 3, 8" in a Parquet file."""
    numbers = [int(r) + (1 if parquet else 2) for r in rows[:5]]
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return f"{'row' if parquet else 'line'} {', '.join(str(n) for n in numbers)}{more}"


def _pyarrow(path: str, key: str = "data.path") -> Any:
    try:
        import pyarrow
    except ImportError:
        raise ConfigError(key, f"reading {Path(path).name} needs pyarrow, which is not installed",
                          PYARROW_FIX) from None
    return pyarrow


# --- the header ----------------------------------------------------------------------------------


def read_header(path: str, delimiter: Optional[str], key: str = "data.path") -> Tuple[List[str], Optional[str]]:
    """(column names, separator) of a file, reading only its first line (a CSV) or its schema (Parquet);
    the separator is None for Parquet. Cached by path and modification time. ``key``: the setting that
    chose the file, for messages."""
    info = os.stat(path)
    return _header_cached(path, delimiter, info.st_mtime_ns, info.st_size, key)


@functools.lru_cache(maxsize=16)
def _header_cached(path: str, delimiter: Optional[str], mtime_ns: int, size: int,
                   key: str) -> Tuple[List[str], Optional[str]]:
    name = Path(path).name
    if is_parquet(path):
        _pyarrow(path, key)
        import pyarrow.parquet as pq

        try:
            header = list(pq.read_schema(path).names)
        except Exception as exc:  # pyarrow's ArrowInvalid / OSError: not a Parquet file
            raise ConfigError(key, f"{name} cannot be read as Parquet: {_first_line(exc)}",
                              f"point {key} at a Parquet file, or rename a CSV file to .csv") from None
        separator = None
    else:
        header, separator = _text_header(path, delimiter, key)
    _check_names(header, name, key)
    return header, separator



def sniff_delimiter(path: str, sample: str) -> str:
    """Tab for .tsv/.tab files, else the separator the first 64 KiB suggest (comma when unclear)."""
    if path.lower().endswith(TAB_SUFFIXES):
        return "\t"
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def _text_header(path: str, delimiter: Optional[str], key: str) -> Tuple[List[str], str]:
    name = Path(path).name
    try:
        with open(path, "rb") as handle:
            sample = handle.read(64 * 1024)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    text = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
    try:
        decoded = text.decode(sample, final=len(sample) < 64 * 1024)
    except UnicodeDecodeError as exc:
        raise _not_utf8(name, sample[exc.start], exc.start, key) from None
    if not decoded.strip():
        raise ConfigError(key, f"{path} is empty", f"point {key} at a CSV file with a header row")
    delimiter = delimiter or sniff_delimiter(path, decoded)
    first = next(csv.reader(decoded.splitlines()[:1] or [""], delimiter=delimiter), [])
    return [h.strip() for h in first], delimiter


def _check_names(header: List[str], name: str, key: str = "data.path") -> None:
    seen = set()
    for column in header:
        if column in seen:
            raise ConfigError(key, f"{name} has two columns named '{column}'",
                              "give every column of the header its own name")
        seen.add(column)


def _not_utf8(name: str, byte: int, offset: int, key: str = "data.path") -> ConfigError:
    return ConfigError(key, f"{name} is not UTF-8 text (byte 0x{byte:02x} at offset {offset})",
                       f"save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {name} > utf8.csv")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# --- the columns ---------------------------------------------------------------------------------


@dataclass
class Column:
    """One column of a table: numbers or categories."""

    values: Optional[np.ndarray] = None
    """float64, NaN where the cell is missing (numeric columns)."""
    codes: Optional[np.ndarray] = None
    """int64 indices into ``levels``, -1 where the cell is missing (categorical columns)."""
    levels: Optional[List[str]] = None
    _complete: Optional[bool] = field(default=None, repr=False, compare=False)

    @property
    def numeric(self) -> bool:
        return self.values is not None

    def missing(self) -> np.ndarray:
        return np.isnan(self.values) if self.numeric else self.codes < 0

    def complete(self) -> bool:
        """No cell is missing, and every number is finite (one pass, remembered)."""
        if self._complete is None:
            self._complete = bool(np.isfinite(self.values).all() if self.numeric else (self.codes >= 0).all())
        return self._complete

    def take(self, rows: np.ndarray) -> "Column":
        if self.numeric:
            return Column(values=self.values[rows])
        return Column(codes=self.codes[rows], levels=self.levels)

    def __len__(self) -> int:
        return len(self.values) if self.numeric else len(self.codes)


def read_columns(path: str, delimiter: Optional[str], names: Sequence[str], na_values: Sequence[str],
                 categorical: Sequence[str] = (), target: Optional[str] = None, key: str = "data.path"
                 ) -> Dict[str, Column]:
    """The columns ``names`` of a CSV/TSV/Parquet file. Cells equal to one of ``na_values`` (after
    trimming spaces) are missing; columns in ``categorical`` are categories even when they hold numbers.
    Messages name ``key`` (the setting that chose the file) for the file, `data.target` for the column
    ``target`` and `data.features` for the others."""
    pa = _pyarrow(path, key)
    header, separator = read_header(path, delimiter, key)
    parquet = separator is None
    table = (_read_parquet(path, names, key) if parquet
             else _read_text(pa, path, header, separator, names, na_values, key))
    arrays = {column: table.column(column) for column in names}
    del table
    columns = {}
    for column in names:  # each Arrow column is released once converted: its memory serves the next one
        columns[column] = _column(pa, arrays.pop(column), column, column in categorical, na_values, path, parquet,
                                  "data.target" if column == target else "data.features", key)
    return columns


def _read_parquet(path: str, names: Sequence[str], key: str) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=list(names))
    except Exception as exc:  # ArrowInvalid, OSError: a damaged file
        raise ConfigError(key, f"{Path(path).name} cannot be read as Parquet: {_first_line(exc)}",
                          "fix or re-export the file") from None


def _read_text(pa: Any, path: str, header: List[str], separator: str, names: Sequence[str],
               na_values: Sequence[str], key: str) -> Any:
    import pyarrow.csv as pacsv

    read = pacsv.ReadOptions(column_names=header, skip_rows=1, block_size=1 << 22)
    parse = pacsv.ParseOptions(delimiter=separator)

    def convert(types: Optional[Dict[str, Any]]) -> Any:
        return pacsv.ConvertOptions(include_columns=list(names), null_values=list(na_values), column_types=types,
                                    strings_can_be_null=True, quoted_strings_can_be_null=True, timestamp_parsers=[])
    # Types guessed from the first rows (a quarter faster than pyarrow's guessing); should a later cell not
    # fit, pyarrow guesses itself, and failing that every column is read as text.
    attempts = [_sampled_types(pa, pacsv, path, read, parse, convert(None)), None, {n: pa.string() for n in names}]
    try:
        for number, types in enumerate(attempts):
            if types == {}:
                continue
            try:
                return pacsv.read_csv(path, read, parse, convert(types))
            except pa.ArrowInvalid as exc:
                if "conversion error" not in str(exc).lower() or number == len(attempts) - 1:
                    raise
    except pa.ArrowInvalid as exc:
        raise _text_error(path, header, separator, exc, key) from None
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or _first_line(exc)}") from None


def _sampled_types(pa: Any, pacsv: Any, path: str, read: Any, parse: Any, convert: Any) -> Dict[str, Any]:
    """float64 for the columns whose first megabyte of rows holds numbers, text for those with text; {} when
    the sample cannot be parsed on its own (a quoted value spanning lines cut off)."""
    with open(path, "rb") as handle:
        sample = handle.read(1 << 20)
    if len(sample) == 1 << 20:
        sample = sample[:sample.rfind(b"\n") + 1]
    try:
        schema = pacsv.read_csv(pa.py_buffer(sample), read, parse, convert).schema
    except (pa.ArrowInvalid, OSError):
        return {}
    types = {}
    for column in schema:
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            types[column.name] = pa.float64()
        elif pa.types.is_string(column.type):
            types[column.name] = pa.string()
    return types


def _text_error(path: str, header: List[str], separator: str, exc: BaseException, key: str) -> ConfigError:
    """A parse error with the line it is on: found again with the `csv` module (only after a failure)."""
    name = Path(path).name
    if "invalid utf" in str(exc).lower():
        return _utf8_error(path, key)
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
        for line, row in enumerate(csv.reader(handle, delimiter=separator), start=1):
            if line > 1 and row and len(row) != len(header):
                return ConfigError(key, f"{name} line {line} has {len(row)} fields, the header has "
                                   f"{len(header)}", "fix the file or set data.delimiter")
    return ConfigError(key, f"{name} cannot be read as CSV: {_first_line(exc)}",
                       "fix the file or set data.delimiter")


def _utf8_error(path: str, key: str) -> ConfigError:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0  # of the block in the file; the decoder keeps an incomplete character's bytes between blocks
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            held = len(decoder.getstate()[0])
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:  # exc.object is the held bytes followed by the block
                return _not_utf8(Path(path).name, exc.object[exc.start], offset - held + exc.start, key)
            offset += len(block)
    return ConfigError(key, f"{Path(path).name} is not UTF-8 text", "save it as UTF-8")


def _column(pa: Any, chunked: Any, name: str, categorical: bool, na_values: Sequence[str], path: str,
            parquet: bool, key: str, file_key: str) -> Column:
    import pyarrow.compute as pc

    file = Path(path).name
    array = chunked.combine_chunks() if chunked.num_chunks != 1 else chunked.chunk(0)
    kind = array.type
    if pa.types.is_dictionary(kind):
        array, kind = array.cast(kind.value_type), kind.value_type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        if not parquet:
            raise _utf8_error(path, file_key)  # pyarrow keeps invalid UTF-8 as bytes
        raise ConfigError(key, f"column '{name}' of {file} holds bytes, not text or numbers",
                          f"leave it out: data.features=[...] without {name}")
    if pa.types.is_null(kind):  # every cell empty
        return Column(values=np.full(len(array), np.nan))
    if pa.types.is_boolean(kind) or pa.types.is_large_string(kind):
        array, kind = array.cast(pa.string()), pa.string()
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        if categorical:
            return _categories(pc, pc.cast(array, pa.string()))
        values = pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)
        return Column(values=np.asarray(values, dtype=np.float64))
    if not pa.types.is_string(kind):
        raise ConfigError(key, f"column '{name}' of {file} holds {kind} values (dates, times, lists...), which "
                          "are not features trainctl can encode", f"leave it out: data.features=[...] without "
                          f"{name}, or turn it into numbers or categories in the file")
    trimmed = pc.utf8_trim_whitespace(array)
    trimmed = pc.if_else(pc.is_in(trimmed, value_set=pa.array(list(na_values), pa.string())),
                         pa.scalar(None, trimmed.type), trimmed)
    column = _categories(pc, trimmed)
    if categorical or not column.levels:
        return column
    return _numbers_or_categories(pc, pa, column, name, file, parquet, key, na_values)


def _categories(pc: Any, array: Any) -> Column:
    encoded = pc.dictionary_encode(array)
    codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return Column(codes=codes, levels=encoded.dictionary.to_pylist())


def _numbers_or_categories(pc: Any, pa: Any, column: Column, name: str, file: str, parquet: bool, key: str,
                           na_values: Sequence[str]) -> Column:
    """A text column whose every level is a number becomes numbers; one whose cells are nearly all numbers
    is refused with the rows that are not; any other stays categories."""
    levels = pa.array(column.levels, pa.string())
    is_number = np.asarray(pc.match_substring_regex(levels, NUMBER, ignore_case=True).to_numpy(zero_copy_only=False))
    if is_number.all():
        lookup = np.append(pc.cast(levels, pa.float64()).to_numpy(zero_copy_only=False), np.nan)
        return Column(values=lookup[column.codes])  # code -1 (missing) takes the NaN at the end
    present = column.codes >= 0
    numeric_cells = present & np.append(is_number, False)[column.codes]
    if is_number.any() and numeric_cells.sum() >= MOSTLY_NUMERIC * present.sum():
        bad = np.flatnonzero(present & ~numeric_cells)
        shown = ", ".join(f"{place([r], parquet)} '{column.levels[column.codes[r]][:20]}'" for r in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        words = sorted({column.levels[column.codes[r]] for r in bad})[:3]
        listed = ",".join("'" + w.replace("'", "") + "'" for w in [*na_values, *words])
        raise ConfigError(key, f"column '{name}' of {file} holds numbers except in {len(bad)} cell(s): {shown}{more}",
                          f"fix those cells; or count them as missing: \"data.na_values=[{listed}]\"; or make the "
                          f"column categorical: data.categorical_columns=[{name}]")
    return column


# --- small text tables (data=hf_classification) --------------------------------------------------


@functools.lru_cache(maxsize=4)
def _read_table_cached(path: str, delimiter: Optional[str], mtime_ns: int) -> Tuple[List[str], List[List[str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            sample = handle.read(64 * 1024)
            handle.seek(0)
            delimiter = delimiter or sniff_delimiter(path, sample)
            rows = [row for row in csv.reader(handle, delimiter=delimiter) if row]
    except UnicodeDecodeError as exc:
        raise _not_utf8(Path(path).name, exc.object[exc.start], exc.start) from None
    except csv.Error as exc:
        raise ConfigError("data.path", f"{Path(path).name} cannot be read as CSV: {exc}",
                          "fix the file or set data.delimiter") from None
    except OSError as exc:
        raise ConfigError("data.path", f"cannot read {path}: {exc.strerror or exc}") from None
    if not rows:
        raise ConfigError("data.path", f"{path} is empty", "point data.path at a CSV file with a header row")
    header = [h.strip() for h in rows[0]]
    _check_names(header, Path(path).name)
    return header, rows[1:]


def read_table(path: str, delimiter: Optional[str]) -> Tuple[List[str], List[List[str]]]:
    """Header and rows of a small delimited text file, as strings (cached by path and modification time):
    for the texts of `data=hf_classification`, which are not columns of numbers."""
    return _read_table_cached(path, delimiter, os.stat(path).st_mtime_ns)
