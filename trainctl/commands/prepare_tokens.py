"""`trainctl prepare-tokens INPUT -o DIR [--tokenizer DIR | --tiktoken NAME] [--val-fraction F] [--field F]`:
tokenise a text or JSONL file once into what `data=tokens` trains on: DIR/train.bin and DIR/val.bin (flat
uint16 token ids, uint32 for vocabularies over 65,536) and DIR/meta.json (vocab_size, dtype, tokenizer, EOS
id, token counts).

The input is streamed: a plain-text file in blocks cut at line breaks (a single newline between two
non-blank characters, where byte-level BPE tokenizers - GPT-2's, tiktoken's - cut anyway, so the tokens
equal those of the whole text; a file without such a break for many MiB is cut at a character boundary),
a JSONL file a batch of records at a time. The last `--val-fraction` of the input's bytes (from the first
such cut after it, or the first record that starts after it) becomes val.bin, as nanoGPT's
shakespeare prepare.py splits. Each document (the whole text file, or one JSONL record) ends with the
tokenizer's EOS token when it has one; byte-level tokens have none, and separate JSONL records with a
newline byte. The files are written under temporary names and renamed into place, meta.json last (its
presence means the directory is complete)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from trainctl.errors import ConfigError, check, did_you_mean

BLOCK_BYTES = 4 << 20
"""Bytes of input tokenised per call (bounds memory whatever the file's size)."""
HARD_CUT_BYTES = 4 * BLOCK_BYTES
"""Text without a line break this long is cut at a character boundary instead."""
PART_BYTES = 1 << 16
"""Text handed to the tokenizer as one string: a block is tokenised as a batch of such parts."""
BATCH_DOCUMENTS = 1024
WHITESPACE = b" \t\r\n\x0b\x0c"


@dataclass
class Encoder:
    """A tokenizer reduced to what preparing needs."""

    description: dict
    """What meta.json records as `tokenizer`."""
    vocab_size: int
    eos_id: Optional[int]
    encode: Callable[[List[str]], Sequence[Sequence[int]]]
    raw: bool = False
    """Byte-level: a plain-text file's bytes are the tokens (no decoding)."""

    def separator(self) -> List[int]:
        return [self.eos_id] if self.eos_id is not None else [10] if self.raw else []


def byte_encoder() -> Encoder:
    return Encoder({"kind": "bytes"}, 256, None, lambda texts: [np.frombuffer(t.encode("utf-8"), np.uint8)
                                                                for t in texts], raw=True)


def hf_encoder(directory: str) -> Encoder:
    from trainctl import tokenized

    fix = "set --tokenizer DIR to a local directory written by save_pretrained (tokenizer.json or tokenizer_config.json)"
    check(Path(directory).is_dir(), "--tokenizer", f"no such directory: {directory} (tokenizers are loaded from "
          "local files only, never downloaded)", fix)
    check(any((Path(directory) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")), "--tokenizer",
          f"{directory} has neither tokenizer.json nor tokenizer_config.json", fix)
    tokenizer = tokenized.load_tokenizer(directory, "--tokenizer")

    def encode(texts: List[str]) -> Sequence[Sequence[int]]:
        return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                         verbose=False)["input_ids"]
    return Encoder({"kind": "huggingface", "path": os.path.abspath(directory),
                    "name": getattr(tokenizer, "name_or_path", None)}, len(tokenizer), tokenizer.eos_token_id, encode)


def tiktoken_encoder(name: str) -> Encoder:
    fix = "or use --tokenizer DIR, a local Hugging Face tokenizer (offline)"
    try:
        import tiktoken
    except ImportError:
        raise ConfigError("--tiktoken", "needs the tiktoken package, which is not installed",
                          f"pip install tiktoken, {fix}") from None
    names = tiktoken.list_encoding_names()
    close = did_you_mean(name, names, 1)
    check(name in names, "--tiktoken", f"unknown encoding '{name}'; tiktoken has {', '.join(names)}",
          f"use --tiktoken {close[0] if close else 'gpt2'}")
    try:
        encoding = tiktoken.get_encoding(name)
    except Exception as exc:  # offline: requests' ConnectionError; a damaged cache: ValueError
        import tempfile

        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(
            tempfile.gettempdir(), "data-gym-cache")
        detail = " ".join(str(exc).split())[:160]
        raise ConfigError("--tiktoken", f"cannot load tiktoken's '{name}' encoding ({type(exc).__name__}: {detail}). "
                          f"tiktoken downloads its BPE files on first use and reads them from its cache ({cache}, "
                          "set by TIKTOKEN_CACHE_DIR) after that",
                          f"run it once with internet access or copy a filled cache there, {fix}") from None
    return Encoder({"kind": "tiktoken", "name": name}, encoding.n_vocab, encoding.eot_token,
                   lambda texts: encoding.encode_ordinary_batch(texts))


# --- reading the input ----------------------------------------------------------------------------------


def _safe_cut(data: bytes, start: int = 0, last: bool = True) -> Optional[int]:
    """The position just after a single newline between two non-blank bytes of ``data[start:]`` (the last
    such newline, or with ``last=False`` the first), or None."""
    pos = len(data) if last else start - 1
    while True:
        pos = data.rfind(b"\n", start, pos) if last else data.find(b"\n", pos + 1)
        if pos == -1 or (not last and pos + 1 >= len(data)):
            return None
        if 0 < pos < len(data) - 1 and data[pos - 1] not in WHITESPACE and data[pos + 1] not in WHITESPACE:
            return pos + 1


def _char_cut(data: bytes) -> int:
    """The end of ``data`` without a UTF-8 character that it cuts short."""
    pos = len(data)
    while pos > max(0, len(data) - 3) and data[pos - 1] & 0xC0 == 0x80:  # continuation bytes
        pos -= 1
    if pos > 0 and data[pos - 1] >= 0xC0:  # the lead byte: is its character complete?
        lead = data[pos - 1]
        if len(data) - (pos - 1) < (2 if lead < 0xE0 else 3 if lead < 0xF0 else 4):
            return pos - 1
    return len(data)


def split_point(path: Path, fraction: float) -> int:
    """Where val.bin's text starts: the first safe cut after the (1 - fraction) share of the bytes (within
    HARD_CUT_BYTES; else the first character boundary there)."""
    size = path.stat().st_size
    target = int(size * (1 - fraction))
    with open(path, "rb") as handle:
        for pos in range(target, min(size, target + HARD_CUT_BYTES), BLOCK_BYTES):
            handle.seek(pos)
            cut = _safe_cut(handle.read(BLOCK_BYTES + 2), 1, last=False)
            if cut is not None:
                return pos + cut
        handle.seek(target)
        head = handle.read(4)
    skip = 0
    while skip < len(head) and head[skip] & 0xC0 == 0x80:  # not inside a character
        skip += 1
    return target + skip


def _parts(piece: bytes, size: int) -> List[Tuple[bytes, int]]:
    """``piece`` in parts of about ``size`` bytes, each ending at a safe cut, with their offsets."""
    parts, pos = [], 0
    while len(piece) - pos > size:
        back = _safe_cut(piece[pos:pos + size])
        end = pos + back if back else _safe_cut(piece, pos + size, last=False)
        if end is None:
            break
        parts.append((piece[pos:end], pos))
        pos = end
    return parts + [(piece[pos:], pos)] if pos < len(piece) else parts


def text_pieces(path: Path, start: int, stop: int) -> Iterator[Tuple[bytes, int]]:
    """(piece, its offset) covering bytes [start, stop) of the file, each ending at a safe cut."""
    with open(path, "rb") as handle:
        handle.seek(start)
        carry, offset, left = b"", start, stop - start
        while left > 0 or carry:
            block = handle.read(min(BLOCK_BYTES, left)) if left > 0 else b""
            left = left - len(block) if block else 0  # a file that shrank ends here
            data = carry + block
            cut = len(data) if left <= 0 else _safe_cut(data)
            if cut is None:
                cut = _char_cut(data) if len(data) >= HARD_CUT_BYTES else 0
            if cut:
                yield data[:cut], offset
                offset += cut
            carry = data[cut:]


def _decode(piece: bytes, offset: int, path: Path) -> str:
    try:
        return piece.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("INPUT", f"{path.name} is not UTF-8 text (byte 0x{piece[exc.start]:02x} at offset "
                          f"{offset + exc.start:,})", "save it as UTF-8") from None


def jsonl_documents(path: Path, field: str) -> Iterator[Tuple[str, int]]:
    """(text, offset of its line) of every record with non-blank text."""
    with open(path, "rb") as handle:
        offset = 0
        for number, line in enumerate(handle, start=1):
            where, start = f"line {number} of {path.name}", offset
            offset += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise ConfigError("INPUT", f"{where} is not valid JSON ({type(exc).__name__})",
                                  "fix or remove that line (one JSON object per line)") from None
            if not isinstance(record, dict) or field not in record:
                fields = list(record) if isinstance(record, dict) else []
                close = did_you_mean(field, fields, 1)
                raise ConfigError("--field", f"{where} has no field '{field}'" + (f"; its fields are: "
                                  f"{', '.join(fields)}" if fields else " (it is not a JSON object)"),
                                  f"use --field {close[0] if close else (fields or ['FIELD'])[0]}")
            check(isinstance(record[field], str), "--field", f"{where}: '{field}' is not a string",
                  "use --field with the field that holds the text")
            if record[field].strip():
                yield record[field], start


# --- writing ----------------------------------------------------------------------------------------------


class SplitWriter:
    """One split's token file, written under a temporary name and renamed into place by :meth:`commit`."""

    def __init__(self, path: Path, dtype: str, vocab_size: int) -> None:
        self.path, self.dtype, self.vocab_size = path, dtype, vocab_size
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.handle = open(self.tmp, "wb")
        self.tokens, self.max_id = 0, -1

    def write(self, ids: Sequence[int]) -> None:
        array = np.asarray(ids, dtype=np.int64)
        if not len(array):
            return
        high = int(array.max())
        if high >= self.vocab_size or int(array.min()) < 0:
            raise ConfigError(None, f"the tokenizer produced the id {high}, outside its vocabulary of "
                              f"{self.vocab_size}", "use another tokenizer (this one is inconsistent)")
        array.astype(self.dtype).tofile(self.handle)
        self.tokens += len(array)
        self.max_id = max(self.max_id, high)

    def commit(self) -> Dict[str, Any]:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "tokens": self.tokens, "max_token_id": self.max_id}

    def discard(self) -> None:
        """Remove the temporary file (nothing after :meth:`commit`)."""
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def prepare(source: Path, out_dir: Path, encoder: Encoder, val_fraction: float, field: str,
            progress: Callable[[int], None] = lambda position: None) -> Dict[str, Any]:
    """Tokenise ``source`` into ``out_dir``/train.bin and val.bin; returns meta.json's contents.
    ``progress`` is told how far into the input (bytes) the work is."""
    dtype = "uint16" if encoder.vocab_size <= 1 << 16 else "uint32"
    size = source.stat().st_size
    jsonl = source.suffix.lower() in (".jsonl", ".ndjson")
    split_at = int(size * (1 - val_fraction)) if jsonl else split_point(source, val_fraction)
    writers = {split: SplitWriter(out_dir / f"{split}.bin", dtype, encoder.vocab_size) for split in ("train", "val")}
    try:
        if jsonl:
            _write_jsonl(source, field, encoder, writers, split_at, progress)
        else:
            for split, (start, stop) in (("train", (0, split_at)), ("val", (split_at, size))):
                for piece, offset in text_pieces(source, start, stop):
                    if encoder.raw:
                        writers[split].write(np.frombuffer(piece, np.uint8))
                    else:  # in parts of about PART_BYTES, which the tokenizer takes in parallel
                        parts = [_decode(part, offset + at, source) for part, at in _parts(piece, PART_BYTES)]
                        for ids in encoder.encode(parts):
                            writers[split].write(ids)
                    progress(offset + len(piece))
            if not encoder.raw:  # the text is one document
                writers["val"].write(encoder.separator())
        for split, writer in writers.items():
            check(writer.tokens >= 2, "--val-fraction", f"the {split} split of {source.name} would hold "
                  f"{writer.tokens} token(s)", "use a longer input, or another --val-fraction (0.1 holds out 10%)")
        splits = {split: writer.commit() for split, writer in writers.items()}
    finally:
        for writer in writers.values():
            writer.discard()
    return {"format": "trainctl-tokens", "version": 1, "vocab_size": encoder.vocab_size, "dtype": dtype,
            "tokenizer": encoder.description, "eos_token_id": encoder.eos_id,
            "source": {"path": str(source.resolve()), "bytes": size, "field": field if jsonl else None},
            "val_fraction": val_fraction, "splits": splits}


def _write_jsonl(source: Path, field: str, encoder: Encoder, writers: Dict[str, SplitWriter], split_at: int,
                 progress: Callable[[int], None]) -> None:
    """Records a batch at a time: a record whose line starts at or after ``split_at`` goes to val.bin."""
    batch: List[Tuple[str, int]] = []
    chars = 0

    def flush(batch: List[Tuple[str, int]]) -> None:
        if not batch:
            return
        for (_, offset), ids in zip(batch, encoder.encode([text for text, _ in batch])):
            writer = writers["val" if offset >= split_at else "train"]
            writer.write(ids)
            writer.write(encoder.separator())
        progress(batch[-1][1])
    for document in jsonl_documents(source, field):
        batch.append(document)
        chars += len(document[0])
        if len(batch) >= BATCH_DOCUMENTS or chars >= BLOCK_BYTES:
            flush(batch)
            batch, chars = [], 0
    flush(batch)


# --- the command ------------------------------------------------------------------------------------------


def _output_dir(path: Path) -> bool:
    """Make ``path`` ready to write; True when it was created here."""
    if path.exists():
        check(path.is_dir(), "-o/--output", f"{path} exists and is not a directory", "choose a new directory")
        check(not any(path.iterdir()), "-o/--output", f"{path} exists and is not empty",
              "choose a new directory (or empty this one)")
        return False
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise ConfigError("-o/--output", f"cannot create {path}: {exc.strerror or exc}",
                          "choose a directory you can write to") from None
    return True


def _progress(total: int) -> Tuple[Any, Callable[[int], None]]:
    """A transient progress bar over the input's bytes, on a terminal and for inputs of some size."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    console = Console(stderr=True)
    bar = Progress(TextColumn("tokenising"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=console, transient=True,
                   disable=not console.is_terminal or total < BLOCK_BYTES)
    task = bar.add_task("tokenising", total=total)
    return bar, lambda position: bar.update(task, completed=position)


def main(argv: Sequence[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="trainctl prepare-tokens", description="Tokenise a text file (or .jsonl, the text in --field) "
        "into DIR/train.bin, DIR/val.bin and DIR/meta.json for `trainctl run data=tokens data.path=DIR`. "
        "Byte-level (vocabulary 256) unless --tokenizer or --tiktoken is given.")
    parser.add_argument("input", metavar="INPUT", help="a UTF-8 text file, or a .jsonl/.ndjson file")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="a new (or empty) directory")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--tokenizer", metavar="DIR", help="a local Hugging Face tokenizer directory "
                        "(save_pretrained's files; nothing is downloaded)")
    chosen.add_argument("--tiktoken", metavar="NAME", help="a tiktoken encoding, e.g. gpt2 (needs the tiktoken "
                        "package and its BPE files, which it downloads on first use and caches)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the input (its end) held out "
                        "for validation (default 0.1)")
    parser.add_argument("--field", default="text", help="the JSONL field that holds the text (default: text)")
    args = parser.parse_args(argv)
    source, out_dir = Path(args.input), Path(args.output)
    check(source.is_file(), "INPUT", f"no such file: {source}", "give a text or .jsonl file")
    check(0.0 < args.val_fraction < 1.0, "--val-fraction", f"must be between 0 and 1 (got {args.val_fraction})",
          "use --val-fraction 0.1")
    encoder = (hf_encoder(args.tokenizer) if args.tokenizer else tiktoken_encoder(args.tiktoken) if args.tiktoken
               else byte_encoder())
    created = _output_dir(out_dir)
    started = time.perf_counter()
    bar, progress = _progress(source.stat().st_size)
    try:
        with bar:
            meta = prepare(source, out_dir, encoder, args.val_fraction, args.field, progress)
        tmp = out_dir / ".meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out_dir / "meta.json")  # last: a directory with meta.json is complete
    except BaseException:
        for name in ("train.bin", "val.bin", ".meta.json.tmp"):  # the directory was empty: all of it is ours
            (out_dir / name).unlink(missing_ok=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    _summary(meta, source, out_dir, time.perf_counter() - started)


def _summary(meta: Dict[str, Any], source: Path, out_dir: Path, seconds: float) -> None:
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    kind = meta["tokenizer"]["kind"]
    name = {"bytes": "byte-level"}.get(kind, f"{kind} {meta['tokenizer'].get('name') or ''}".strip())
    print(f"prepared {out_dir}: train.bin {train['tokens']:,} tokens, val.bin {val['tokens']:,} tokens "
          f"({meta['dtype']}, vocabulary {meta['vocab_size']:,}, {name}) from {source.name} "
          f"({meta['source']['bytes'] / 2**20:,.1f} MiB) in {seconds:.1f} s", flush=True)
    print(f"train with: trainctl run model=gpt data=tokens data.path={out_dir}", flush=True)
