"""The `data` config group: built-in datasets (digits, synthetic, csv, text, and hf_text / hf_classification
tokenised with a Hugging Face tokenizer), their specs and loading.

Everything here is numpy-only so the CLI can validate a spec without importing torch (or transformers);
:mod:`trainctl.batches` turns the loaded arrays into tensors and batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np
from omegaconf import MISSING

from trainctl import csvfile, tables, tokenized
from trainctl.arrays import Arrays, DataInfo, split_indices, tabular, with_class_counts
from trainctl.data_sources import CustomDataSpec, ImagesSpec, TokensSpec
from trainctl.dataspec import DataSpec
from trainctl.dataspec import absolute as _absolute
from trainctl.errors import check, check_choice
from trainctl.registry import Registry

TASKS = ("classification", "regression", "lm")
__all__ = ["CustomDataSpec", "DataSpec", "ImagesSpec", "TokensSpec"]


@dataclass
class DigitsSpec(DataSpec):
    """scikit-learn's bundled 8x8 handwritten digits: 1,797 images, 10 classes, no download."""

    name: str = "digits"
    classes: Optional[List[int]] = None
    """Keep only these digits, relabelled 0..k-1 in the order given (e.g. [5,6,7,8,9] for a transfer
    experiment); null keeps all ten."""

    def validate(self, key: str = "data") -> None:
        super().validate(key)
        if self.classes is not None:
            check(len(self.classes) >= 2 and len(set(self.classes)) == len(self.classes)
                  and all(0 <= c <= 9 for c in self.classes), f"{key}.classes",
                  f"must list at least two different digits 0..9 (got {list(self.classes)})",
                  f"set {key}.classes=[0,1,2,3,4] or null")


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
    """A table with a header row - CSV, TSV or Parquet - with one target column and numeric or categorical
    feature columns; missing values by a stated policy; an optional test split (see :mod:`trainctl.tables`)."""

    name: str = "csv"
    path: str = MISSING
    """The file: .parquet/.pq is Parquet, .tsv/.tab tab-separated text, anything else CSV (separator
    detected). Relative paths are taken from the directory the command runs in."""
    target: str = MISSING
    """Header name of the column to predict."""
    features: Optional[List[str]] = None
    """Feature columns; null uses every column except the target."""
    categorical_columns: List[str] = field(default_factory=list)
    """Feature columns that are categories although they hold numbers (codes, postcodes); a column that holds
    text is categorical anyway."""
    categorical: str = "onehot"
    """How a categorical feature becomes inputs: `onehot` (a 0/1 column per category of the train split, all
    zeros for a category it does not have) or `codes` (one float column with the category's number 1..k, 0
    when unknown; for a model of your own that embeds the last columns)."""
    max_categories: int = 256
    """A categorical feature with more categories than this in the train split is refused (an identifier?)."""
    missing: str = "error"
    """Missing cells (`na_values`): `error` refuses the file, naming them; `drop` drops their rows; `mean` fills
    a numeric feature with its mean over the train split and gives a categorical one a `<missing>` category.
    Rows without a target are dropped under `drop` and `mean`, with a count in the log."""
    na_values: List[str] = field(default_factory=lambda: list(csvfile.NA_VALUES))
    """Cell texts (after trimming spaces) that mean "missing"."""
    task: str = "auto"
    """`auto` (a text target, or at most `max_classes` integer values, is classification), `classification` or `regression`."""
    max_classes: int = 20
    """With `task=auto`: an integer target with at most this many distinct values is a class label."""
    delimiter: Optional[str] = None
    """Column separator of a text file; null detects it (tab for .tsv files)."""
    standardize: bool = True
    """Scale numeric features (and regression targets) to zero mean and unit variance using the train split only."""
    test_fraction: float = 0.0
    """Share of the rows held out as a test split (stratified for classification, seeded by `data.seed`) before
    `val_fraction` is taken from the rest; never trained or validated on: `trainctl eval RUN --split test`."""
    test_path: Optional[str] = None
    """A test file with the same columns, instead of `test_fraction`: `trainctl eval RUN --split test`."""
    encoding: Optional[str] = None
    """A run's `data_encoding.json`: apply its encoding rather than fit one on the train split (`trainctl eval`
    uses the run's own)."""

    def validate(self, key: str = "data") -> None:
        super().validate(key)
        tables.check_spec(self, key)  # the settings and the files' headers; no rows are read

    def resolve_paths(self, base_dir: str) -> None:
        self.path = _absolute(self.path, base_dir)
        self.test_path = _absolute(self.test_path, base_dir) if self.test_path else self.test_path
        self.encoding = _absolute(self.encoding, base_dir) if self.encoding else self.encoding


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


