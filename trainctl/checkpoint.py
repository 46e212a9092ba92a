"""Files that must never be seen half-written: model weights (safetensors) and JSON documents are
written under a temporary name, flushed to disk, then renamed into place."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict

if TYPE_CHECKING:
    from torch import nn


def _commit(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


def write_json(path: Path, payload: Dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    _commit(tmp, path)


def save_weights(model: "nn.Module", path: Path, metadata: Dict[str, str]) -> None:
    """The model's weights as safetensors (tied weights are stored once)."""
    from safetensors.torch import save_model

    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp), metadata=metadata)
    _commit(tmp, path)
