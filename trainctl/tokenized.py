"""Datasets tokenised with a Hugging Face tokenizer loaded from a local directory: `data=hf_text`
(documents packed into next-token blocks) and `data=hf_classification` (texts truncated, padded and
masked, with class labels). This module owns reading their files (bounded; a bad line is named),
loading the tokenizer (transformers is an optional extra) and the cache of the tokenised arrays.

Tokenising is the slow part, so its result is kept in `<cache_dir>/tokenized-<key>.npz`, the key
hashing the data file (path, size, mtime and contents), the tokenizer's files, the fields that change
the tokens and a format version. A resumed run finds it; a file that is corrupt or does not match is
rebuilt, never trusted. The train/validation split is cheap and is redone from `data.seed` each time.

NumPy only at import: transformers is imported when a tokenizer is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from trainctl import csvfile
from trainctl.arrays import Arrays, DataInfo, split_indices
from trainctl.errors import ConfigError, check, did_you_mean
from trainctl.files import read_bounded, sha256_of

if TYPE_CHECKING:
    from trainctl.data import HfClassificationSpec, HfTextSpec

log = logging.getLogger("trainctl")

FORMAT_VERSION = 1
"""Part of every cache key: bump it when the arrays a loader produces change."""
MAX_DATA_BYTES = 1 << 30
"""Largest data file read (everything is tokenised in memory)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "config.json")
"""Files of a tokenizer directory that can change the tokens (hashed into the cache key)."""
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CHUNK_DOCUMENTS = 1024
"""Documents per call of the tokenizer (bounds the Python lists it returns)."""
INSTALL_HF = "pip install 'trainctl[hf]'"


# --- validation (cheap: neither transformers nor the file's contents) ----------------------------------


def check_file(path: str, key: str, what: str) -> None:
    check(Path(path).is_file(), key, f"no such file: {path}", f"set {key}=FILE ({what})")


