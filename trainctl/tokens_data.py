"""`data=tokens`: a pre-tokenised corpus of any size, read a batch of windows at a time from its files.

This module owns the token files (flat `.bin` files of uint16/uint32 ids as nanoGPT's prepare.py and
`trainctl prepare-tokens` write them, or 1-D integer `.npy` arrays), the `meta.json` written beside them,
the cheap checks of `data.validate()`, which window each sample index is, reading windows through a
memory map, and the one check of every token id against the vocabulary. NumPy only at import; the
torch side (the :class:`trainctl.batches.Source`) is :mod:`trainctl.token_source`.

Windows. A sample is ``seq_len + 1`` consecutive tokens: the input is the first ``seq_len``, the target
the last ``seq_len``. Sequential windows start at ``i * seq_len``; random ones at a start that is a pure
function of (data.seed, epoch, index) - a counter-based hash, no RNG state - so a run resumed mid-epoch,
with or without DataLoader workers, reads exactly the windows the uninterrupted run read.

Memory. The files are mapped, never read whole. Pages touched through a mapping stay in the process's
resident set while the mapping lives (with the large page-cache folios of recent kernels, up to 2 MiB per
random window), so after every few windows the reader tells the kernel it no longer needs them
(``madvise(MADV_DONTNEED)``: the data stay in the page cache, only the process's mapping of them goes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import numpy as np

from trainctl.errors import ConfigError, check, check_choice
from trainctl.files import read_bounded

if TYPE_CHECKING:
    from trainctl.data_sources import TokensSpec

log = logging.getLogger("trainctl")

BIN_DTYPES = ("uint16", "uint32")
"""Token types of a raw .bin file (a .npy file records its own)."""
META_FILE = "meta.json"
SAMPLINGS = ("random", "sequential")
SCAN_CHUNK_TOKENS = 1 << 22
"""Tokens read per chunk by the range check (8-16 MiB, a reused buffer)."""
RELEASE_EVERY_WINDOWS = 16
"""Windows read through the map before its pages are handed back (bounds the resident set)."""
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# --- the files --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenFile:
    """Where one split's tokens are: all a process needs to map the file again (it is what is pickled
    to DataLoader workers, never the mapping)."""

    path: str
    dtype: str
    offset: int
    """Bytes before the first token (a .npy header)."""
    n_tokens: int


def split_paths(spec: "TokensSpec") -> Tuple[Path, Path]:
    """The train and validation files: `data.train_path`/`data.val_path`, else `data.path`'s train.bin and
    val.bin (or train.npy and val.npy)."""
    def find(given: Optional[str], split: str) -> Path:
        if given:
            return Path(given)
        for suffix in (".bin", ".npy"):
            if (Path(spec.path) / f"{split}{suffix}").is_file():
                return Path(spec.path) / f"{split}{suffix}"
        return Path(spec.path) / f"{split}.bin"
    return find(spec.train_path, "train"), find(spec.val_path, "val")


def read_meta(directory: Path) -> Optional[Dict[str, Any]]:
    """The meta.json in ``directory`` (written by `trainctl prepare-tokens`), or None when there is none."""
    path = directory / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(read_bounded(path, 1 << 20).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError("data.path", f"{path} cannot be read as JSON ({exc})",
                          "fix or delete it (then set data.vocab_size and data.dtype)") from None
    if not isinstance(meta, dict):
        raise ConfigError("data.path", f"{path} is not a JSON object", "fix or delete it")
    return meta


def _npy_file(path: Path, key: str) -> Tuple[str, int, int]:
    """(dtype, header bytes, tokens) of a .npy file, from its header alone."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as handle:
            version = fmt.read_magic(handle)
            shape, fortran, dtype = (fmt.read_array_header_1_0(handle) if version == (1, 0)
                                     else fmt.read_array_header_2_0(handle))
            offset = handle.tell()
    except (OSError, ValueError) as exc:
        raise ConfigError(key, f"{path} is not a readable .npy file ({exc})", "write it with np.save") from None
    check(len(shape) == 1 and dtype.kind in "ui" and dtype.itemsize <= 8 and dtype.byteorder in "=|<", key,
          f"{path.name} holds a {dtype} array of shape {shape}; token files are 1-D arrays of integers",
          "save the token ids flat, e.g. np.save(FILE, ids.astype(np.uint16))")
    expected = offset + shape[0] * dtype.itemsize if shape else offset
    check(os.path.getsize(path) >= expected, key, f"{path.name} is truncated", "write it again")
    return dtype.name, offset, int(shape[0])


