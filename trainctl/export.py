"""`trainctl export`: a run's trained weights in the layouts other tools load.

- a run with adapters (peft=lora/dora/qlora): the adapter in the standard PEFT layout
  (`adapter_config.json` + `adapter_model.safetensors`, loadable with ``PeftModel.from_pretrained``);
- with ``--merge``: the adapters merged into the base weights (`model.safetensors`; for a Hugging Face
  model a whole `save_pretrained` directory, with the tokenizer when the base directory has one);
- any other run: its whole weights (`model.safetensors`, or `save_pretrained` for a Hugging Face model).

Each export also holds `trainctl.yaml` (the spec `trainctl eval DIR` evaluates it with) and `export.json`
(what it is and where it came from). The directory is written beside its final place and renamed into
it, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from trainctl.errors import ConfigError
from trainctl.tables import ENCODING_FILE

if TYPE_CHECKING:
    from torch import nn

    from trainctl.build import Run

log = logging.getLogger("trainctl")

MARKER = "export.json"
SPEC = "trainctl.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "vocab.txt", "added_tokens.json", "chat_template.jinja")


def is_export(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / SPEC).is_file()


def export_run(run: "Run", weights: Path, step: Optional[int], run_dir: Optional[Path], path: Path,
               output: Optional[Path], merge: bool, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Export ``run``'s weights (loaded from ``weights``, of the run or checkpoint at ``path``) into
    ``output`` (default: RUN_DIR/export, or RUN_DIR/export-merged); ``extra``: more JSON files (name ->
    content) written into it, e.g. `trainctl merge`'s merge.json."""
    if output is None:
        if run_dir is None:
            raise ConfigError(None, f"{path} is not inside a run directory", "pass -o DIR")
        output = Path(run_dir) / ("export-merged" if merge else "export")
    output = output.absolute()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(None, f"{output} already exists", "pass -o with a new directory, or remove it")
    spec = run.spec
    adapters = spec.peft.adapters
    kind = "adapter" if adapters and not merge else "merged" if adapters else "weights"
    tmp = output.parent / f".tmp-{output.name}-{os.getpid()}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = _write(run, tmp, kind)
        if run_dir is not None and (Path(run_dir) / ENCODING_FILE).is_file():  # data=csv: the table's encoding
            shutil.copy2(Path(run_dir) / ENCODING_FILE, tmp / ENCODING_FILE)
            files.append(ENCODING_FILE)
        for name, payload in (extra or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
            files.append(name)
        saved_spec = _exported_spec(run, kind)
        (tmp / SPEC).write_text(saved_spec, encoding="utf-8")
        info = {"kind": kind, "source": str(weights), "step": step,
                "model": spec.model.name if hasattr(spec.model, "name") else "custom", "peft": spec.peft.name,
                "files": sorted(files + [SPEC, MARKER])}
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if output.is_dir():
            output.rmdir()
        os.replace(tmp, output)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(None, f"could not write {output}: {exc.strerror or exc}",
                          "free space or choose another -o DIR") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**info, "output": str(output),
            "bytes": sum(f.stat().st_size for f in output.iterdir() if f.is_file())}


def _write(run: "Run", directory: Path, kind: str) -> List[str]:
    from trainctl.files import save_weights
    from trainctl.hf import HFModel

    model = run.model
    hf = isinstance(model, HFModel)
    if kind == "adapter":
        peft_model = model.hf if hf else model
        peft_model.save_pretrained(str(directory))
        (directory / "README.md").unlink(missing_ok=True)  # peft's model-card template, not ours to fill
        return ["adapter_config.json", "adapter_model.safetensors"]
    if kind == "merged":
        model = merged(model)
    if hf:
        model.base().save_pretrained(str(directory))
        _copy_tokenizer(Path(run.spec.model.path), directory)
        return sorted(p.name for p in directory.iterdir())
    save_weights(model, directory / "model.safetensors", {"trainctl_export": kind})
    return ["model.safetensors"]


