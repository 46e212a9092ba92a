"""`model.init_from`: start a run from saved weights — a `.safetensors` file, a trainctl run directory
(its final `model.safetensors`, else its newest checkpoint) or a checkpoint directory.

Strict loading needs every tensor to match the model by name and shape; with `model.init_strict=false`
the tensors that fit are loaded and the rest reported (the usual case: a new classification head).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Tuple

from trainctl.errors import ConfigError
from trainctl.files import PARTIAL_METADATA, CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("trainctl")
KEY = "model.init_from"


def weights_file(path: Path) -> Path:
    """The safetensors file ``path`` stands for (a file, a run directory or a checkpoint directory)."""
    from trainctl.checkpoint import newest_valid, read_checkpoint

    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(KEY, f"{path} does not exist", f"point {KEY} at a .safetensors file, a run directory "
                          "or a checkpoint directory")
    try:
        if (path / "state.pt").is_file() or (path / "spec.yaml").is_file():  # a checkpoint
            ckpt = read_checkpoint(path)
            if ckpt.sharded:
                raise ConfigError(KEY, f"{path} is a sharded (FSDP) checkpoint",
                                  "start from its run's final model.safetensors instead")
            return ckpt.weights
        if (path / "model.safetensors").is_file():  # a run directory, an export, a save_pretrained directory
            return path / "model.safetensors"
        found = newest_valid(path / "checkpoints")
    except CheckpointError as exc:
        raise ConfigError(KEY, str(exc), f"point {KEY} at intact weights") from None
    if found is None:
        raise ConfigError(KEY, f"{path} holds no model.safetensors and no complete checkpoint",
                          f"point {KEY} at a .safetensors file, a run directory or a checkpoint directory")
    if found.sharded:
        raise ConfigError(KEY, f"the newest checkpoint of {path} is sharded (FSDP)",
                          "start from the run's final model.safetensors")
    return found.weights


def _read(file: Path) -> Tuple[Dict[str, "torch.Tensor"], Dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(KEY, f"{file} is not a readable safetensors file ({' '.join(str(exc).split())[:200]})",
                          f"point {KEY} at weights saved by trainctl or save_pretrained") from None
    return tensors, metadata


def load_initial(model: "nn.Module", source: str, strict: bool) -> Dict[str, List[str]]:
    """Load ``source`` into ``model``; returns the keys that did not load (missing, unexpected, mismatched)."""
    from trainctl.hf import HFModel

    file = weights_file(Path(source))
    tensors, metadata = _read(file)
    if metadata.get(PARTIAL_METADATA) == "1":
        raise ConfigError(KEY, f"{file} holds only the trained part of a fine-tuning run (adapters or unfrozen "
                          "modules), not whole weights", "export whole weights with `trainctl export RUN_DIR "
                          "--merge -o DIR` and start from DIR")
    if isinstance(model, HFModel) and tensors and not any(k.startswith("hf.") for k in tensors):
        tensors = {f"hf.{k}": v for k, v in tensors.items()}  # a transformers checkpoint of the same model
    own = model.state_dict()
    shared = _aliases(own)
    missing = [k for k in own if k not in tensors and not any(a in tensors for a in shared.get(k, ()))]
    unexpected = [k for k in tensors if k not in own]
    mismatched = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)} in the model"
                  for k in tensors if k in own and tensors[k].shape != own[k].shape]
    fitting = {k: v for k, v in tensors.items() if k in own and v.shape == own[k].shape}
    problems = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    if strict and (missing or unexpected or mismatched):
        raise ConfigError("model.init_strict", f"the weights in {file} do not fit the model: {_report(problems)}",
                          "set model.init_strict=false to load what fits (e.g. when the head is new)")
    model.load_state_dict(fitting, strict=False)
    log.info("model.init_from: loaded %d of %d tensors from %s: %s", len(fitting), len(own), file,
             _listed(sorted(fitting)))
    if missing or unexpected or mismatched:
        log.warning("model.init_from: not loaded (model.init_strict=false): %s", _report(problems))
    return problems


def _aliases(state: Dict[str, "torch.Tensor"]) -> Dict[str, Tuple[str, ...]]:
    """Names that share storage (tied weights, stored once in a safetensors file)."""
    by_ptr: Dict[Tuple[int, int], List[str]] = {}
    for name, tensor in state.items():
        if tensor.device.type != "meta" and tensor.numel():
            by_ptr.setdefault((tensor.data_ptr(), tensor.numel()), []).append(name)
    return {n: tuple(m for m in names if m != n) for names in by_ptr.values() if len(names) > 1 for n in names}


def _listed(keys: List[str]) -> str:
    return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")


def _report(problems: Dict[str, List[str]]) -> str:
    return "; ".join(f"{kind}: {_listed(keys)}" for kind, keys in problems.items() if keys)