def token_file(path: Path, dtype: Optional[str], key: str) -> TokenFile:
    """A split's file, checked: it exists, its type is known, its size is a whole number of tokens."""
    check(path.is_file(), key, f"no such file: {path}", f"set {key} to a token file (or a directory with "
          "train.bin and val.bin: data.path=DIR)")
    if path.suffix.lower() == ".npy":
        return TokenFile(str(path), *_npy_file(path, key))  # data.dtype is for .bin files
    check(dtype is not None, "data.dtype", f"{path.name} is a raw token file and no meta.json beside it says "
          "how wide its tokens are", "set data.dtype=uint16 (nanoGPT's GPT-2 files) or data.dtype=uint32")
    size, width = os.path.getsize(path), np.dtype(dtype).itemsize
    check(size % width == 0, "data.dtype", f"{path.name} has {size:,} bytes, not a whole number of {dtype} "
          f"tokens ({width} bytes each)", "set data.dtype to the type the file was written with, or write it again")
    return TokenFile(str(path), str(dtype), 0, size // width)


@dataclass(frozen=True)
class Corpus:
    """The facts of a spec's files: both splits and the vocabulary."""

    train: TokenFile
    val: TokenFile
    vocab_size: int
    meta: Optional[Dict[str, Any]]
    meta_dir: Path


def corpus(spec: "TokensSpec", key: str = "data") -> Corpus:
    """The spec's files, checked cheaply (sizes, headers and meta.json; no token is read)."""
    check(bool(spec.path) or bool(spec.train_path and spec.val_path), f"{key}.path", "names no token files",
          f"set {key}.path=DIR (holding train.bin and val.bin) or {key}.train_path=FILE {key}.val_path=FILE")
    if spec.path:
        check(Path(spec.path).is_dir(), f"{key}.path", f"no such directory: {spec.path}",
              f"set {key}.path=DIR, a directory with train.bin and val.bin (`trainctl prepare-tokens` writes one)")
    train_path, val_path = split_paths(spec)
    meta_dir = train_path.parent
    meta = read_meta(meta_dir)
    dtype = spec.dtype
    if meta is not None and meta.get("dtype") is not None:
        check(dtype is None or dtype == meta["dtype"], f"{key}.dtype", f"{meta_dir / META_FILE} says the "
              f"tokens are {meta['dtype']}, not {dtype}", f"set {key}.dtype=null")
        dtype = dtype or str(meta["dtype"])
    if dtype is not None:
        check_choice(dtype, BIN_DTYPES, f"{key}.dtype")
    train = token_file(train_path, dtype, f"{key}.train_path" if spec.train_path else f"{key}.path")
    val = token_file(val_path, dtype, f"{key}.val_path" if spec.val_path else f"{key}.path")
    vocab = spec.vocab_size if spec.vocab_size is not None else (meta or {}).get("vocab_size")
    check(isinstance(vocab, int) and vocab >= 2, f"{key}.vocab_size",
          f"unknown: no meta.json beside {train_path.name} records it" if vocab is None
          else f"must be an integer >= 2 (got {vocab!r})", f"set {key}.vocab_size=N (50257 for GPT-2's tokenizer)")
    return Corpus(train, val, int(vocab), meta, meta_dir)


def check_spec(spec: "TokensSpec", key: str = "data") -> None:
    """`data.validate()` for data=tokens: cheap, no token is read and torch is not imported."""
    check(spec.seq_len >= 2, f"{key}.seq_len", f"must be >= 2 (got {spec.seq_len})", f"set {key}.seq_len=128")
    check_choice(spec.sampling, SAMPLINGS, f"{key}.sampling")
    check(spec.samples_per_epoch is None or spec.samples_per_epoch >= 1, f"{key}.samples_per_epoch",
          "must be >= 1 or null", f"set {key}.samples_per_epoch=null")
    check(spec.samples_per_epoch is None or spec.sampling == "random", f"{key}.samples_per_epoch",
          "applies to data.sampling=random (sequential epochs are the whole file)",
          f"set {key}.samples_per_epoch=null or {key}.sampling=random")
    check(spec.max_val_windows is None or spec.max_val_windows >= 1, f"{key}.max_val_windows",
          "must be >= 1 or null", f"set {key}.max_val_windows=null")
    found = corpus(spec, key)
    for split, file in (("train", found.train), ("val", found.val)):
        check(file.n_tokens >= spec.seq_len + 1, f"{key}.seq_len",
              f"{Path(file.path).name} ({split}) has {file.n_tokens:,} tokens, too few for one window of "
              f"seq_len + 1 = {spec.seq_len + 1}",
              f"set {key}.seq_len={file.n_tokens - 1} or less" if file.n_tokens >= 3 else "use a longer file")


# --- windows ----------------------------------------------------------------------------------------


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic): a bijective, well-mixed hash."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def random_starts(seed: int, epoch: int, index: np.ndarray, n_starts: int) -> np.ndarray:
    """Window starts in [0, n_starts), uniform, a pure function of (seed, epoch, index): the ``index``-th
    output of the splitmix64 stream keyed by (seed, epoch). The modulo's bias is below 2**-30."""
    key = _mix(np.array([(int(seed) << 32) | (int(epoch) & 0xFFFFFFFF)], dtype=np.uint64))
    hashed = _mix(key + (np.asarray(index, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)
    return (hashed % np.uint64(n_starts)).astype(np.int64)


@dataclass(frozen=True)
class WindowPlan:
    """Which window of a split each sample index is; ``starts`` is pure (no state)."""

    n_windows: int
    seq_len: int
    n_tokens: int
    random: bool = False
    seed: int = 0
    available: int = 0
    """Sequential windows in the file when `n_windows` takes an evenly spread subset (validation cap)."""

    def starts(self, epoch: int, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        if self.random:
            return random_starts(self.seed, epoch, index, self.n_tokens - self.seq_len)
        if self.available > self.n_windows:
            index = index * self.available // self.n_windows
        return index * self.seq_len


def sequential_windows(n_tokens: int, seq_len: int) -> int:
    """Non-overlapping windows of seq_len + 1 tokens at stride seq_len (each target reaches one token into
    the next window)."""
    return (n_tokens - 1) // seq_len


def train_plan(spec: "TokensSpec", file: TokenFile) -> WindowPlan:
    if spec.sampling == "random":
        n = spec.samples_per_epoch or file.n_tokens // spec.seq_len
        return WindowPlan(n, spec.seq_len, file.n_tokens, random=True, seed=spec.seed)
    return WindowPlan(sequential_windows(file.n_tokens, spec.seq_len), spec.seq_len, file.n_tokens)


def val_plan(spec: "TokensSpec", file: TokenFile) -> WindowPlan:
    """Sequential windows of the validation file; with `data.max_val_windows`, that many spread evenly."""
    available = sequential_windows(file.n_tokens, spec.seq_len)
    n = min(available, spec.max_val_windows or available)
    return WindowPlan(n, spec.seq_len, file.n_tokens, available=available)


class TokenReader:
    """Windows of one token file through a memory map, opened lazily in each process (pickling carries
    the :class:`TokenFile`, never the mapping) and released every few windows (see the module docstring)."""

    def __init__(self, file: TokenFile) -> None:
        self.file = file
        self._map: Optional[mmap.mmap] = None
        self._tokens: Optional[np.ndarray] = None
        self._pid = -1
        self._unreleased = 0

    def __getstate__(self) -> Dict[str, Any]:
        return {"file": self.file}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["file"])  # type: ignore[misc]

    def tokens(self) -> np.ndarray:
        """The whole split as a read-only array over the map (a forked worker maps the file anew)."""
        if self._tokens is None or self._pid != os.getpid():
            with open(self.file.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self._tokens = np.frombuffer(self._map, dtype=self.file.dtype, count=self.file.n_tokens,
                                         offset=self.file.offset)
            self._pid, self._unreleased = os.getpid(), 0
        return self._tokens

    def windows(self, starts: np.ndarray, seq_len: int) -> np.ndarray:
        """(len(starts), seq_len + 1) int64 tokens, copied out of the map in one gather."""
        tokens = self.tokens()
        out = tokens[np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len + 1)].astype(np.int64)
        self._unreleased += len(out)
        if self._unreleased >= RELEASE_EVERY_WINDOWS and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)  # type: ignore[union-attr]
            self._unreleased = 0
        return out


# --- the range check --------------------------------------------------------------------------------


def _vouched(corpus_: Corpus, file: TokenFile) -> Optional[int]:
    """The largest token id of ``file`` as meta.json records it, when meta.json describes this very file
    (same directory, name and size); else None."""
    for entry in ((corpus_.meta or {}).get("splits") or {}).values():
        if (isinstance(entry, dict) and Path(file.path) == corpus_.meta_dir / str(entry.get("file"))
                and entry.get("tokens") == file.n_tokens and isinstance(entry.get("max_token_id"), int)):
            return int(entry["max_token_id"])
    return None


def scan_range(file: TokenFile) -> Tuple[int, int]:
    """(smallest, largest) token id of the file, read in chunks into one reused buffer (plain reads, not
    the map, so the resident set stays flat: about 0.3 s per GiB from the page cache)."""
    buffer = np.empty(SCAN_CHUNK_TOKENS, dtype=file.dtype)
    low, high, left = None, None, file.n_tokens
    with open(file.path, "rb", buffering=0) as handle:
        handle.seek(file.offset)
        while left > 0:
            want = min(left, SCAN_CHUNK_TOKENS) * buffer.itemsize
            got = handle.readinto(memoryview(buffer).cast("B")[:want])
            if not got:
                break
            part = buffer[: got // buffer.itemsize]
            low = int(part.min()) if low is None else min(low, int(part.min()))
            high = int(part.max()) if high is None else max(high, int(part.max()))
            left -= len(part)
    return low or 0, high or 0


def _cached_range(file: TokenFile, cache_dir: Optional[Path]) -> Tuple[int, int]:
    """:func:`scan_range`, kept in the run's cache (keyed by the file's path, size, mtime and type) so a
    resumed run does not read the corpus again."""
    info = os.stat(file.path)
    key = hashlib.sha256(json.dumps([os.path.abspath(file.path), info.st_size, info.st_mtime_ns, file.dtype,
                                     file.offset]).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"token-range-{key}.json" if cache_dir is not None else None
    try:
        found = json.loads(path.read_text()) if path is not None and path.is_file() else None
        if isinstance(found, list) and len(found) == 2 and all(isinstance(v, int) for v in found):
            return found[0], found[1]
    except (OSError, ValueError):
        pass
    started = time.perf_counter()
    low, high = scan_range(file)
    log.info("checked the %s tokens of %s in %.1f s: ids %d..%d", f"{file.n_tokens:,}", file.path,
             time.perf_counter() - started, low, high)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps([low, high]))
            os.replace(tmp, path)
        except OSError as exc:  # costs the next resume a scan, nothing else
            log.warning("could not cache the token range in %s: %s", path, exc.strerror or exc)
    return low, high


def check_range(corpus_: Corpus, cache_dir: Optional[Path]) -> None:
    """Every token id of both files is in [0, vocab_size): checked once per file, before training (a
    bad id would otherwise fail in the embedding, on a GPU as an opaque device-side assert)."""
    for file in (corpus_.train, corpus_.val):
        vouched = _vouched(corpus_, file)
        low, high = (0, vouched) if vouched is not None else _cached_range(file, cache_dir)
        name = Path(file.path).name
        check(low >= 0, "data.path", f"{name} holds the negative token id {low}", "write the token ids again")
        check(high < corpus_.vocab_size, "data.vocab_size", f"{name} holds the token id {high}, outside a "
              f"vocabulary of {corpus_.vocab_size}", f"set data.vocab_size={high + 1} (or more), or check "
              "data.dtype")