def merged(model: "nn.Module") -> "nn.Module":
    """The model with its adapters folded into the base weights (a 4-bit base is dequantised first)."""
    from trainctl.adapters import TRAINABLE_ONLY
    from trainctl.quantize import dequantize_linears
    from trainctl.hf import HFModel

    if isinstance(model, HFModel):
        dequantize_linears(model.hf)
        model.hf = model.hf.merge_and_unload()
        target = model
    else:
        dequantize_linears(model)
        target = model.merge_and_unload()
    if hasattr(target, TRAINABLE_ONLY):
        delattr(target, TRAINABLE_ONLY)
    for module in target.modules():
        if hasattr(module, TRAINABLE_ONLY):
            delattr(module, TRAINABLE_ONLY)
    return target


def _copy_tokenizer(source: Path, directory: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)


def _exported_spec(run: "Run", kind: str) -> str:
    """The spec `trainctl eval` rebuilds the exported model with: for whole weights, no adapters and no
    initial weights (the export holds them all); a Hugging Face model loads from the export itself."""
    import copy

    from trainctl.adapters import PeftSpec
    from trainctl.model import is_custom
    from trainctl.spec import spec_yaml

    spec = copy.deepcopy(run.spec)
    if kind != "adapter":
        spec.peft = PeftSpec()
        if is_custom(spec.model):
            spec.model.pop("init_from", None)
        else:
            spec.model.init_from = None
    return spec_yaml(spec)


def load_exported(path: Path, overrides: List[str], base_dir: str) -> "Run":
    """A run built from an export's spec, with the exported weights in its model."""
    from trainctl.build import build_run
    from trainctl.files import SPEC_FILE_BYTES, read_bounded
    from trainctl.resume import load_saved_spec

    try:
        info = json.loads(read_bounded(path / MARKER, SPEC_FILE_BYTES))
    except (OSError, ValueError) as exc:
        raise ConfigError(None, f"{path / MARKER} is not readable: {exc}") from None
    kind = info.get("kind") if isinstance(info, dict) else None
    if kind not in ("adapter", "merged", "weights"):
        raise ConfigError(None, f"{path / MARKER} names no known kind of export (got {kind!r})",
                          "export the run again with `trainctl export`")
    try:
        spec_text = read_bounded(path / SPEC, SPEC_FILE_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(None, f"{path / SPEC} is not readable: {exc}") from None
    hf_whole = kind != "adapter" and info.get("model") == "hf"  # a save_pretrained directory: loads itself
    extra = [f"model.path={path.absolute()}"] if hf_whole else []
    spec = load_saved_spec(path / SPEC, [*extra, *overrides], base_dir, text=spec_text)
    if getattr(spec.data, "encoding", "set") is None and (path / ENCODING_FILE).is_file():
        spec.data.encoding = str((path / ENCODING_FILE).resolve())  # encode as the run did
    run = build_run(spec, base_dir=base_dir)
    if kind == "adapter":
        _load_adapter(run.model, path)
    elif not hf_whole:
        from trainctl.files import CheckpointError, load_weights

        try:
            load_weights(run.model, path / "model.safetensors")
        except CheckpointError as exc:
            raise ConfigError(None, str(exc)) from None
    return run


def _load_adapter(model: "nn.Module", path: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from trainctl.hf import HFModel

    peft_model = model.hf if isinstance(model, HFModel) else model
    try:
        weights = load_file(str(path / "adapter_model.safetensors"))
    except Exception as exc:  # a damaged file: safetensors' own error type
        raise ConfigError(None, f"{path / 'adapter_model.safetensors'} is not readable: {exc}") from None
    result = set_peft_model_state_dict(peft_model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise ConfigError(None, f"the adapter in {path} does not fit the model: unexpected {unexpected[:8]}",
                          "evaluate it with the spec it was exported with")