@dataclass
class HfTextSpec(DataSpec):
    """Text for a causal language model, tokenised with a Hugging Face tokenizer from a local directory:
    each document, followed by the tokenizer's EOS token, is appended to one token stream, which is cut
    into non-overlapping blocks of `seq_len + 1` tokens (input: the first `seq_len`, target: the last
    `seq_len`); the blocks are split into train and validation by `data.seed`."""

    name: str = "hf_text"
    path: str = MISSING
    """A .jsonl (or .ndjson) file, one JSON object per line, the text in `data.field`; any other file is
    plain UTF-8 text, tokenised as one document. Relative paths are taken from the directory the command
    runs in."""
    field: str = "text"
    """The field of each JSONL record that holds its text (ignored for plain text)."""
    tokenizer: str = MISSING
    """A local directory with the tokenizer's files (tokenizer.json or tokenizer_config.json), normally
    the model's own: data.tokenizer=${model.path}. Nothing is downloaded."""
    seq_len: int = 128
    """Tokens per training sequence."""
    val_fraction: float = 0.1

    def validate(self, key: str = "data") -> None:
        super().validate(key)
        tokenized.check_file(self.path, f"{key}.path", "a .txt or .jsonl file")
        tokenized.check_tokenizer_dir(self.tokenizer, f"{key}.tokenizer")
        check(bool(self.field), f"{key}.field", "must name a field", f"set {key}.field=text")
        check(self.seq_len >= 2, f"{key}.seq_len", f"must be >= 2 (got {self.seq_len})", f"set {key}.seq_len=128")

    def resolve_paths(self, base_dir: str) -> None:
        self.path = _absolute(self.path, base_dir)
        self.tokenizer = _absolute(self.tokenizer, base_dir)


@dataclass
class HfClassificationSpec(DataSpec):
    """Texts with class labels from a CSV/TSV or JSONL file, tokenised with a Hugging Face tokenizer from
    a local directory: truncated to `max_length` tokens and padded to the longest one. A sample is a
    (2, L) array of token ids (row 0) and attention mask (row 1: 1 real, 0 padding)."""

    name: str = "hf_classification"
    path: str = MISSING
    """A .jsonl (or .ndjson) file, one JSON object per line; otherwise a CSV file with a header row (tab
    separated for .tsv/.tab). Relative paths are taken from the directory the command runs in."""
    text: str = "text"
    """The column (or JSONL field) holding the text."""
    label: str = "label"
    """The column (or JSONL field) holding the class: integers become classes in numeric order, anything
    else in sorted text order; `class_names` records the original values."""
    tokenizer: str = MISSING
    """A local directory with the tokenizer's files (tokenizer.json or tokenizer_config.json), normally
    the model's own: data.tokenizer=${model.path}. Nothing is downloaded."""
    max_length: int = 128
    """Longest sequence in tokens: longer texts are truncated."""

    def validate(self, key: str = "data") -> None:
        super().validate(key)
        tokenized.check_file(self.path, f"{key}.path", "a CSV, TSV or .jsonl file")
        tokenized.check_tokenizer_dir(self.tokenizer, f"{key}.tokenizer")
        check(bool(self.text), f"{key}.text", "must name a column", f"set {key}.text=text")
        check(bool(self.label), f"{key}.label", "must name a column", f"set {key}.label=label")
        check(self.text != self.label, f"{key}.label", f"'{self.label}' is also data.text",
              f"set {key}.label=COLUMN (the class of each text)")
        check(self.max_length >= 2, f"{key}.max_length", f"must be >= 2 (got {self.max_length})",
              f"set {key}.max_length=128")

    def resolve_paths(self, base_dir: str) -> None:
        self.path = _absolute(self.path, base_dir)
        self.tokenizer = _absolute(self.tokenizer, base_dir)