def check_tokenizer_dir(directory: str, key: str) -> None:
    fix = f"set {key}=DIR, a local directory with the tokenizer's files (normally the model's: {key}=${{model.path}})"
    check(Path(directory).is_dir(), key, f"no such directory: {directory} (tokenizers are loaded from local "
          "files only, never downloaded)", fix)
    check(any((Path(directory) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")), key,
          f"{directory} has neither tokenizer.json nor tokenizer_config.json", fix)


def is_jsonl(path: str) -> bool:
    return Path(path).suffix.lower() in JSONL_SUFFIXES


# --- reading the file --------------------------------------------------------------------------------


def _read(path: str) -> bytes:
    try:
        return read_bounded(Path(path), MAX_DATA_BYTES)
    except OSError as exc:
        raise ConfigError("data.path", f"cannot read {path}: {exc.strerror or exc}",
                          f"set data.path to a regular file of at most {MAX_DATA_BYTES >> 20} MiB") from None


def _decode(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError("data.path", f"{Path(path).name} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                          f"offset {exc.start})", "save it as UTF-8") from None


def _jsonl_records(raw: bytes, path: str) -> List[Tuple[int, Dict[str, Any]]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error."""
    name, records = Path(path).name, []
    for number, line in enumerate(_decode(raw, path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError("data.path", f"{name} line {number} is not valid JSON ({exc.msg} at column "
                              f"{exc.colno})", "fix or remove that line (one JSON object per line)") from None
        except RecursionError:
            raise ConfigError("data.path", f"{name} line {number} is nested too deeply",
                              "fix or remove that line") from None
        if not isinstance(record, dict):
            raise ConfigError("data.path", f"{name} line {number} is a JSON {type(record).__name__}, not an "
                              "object", "write one JSON object per line, e.g. {\"text\": \"...\"}")
        records.append((number, record))
    return records


def _field(record: Dict[str, Any], field: str, key: str, where: str, text: bool = False) -> Any:
    if field not in record:
        close = did_you_mean(field, record, 1)
        raise ConfigError(key, f"{where} has no field '{field}'; its fields are: {', '.join(record) or 'none'}",
                          f"set {key}={close[0] if close else next(iter(record), 'FIELD')}")
    if text and not isinstance(record[field], str):
        raise ConfigError(key, f"{where}: the text is {json.dumps(record[field])[:40]}, not a string",
                          f"set {key} to the field that holds the text")
    return record[field]


def _documents(spec: "HfTextSpec", raw: bytes) -> List[str]:
    """The documents of a hf_text file: each JSONL record's field, or the whole plain-text file."""
    if not is_jsonl(spec.path):
        return [_decode(raw, spec.path)]
    name = Path(spec.path).name
    return [_field(r, spec.field, "data.field", f"line {n} of {name}", True) for n, r in _jsonl_records(raw, spec.path)]


def _examples(spec: "HfClassificationSpec", raw: bytes) -> Tuple[List[str], List[Any], List[str]]:
    """(texts, labels, where each one is) of a hf_classification file."""
    name = Path(spec.path).name
    if is_jsonl(spec.path):
        records = [(f"line {n} of {name}", r) for n, r in _jsonl_records(raw, spec.path)]
        return ([_field(r, spec.text, "data.text", w, True) for w, r in records],
                [_field(r, spec.label, "data.label", w) for w, r in records], [w for w, _ in records])
    header, rows = csvfile.read_table(spec.path, "\t" if Path(spec.path).suffix.lower() in (".tsv", ".tab") else ",")
    for key, column in (("data.text", spec.text), ("data.label", spec.label)):
        close = did_you_mean(column, header, 1)
        check(column in header, key, f"no column '{column}' in {name}; its columns are: {', '.join(header)}",
              f"set {key}={close[0] if close else header[0]}")
    for line, row in enumerate(rows, start=2):
        check(len(row) == len(header), "data.path", f"{name} row {line} has {len(row)} fields, the header has "
              f"{len(header)}", "fix that row (quote texts that contain the separator)")
    t, y = header.index(spec.text), header.index(spec.label)
    where = [f"row {i} of {name}" for i in range(2, len(rows) + 2)]
    return [row[t] for row in rows], [row[y].strip() for row in rows], where


def class_ids(labels: List[Any], where: List[str]) -> Tuple[np.ndarray, Tuple[str, ...]]:
    """Class ids and names: integer labels (also integer strings, as in a CSV) in numeric order, any other
    labels in sorted text order (JSON true/false are the texts "false" and "true")."""
    keys = []
    for value, place in zip(labels, where):
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, (int, str)) or value == "":
            raise ConfigError("data.label", f"{place}: the label {json.dumps(value)[:40]} is not a class "
                              "(a string or an integer)", "fix that label, or set data.label to the class column")
        keys.append(value)
    try:
        keys = [int(k) for k in keys]  # integers, whether JSON numbers or text
    except ValueError:
        keys = [str(k) for k in keys]
    classes = sorted(set(keys))
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[k] for k in keys], dtype=np.int64), tuple(str(c) for c in classes)


# --- the tokenizer -----------------------------------------------------------------------------------


def load_tokenizer(directory: str, key: str = "data.tokenizer") -> Any:
    """`AutoTokenizer.from_pretrained(directory)` from local files only, without remote code."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(key, "tokenising with a Hugging Face tokenizer needs the transformers package, which "
                          "is not installed", INSTALL_HF) from None
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # the files are user input, and transformers reports them with many types
        detail = " ".join(str(exc).split())[:300]
        raise ConfigError(key, f"cannot load a tokenizer from {directory}: {type(exc).__name__}: {detail}",
                          "point it at a directory written by save_pretrained (tokenizer.json, "
                          "tokenizer_config.json)") from None


def _token_ids(tokenizer: Any, texts: List[str], **kwargs: Any) -> List[List[int]]:
    """The tokenizer's ids for ``texts`` (its own special tokens included), a chunk at a time."""
    ids: List[List[int]] = []
    for start in range(0, len(texts), CHUNK_DOCUMENTS):
        # verbose=False: the warning about sequences longer than the model takes does not apply to packing
        ids.extend(tokenizer(texts[start:start + CHUNK_DOCUMENTS], verbose=False, **kwargs)["input_ids"])
    return ids


# --- hf_text -------------------------------------------------------------------------------------------


def _pack(spec: "HfTextSpec", raw: bytes) -> Dict[str, np.ndarray]:
    """Tokenise every non-blank document, end each with EOS (when the tokenizer has one and did not add
    it), concatenate, and cut the stream into blocks of seq_len + 1 tokens (a last partial block is
    dropped)."""
    documents = [d for d in _documents(spec, raw) if d.strip()]
    check(bool(documents), "data.path", f"{Path(spec.path).name} has no text",
          "point data.path at a file with text" + (f" in field '{spec.field}'" if is_jsonl(spec.path) else ""))
    tokenizer = load_tokenizer(spec.tokenizer)
    eos = tokenizer.eos_token_id
    pieces = []
    for ids in _token_ids(tokenizer, documents):
        pieces.append(np.asarray(ids, dtype=np.int64))
        if eos is not None and (not ids or ids[-1] != eos):
            pieces.append(np.array([eos], dtype=np.int64))
    stream = np.concatenate(pieces)
    vocab = max(len(tokenizer), int(stream.max(initial=0)) + 1)
    block = spec.seq_len + 1
    blocks = stream[: len(stream) // block * block].reshape(-1, block)
    log.info("tokenised %s: %d documents, %d tokens, %d blocks of %d", Path(spec.path).name, len(documents),
             len(stream), len(blocks), block)
    return {"blocks": blocks.astype(np.int32), "n_tokens": np.array(len(stream)), "vocab_size": np.array(vocab)}


def _text_fits(found: Dict[str, np.ndarray], seq_len: int) -> bool:
    blocks, vocab, n_tokens = found["blocks"], int(found["vocab_size"]), int(found["n_tokens"])
    return (blocks.ndim == 2 and blocks.shape[1] == seq_len + 1 and blocks.dtype == np.int32 and vocab >= 1
            and n_tokens >= blocks.size and (blocks.size == 0 or 0 <= int(blocks.min()) <= int(blocks.max()) < vocab))


def _fewest_blocks(val_fraction: float) -> int:
    """The fewest blocks that leave at least one in each split (as split_indices cuts them)."""
    n = max(2, int(np.ceil(1 / (1 - val_fraction))) - 1)
    for _ in range(3):  # rounding of n * val_fraction
        if int(np.ceil(n * val_fraction)) < n:
            break
        n += 1
    return n


def load_text(spec: "HfTextSpec", cache_dir: Optional[Path] = None) -> Arrays:
    raw = _read(spec.path)
    fields = {"field": spec.field if is_jsonl(spec.path) else None, "seq_len": spec.seq_len}
    found = _cached(cache_dir, _cache_key("hf_text", spec.path, raw, spec.tokenizer, fields),
                    lambda: _pack(spec, raw), lambda f: _text_fits(f, spec.seq_len))
    blocks, vocab, n_tokens = found["blocks"], int(found["vocab_size"]), int(found["n_tokens"])
    n = len(blocks)
    if n < _fewest_blocks(spec.val_fraction):
        most = n_tokens // _fewest_blocks(spec.val_fraction) - 1
        raise ConfigError("data.seq_len", f"{Path(spec.path).name} has {n_tokens} tokens, too few for a block of "
                          f"seq_len + 1 = {spec.seq_len + 1} tokens in both splits ({n} block(s))",
                          f"lower data.seq_len (to at most {most}) or use more text" if most >= 2
                          else "use more text")
    train, val = split_indices(n, spec.val_fraction, spec.seed)
    block = spec.seq_len + 1
    info = DataInfo("lm", (spec.seq_len,), vocab_size=vocab, n_train=len(train), n_val=len(val))
    # Each split is its own token stream of whole blocks, served by batches.WindowSource.
    return Arrays(info, blocks[train].ravel(), None, blocks[val].ravel(), None,
                  np.arange(len(train), dtype=np.int64) * block, np.arange(len(val), dtype=np.int64) * block,
                  spec.seq_len)


# --- hf_classification ---------------------------------------------------------------------------------


def _pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ConfigError("data.tokenizer", "the tokenizer has neither a pad nor an EOS token, so texts of different "
                      "lengths cannot be padded", "give it a pad token and save it again: tokenizer.pad_token = "
                      "'[PAD]'; tokenizer.save_pretrained(DIR) (or set data.max_length to the shortest text's length)")


def _encode(spec: "HfClassificationSpec", raw: bytes) -> Dict[str, np.ndarray]:
    """(N, 2, L) token ids and attention masks, padded to the longest text (at most max_length tokens) on
    the tokenizer's padding side, plus class ids and names."""
    texts, labels, where = _examples(spec, raw)
    check(len(texts) >= 2, "data.path", f"{Path(spec.path).name} has {len(texts)} example(s), too few to split "
          "into train and validation", "use a file with more examples")
    y, names = class_ids(labels, where)
    check(len(names) >= 2, "data.label", f"'{spec.label}' has a single class ('{names[0]}')",
          "set data.label to a column with at least two classes")
    tokenizer = load_tokenizer(spec.tokenizer)
    ids = _token_ids(tokenizer, texts, truncation=True, max_length=spec.max_length)
    lengths = np.array([len(i) for i in ids])
    if lengths.min() == 0:
        place = where[int(np.argmin(lengths))]
        raise ConfigError("data.text", f"{place}: the text is empty (no tokens)", "fill in or drop that example")
    longest = int(lengths.max())
    pad = _pad_id(tokenizer) if lengths.min() < longest else 0
    x = np.zeros((len(ids), 2, longest), dtype=np.int32)
    x[:, 0] = pad
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for row, (sequence, length) in enumerate(zip(ids, lengths)):
        span = slice(longest - length, longest) if left else slice(0, length)
        x[row, 0, span] = sequence
        x[row, 1, span] = 1
    log.info("tokenised %s: %d texts, %d classes, padded to %d tokens", Path(spec.path).name, len(ids), len(names),
             longest)
    return {"x": x, "labels": y, "class_names": np.array(names, dtype=np.str_)}


def _classification_fits(found: Dict[str, np.ndarray], max_length: int) -> bool:
    x, y, names = found["x"], found["labels"], found["class_names"]
    return (x.ndim == 3 and x.shape[1] == 2 and 1 <= x.shape[2] <= max_length and x.dtype == np.int32
            and y.shape == (len(x),) and y.dtype == np.int64 and names.ndim == 1 and names.dtype.kind == "U"
            and len(names) >= 2 and len(x) >= 2 and int(y.min()) >= 0 and int(y.max()) < len(names))


def load_classification(spec: "HfClassificationSpec", cache_dir: Optional[Path] = None) -> Arrays:
    raw = _read(spec.path)
    fields = {"text": spec.text, "label": spec.label, "max_length": spec.max_length}
    found = _cached(cache_dir, _cache_key("hf_classification", spec.path, raw, spec.tokenizer, fields),
                    lambda: _encode(spec, raw), lambda f: _classification_fits(f, spec.max_length))
    x, y = found["x"].astype(np.int64), found["labels"]
    names = tuple(str(n) for n in found["class_names"])
    train, val = split_indices(len(y), spec.val_fraction, spec.seed, y)
    check(len(train) >= 1 and len(val) >= 1, "data.val_fraction", f"{len(y)} examples leave a split empty",
          "set data.val_fraction=0.2 or use more examples")
    info = DataInfo("classification", tuple(x.shape[1:]), num_classes=len(names), n_train=len(train),
                    n_val=len(val), class_names=names)
    return Arrays(info, x[train], y[train], x[val], y[val])


# --- the cache -----------------------------------------------------------------------------------------


def _version(package: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cache_key(kind: str, path: str, raw: bytes, tokenizer_dir: str, fields: Dict[str, Any]) -> str:
    """A hash of everything the tokenised arrays depend on."""
    info = os.stat(path)
    tokenizer_files = {name: sha256_of(Path(tokenizer_dir) / name) for name in TOKENIZER_FILES
                       if (Path(tokenizer_dir) / name).is_file()}
    payload = {"format": FORMAT_VERSION, "kind": kind, "path": os.path.abspath(path), "bytes": info.st_size,
               "mtime_ns": info.st_mtime_ns, "sha256": hashlib.sha256(raw).hexdigest(), "tokenizer": tokenizer_files,
               "fields": fields, "versions": [_version("transformers"), _version("tokenizers")]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _cached(cache_dir: Optional[Path], key: str, build: Callable[[], Dict[str, np.ndarray]],
            fits: Callable[[Dict[str, np.ndarray]], bool]) -> Dict[str, np.ndarray]:
    """The arrays stored under ``key`` in ``cache_dir`` when they are intact and ``fits`` them, else
    ``build()`` (stored there for next time)."""
    if cache_dir is None:
        return build()
    path = Path(cache_dir) / f"tokenized-{key}.npz"
    found = _read_cache(path, key)
    if found is not None:
        try:
            usable = fits(found)
        except (KeyError, ValueError, TypeError):
            usable = False
        if usable:
            log.info("loaded tokenised data from cache %s", path)
            return found
        log.warning("ignoring the tokenised-data cache %s: it does not hold what this spec needs", path)
    arrays = build()
    _write_cache(path, key, arrays)
    return arrays


def _read_cache(path: Path, key: str) -> Optional[Dict[str, np.ndarray]]:
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
    except OSError:
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = {name: npz[name] for name in npz.files}
        if str(found.pop("key")) == key:
            return found
        reason = "it was written for other data"
    except Exception as exc:  # a damaged zip fails with many types (BadZipFile, ValueError, EOFError, ...)
        reason = f"it cannot be read ({type(exc).__name__})"
    log.warning("ignoring the tokenised-data cache %s: %s", path, reason)
    return None


def _write_cache(path: Path, key: str, arrays: Dict[str, np.ndarray]) -> None:
    """Write atomically under a name of this process's own (several ranks may write the same file); a
    cache that cannot be written costs the next run the tokenising, nothing else."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, key=np.array(key), **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write the tokenised-data cache %s: %s", path, exc.strerror or exc)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
