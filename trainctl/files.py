"""Files that must never be seen half-written.

Single files (JSON, weights) are written under a temporary name, flushed to disk, then renamed into
place. A checkpoint is a directory: its files are written into a temporary directory, then a commit
marker listing every file with its size and SHA-256 is written last, and the directory is renamed to
its final name. A directory without a valid marker is never loaded. Pointers (`last`, `best`) are
symlinks replaced atomically.

Everything that is not safetensors is read with ``torch.load(weights_only=True)``: tensors and plain
containers only, never arbitrary Python objects.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

if TYPE_CHECKING:
    import torch
    from torch import nn

COMMIT_MARKER = "COMMITTED"
SMALL_FILE_BYTES = 1 << 20
"""Largest metadata file (commit marker, meta.json) read; larger ones are refused, not read."""
SPEC_FILE_BYTES = 16 << 20
"""Largest spec (config.yaml, a checkpoint's spec.yaml) read."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, incomplete, corrupt, or unsafe to load."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary name next to ``path``; when the block succeeds the file is flushed to disk and
    renamed into place, and when it fails (a full disk, a write error of any kind) it is removed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def write_json(path: Path, payload: Dict[str, Any], in_place_when_full: bool = False) -> None:
    """``payload`` as JSON, atomically. With ``in_place_when_full``, a disk with no room for the new
    copy gets the file overwritten in place instead (its old blocks are reused), so a run can still
    record how it ended when the disk is full."""
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    try:
        with _atomic(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        if not (in_place_when_full and exc.errno in (errno.ENOSPC, errno.EDQUOT) and path.is_file()):
            raise
        with open(path, "r+", encoding="utf-8") as handle:
            handle.truncate(0)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def write_text(path: Path, text: str) -> None:
    with _atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


PARTIAL_METADATA = "trainctl_trainable_only"
"""safetensors metadata key: "1" when the file holds only a fine-tuning run's trainable tensors."""


def saved_keys(model: "nn.Module") -> Optional[List[str]]:
    """The state-dict keys a checkpoint of ``model`` holds: None for all of them, or, for a model with
    frozen weights (the `peft` group), its trainable parameters and its buffers (batch-norm statistics
    move even when the weights are frozen)."""
    if not getattr(model, "_trainctl_trainable_only", False):
        return None
    state = model.state_dict(keep_vars=True)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    buffers = {id(b) for b in model.buffers()}
    return [k for k, v in state.items() if id(v) in trainable or id(v) in buffers]


def save_weights(model: "nn.Module", path: Path, metadata: Dict[str, str]) -> None:
    """The model's weights as safetensors (tied weights are stored once); for a model with frozen
    weights, only what :func:`saved_keys` names."""
    from safetensors.torch import save_file, save_model

    keys = saved_keys(model)
    with _atomic(path) as tmp:
        if keys is None:
            save_model(model, str(tmp), metadata=metadata)
        else:
            state = model.state_dict()
            save_file({k: state[k].detach().contiguous() for k in keys}, str(tmp),
                      metadata={**metadata, PARTIAL_METADATA: "1"})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its files private (0600)


def save_state_dict(weights: Dict[str, "torch.Tensor"], path: Path, metadata: Dict[str, str]) -> None:
    """Weights already gathered into a state dict (no shared tensors), as safetensors."""
    from safetensors.torch import save_file

    with _atomic(path) as tmp:
        save_file(weights, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())


def failure_text(exc: BaseException, directory: Path) -> str:
    """Why a write into ``directory`` failed, in words: the OS reason, or the library's, plus a note when
    the disk is full (torch and safetensors report ENOSPC as a generic write error)."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
    text = " ".join(str(text).split())[:300]
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return text
    if free < (4 << 20) and "No space left" not in text:
        text += f" (the disk is full: {free:,} bytes free)"
    return text


def read_bounded(path: Path, limit: int, follow_symlinks: bool = True) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. Anything else - a device such as
    /dev/zero, a FIFO, a directory, a symlink when ``follow_symlinks`` is False, a larger file - is
    refused with an OSError before it is read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link, which is not allowed here", str(path)) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "is not a regular file", str(path))
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"is larger than {limit:,} bytes ({info.st_size:,})", str(path))
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"is larger than {limit:,} bytes", str(path))
    return data


def read_text_bounded(path: Path, limit: int = SPEC_FILE_BYTES, follow_symlinks: bool = True) -> str:
    data = read_bounded(path, limit, follow_symlinks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OSError(errno.EINVAL, f"is not UTF-8 text ({exc.reason} at byte {exc.start})", str(path)) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_weights(model: "nn.Module", path: Path) -> None:
    """Load safetensors weights into ``model``; a missing, extra or mis-shaped tensor is an error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    keys = saved_keys(model)
    try:
        if keys is None:
            load_model(model, str(path), strict=True, device=str(next(model.parameters()).device))
        else:
            _load_partial(model, path, keys)
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(f"the weights in {path} do not fit this model: {detail[:600]}") from None


def _load_partial(model: "nn.Module", path: Path, keys: List[str]) -> None:
    """The trainable tensors of a model with frozen weights: exactly :func:`saved_keys`, each of its shape."""
    from safetensors.torch import load_file

    loaded = load_file(str(path), device=str(next(model.parameters()).device))
    state = model.state_dict()
    missing, unexpected = sorted(set(keys) - set(loaded)), sorted(set(loaded) - set(keys))
    wrong = [k for k in keys if k in loaded and loaded[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise RuntimeError(f"missing: {missing[:8]}, unexpected: {unexpected[:8]}, wrong shape: {wrong[:8]}")
    model.load_state_dict(loaded, strict=False)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def commit_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Seal ``tmp_dir`` with its marker (written last) and rename it to ``final_dir``."""
    files = {}
    for path in sorted(tmp_dir.iterdir()):
        _fsync(path)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    marker = tmp_dir / COMMIT_MARKER
    marker.write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")
    _fsync(marker)
    _fsync(tmp_dir)
    trash = None
    if final_dir.exists():  # the same step saved again (e.g. after a resume): swap the directories
        trash = final_dir.with_name(f".trash-{final_dir.name}-{os.getpid()}")
        os.replace(final_dir, trash)
    os.replace(tmp_dir, final_dir)
    _fsync(final_dir.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _describe_os_error(exc: OSError) -> str:
    return exc.strerror or str(exc)


def listed_files(path: Path) -> Dict[str, Dict[str, Any]]:
    """The files a checkpoint's commit marker lists (name -> bytes, sha256), checked for shape. Raises
    ValueError when the marker is not one trainctl wrote."""
    try:
        marker = json.loads(read_bounded(path / COMMIT_MARKER, SMALL_FILE_BYTES, follow_symlinks=False))
    except OSError as exc:
        raise ValueError(f"its commit marker cannot be read ({_describe_os_error(exc)})") from None
    except ValueError:
        raise ValueError("its commit marker is not valid JSON") from None
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict) or not files:
        raise ValueError("its commit marker lists no files")
    for name, entry in files.items():
        if not isinstance(name, str) or name in (".", "..", COMMIT_MARKER) or "/" in name or "\\" in name:
            raise ValueError(f"its commit marker lists {name!r}, which is not a file name")
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and entry["bytes"] >= 0
                and isinstance(entry.get("sha256"), str)):
            raise ValueError(f"its commit marker has no size and checksum for {name}")
    return files


def verify_dir(path: Path, required: tuple = ()) -> Optional[str]:
    """Why ``path`` is not a complete, intact checkpoint directory (None when it is): every file in it
    must be a regular file (no symlinks, devices or FIFOs) listed in the commit marker with its size and
    SHA-256, and the marker must list each name in ``required``."""
    if not path.is_dir():
        return "it does not exist"
    if not (path / COMMIT_MARKER).is_file() or (path / COMMIT_MARKER).is_symlink():
        return "it has no commit marker (it was never completely written)"
    try:
        files = listed_files(path)
    except ValueError as exc:
        return str(exc)
    for name in required:
        if name not in files:
            return f"its commit marker does not list {name}"
    try:
        present = set(os.listdir(path)) - {COMMIT_MARKER}
    except OSError as exc:
        return f"it cannot be listed ({_describe_os_error(exc)})"
    extra = sorted(present - set(files))
    if extra:
        return f"it holds {extra[0]}, which its commit marker does not list"
    for name, expected in files.items():
        file = path / name
        try:
            info = os.lstat(file)
        except OSError:
            return f"{name} is missing"
        if not stat.S_ISREG(info.st_mode):
            return f"{name} is not a regular file (a symlink, device or directory is never part of a checkpoint)"
        if info.st_size != expected["bytes"]:
            return f"{name} has {info.st_size} bytes, {expected['bytes']} were written (truncated?)"
        if sha256_of(file) != expected["sha256"]:
            return f"{name} does not match its checksum (corrupted)"
    return None


def point(link: Path, target: str) -> None:
    """Make ``link`` a symlink to ``target`` (a sibling name), replacing any old one atomically."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    _fsync(link.parent)


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers; anything else is refused."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain containers, "
            f"which could run code when unpickled ({detail.strip()[:200]}). trainctl never writes such files; "
            "do not load it unless you trust where it came from") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else 'truncated'})") from None