@dataclass(frozen=True)
class DataEntry:
    spec: type
    probe: Any
    """spec -> (task, input rank): cheap facts for cross-group checks, without loading."""
    load: Any
    """spec -> Arrays; with `cached`, (spec, cache_dir) -> Arrays."""
    cached: bool = False
    """The loader takes a cache directory (None: no cache) where it keeps its slow work, e.g. tokenising,
    so that a resumed run does not do it again."""
    token_ids: Any = False
    """The inputs are integer token ids (for models with an embedding), not float features (or a function
    of the spec that says whether they are)."""


DATASETS: Registry[DataEntry] = Registry("data")


def probe(spec: DataSpec) -> Tuple[str, int]:
    """(task, input rank) of a validated spec, reading no more than a CSV's target column."""
    return DATASETS.get(spec.name).probe(spec)


def token_ids(spec: DataSpec) -> bool:
    """Whether the dataset's inputs are integer token ids, which only models with an embedding can take."""
    tokens = DATASETS.get(spec.name).token_ids
    return tokens(spec) if callable(tokens) else tokens


def load(spec: DataSpec, cache_dir: Optional[Path] = None) -> Arrays:
    """The dataset's arrays. ``cache_dir`` (normally `RUN_DIR/cache`) keeps what is slow to compute, for
    the datasets that have such work (tokenising); others ignore it."""
    entry = DATASETS.get(spec.name)
    return with_class_counts(entry.load(spec, cache_dir) if entry.cached else entry.load(spec))


# --- loaders --------------------------------------------------------------------------------------


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
    classes = list(spec.classes) if spec.classes is not None else list(range(10))
    if spec.classes is not None:
        keep = np.isin(y, classes)
        relabel = np.zeros(10, dtype=np.int64)
        relabel[classes] = np.arange(len(classes))
        x, y = x[keep], relabel[y[keep]]
    tr, va = split_indices(len(y), spec.val_fraction, spec.seed, y)
    info = DataInfo("classification", (1, 8, 8), num_classes=len(classes), n_train=len(tr), n_val=len(va),
                    class_names=tuple(str(c) for c in classes))
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


def _images(spec: ImagesSpec) -> Arrays:
    from trainctl import images

    return images.load(spec)


def _custom(name: str) -> Any:
    def call(spec: Any) -> Any:
        from trainctl import custom_data

        return getattr(custom_data, name)(spec)
    return call


DATASETS.add("custom", DataEntry(CustomDataSpec, _custom("probe"), _custom("load"), token_ids=_custom("tokens")))
DATASETS.add("images", DataEntry(ImagesSpec, lambda s: ("classification", 3), _images))
DATASETS.add("digits", DataEntry(DigitsSpec, lambda s: ("classification", 3), _load_digits))
DATASETS.add("synthetic", DataEntry(SyntheticSpec, lambda s: (s.task, 1), _load_synthetic))
DATASETS.add("csv", DataEntry(CsvSpec, tables.probe, tables.load))
DATASETS.add("text", DataEntry(TextSpec, lambda s: ("lm", 1), _load_text, token_ids=True))
DATASETS.add("hf_text", DataEntry(HfTextSpec, lambda s: ("lm", 1), tokenized.load_text, cached=True, token_ids=True))
DATASETS.add("hf_classification", DataEntry(HfClassificationSpec, lambda s: ("classification", 2),
                                            tokenized.load_classification, cached=True, token_ids=True))
DATASETS.add("tokens", DataEntry(TokensSpec, lambda s: ("lm", 1), TokensSpec.load, cached=True, token_ids=True))
