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

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

if TYPE_CHECKING:
    import torch
    from torch import nn

COMMIT_MARKER = "COMMITTED"


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, incomplete, corrupt, or unsafe to load."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path) -> None:
    _fsync(tmp)
    os.replace(tmp, final)


def write_json(path: Path, payload: Dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    _commit(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    _commit(tmp, path)


def save_weights(model: "nn.Module", path: Path, metadata: Dict[str, str]) -> None:
    """The model's weights as safetensors (tied weights are stored once)."""
    from safetensors.torch import save_model

    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its files private (0600)
    _commit(tmp, path)


def save_state_dict(weights: Dict[str, "torch.Tensor"], path: Path, metadata: Dict[str, str]) -> None:
    """Weights already gathered into a state dict (no shared tensors), as safetensors."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(weights, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())
    _commit(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_weights(model: "nn.Module", path: Path) -> None:
    """Load safetensors weights into ``model``; a missing, extra or mis-shaped tensor is an error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        load_model(model, str(path), strict=True, device=str(next(model.parameters()).device))
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(f"the weights in {path} do not fit this model: {detail[:600]}") from None


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


def verify_dir(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete, intact checkpoint directory (None when it is)."""
    marker = path / COMMIT_MARKER
    if not path.is_dir():
        return "it does not exist"
    if not marker.is_file():
        return "it has no commit marker (it was never completely written)"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its commit marker is unreadable"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {expected['bytes']} were written (truncated?)"
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
