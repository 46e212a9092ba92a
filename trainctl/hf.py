"""`model=hf`: a Hugging Face `transformers` model loaded from a local directory, never downloaded.

The model is wrapped so that it takes trainctl's batches and returns logits like the built-in models:
token ids ``(B, L)`` -> ``(B, L, vocab)`` for causal LM, and ``(B, 2, L)`` (token ids and attention mask,
as the `hf_classification` data provides them) -> ``(B, num_labels)`` for sequence classification.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Dict, List

import torch
from torch import nn

from trainctl.errors import ConfigError

if TYPE_CHECKING:
    from trainctl.data import DataInfo
    from trainctl.model import HFSpec

log = logging.getLogger("trainctl")

INSTALL = "pip install 'trainctl[hf]'"


def require_transformers() -> Any:
    """The transformers module, offline and quiet; a ConfigError naming the install when it is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory only: never reach for the Hub
    try:
        import transformers
    except ImportError:
        raise ConfigError("model", "model=hf needs the transformers package, which is not installed",
                          INSTALL) from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


class HFModel(nn.Module):
    """A transformers model behind trainctl's calling convention (see the module docstring)."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.hf = model
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # (B, 2, L): token ids and attention mask
            return self.hf(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
        return self.hf(input_ids=x).logits

    def base(self) -> nn.Module:
        """The transformers model itself (without adapters)."""
        inner = self.hf
        return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def build_hf_model(spec: "HFSpec", info: "DataInfo", out_features: int) -> nn.Module:
    transformers = require_transformers()
    task = spec.hf_task(info.task)
    wanted = {"causal_lm": "lm", "sequence_classification": "classification"}[task]
    if info.task != wanted:
        raise ConfigError("model.task", f"model.task={task} trains on {wanted} data, not {info.task}",
                          "set model.task=auto")
    auto = (transformers.AutoModelForCausalLM if task == "causal_lm"
            else transformers.AutoModelForSequenceClassification)
    extra: Dict[str, Any] = {} if task == "causal_lm" else {"num_labels": out_features}
    try:
        model, loading = auto.from_pretrained(spec.path, local_files_only=True, trust_remote_code=False,
                                              dtype=torch.float32, output_loading_info=True,
                                              ignore_mismatched_sizes=not spec.init_strict, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:500]
        fix = ("set model.init_strict=false to start the mismatched tensors afresh (e.g. a new head)"
               if "size mismatch" in detail or "mismatch" in detail.lower() else
               "point model.path at a directory written by save_pretrained for this task")
        raise ConfigError("model.path", f"could not load a {task} model from {spec.path}: {detail}", fix) from None
    _check_loading(loading, spec)
    if task == "sequence_classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = _pad_id(spec.path)
    if task == "causal_lm" and info.vocab_size > model.config.vocab_size:
        raise ConfigError("data.tokenizer", f"the data has {info.vocab_size} token ids, more than the model's "
                          f"vocabulary of {model.config.vocab_size}", "tokenise with the model's own tokenizer "
                          "(data.tokenizer=${model.path})")
    return HFModel(model, task)


def _check_loading(loading: Dict[str, List[Any]], spec: "HFSpec") -> None:
    """Strict: every tensor of the model came from the directory and every stored one was used."""
    missing, unexpected = list(loading.get("missing_keys", [])), list(loading.get("unexpected_keys", []))
    mismatched = [f"{k[0]} {tuple(k[1])} vs {tuple(k[2])}" if isinstance(k, tuple) and len(k) == 3 else str(k)
                  for k in loading.get("mismatched_keys", [])]
    if not (missing or unexpected or mismatched):
        log.info("model.path: loaded every tensor from %s", spec.path)
        return
    report = "; ".join(part for part in (
        f"missing (initialised afresh): {', '.join(sorted(missing))}" if missing else "",
        f"unexpected (not used): {', '.join(sorted(unexpected))}" if unexpected else "",
        f"shape mismatch: {', '.join(mismatched)}" if mismatched else "") if part)
    if spec.init_strict:
        raise ConfigError("model.init_strict", f"the weights in {spec.path} do not fit the model exactly: "
                          f"{report[:1500]}", "set model.init_strict=false to load what fits (e.g. for a new head)")
    log.warning("model.path: loaded what fits from %s; %s", spec.path, report[:1500])


def _pad_id(path: str) -> int:
    """The tokenizer's pad (or end-of-text) token: a classifier reads the last non-padding position."""
    transformers = require_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError("model.path", f"the model has no pad_token_id and no tokenizer in {path} says which "
                          f"token pads ({' '.join(str(exc).split())[:200]})",
                          "save the tokenizer beside the model, or set pad_token_id in its config.json") from None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("model.path", f"neither the model nor the tokenizer in {path} names a pad or end token",
                          "set pad_token_id in the model's config.json")
    return int(pad)
