"""The `peft` config group: which weights a run trains.

- `none`: every parameter (full training or full fine-tuning);
- `freeze`: only the modules matching `peft.trainable` (a linear probe, a new head), plus those listed in
  `peft.unfreeze_at` from the epoch each names (gradual unfreezing; each unfreezing adds a parameter group);
- `lora`, `dora`: low-rank adapters from Hugging Face `peft` on the targeted layers, the rest frozen;
- `qlora`: LoRA over base linear layers stored in 4-bit NF4 (bitsandbytes).

A run with frozen weights saves only what it trains (plus the buffers, e.g. batch-norm statistics): its
checkpoints and final `model.safetensors` hold the trainable tensors, and the frozen base is rebuilt
from where it came from (`model.init_from`, `model.path`). Specs and checks are torch-free.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Union

from trainctl.errors import ConfigError, check, check_choice
from trainctl.quantize import linear_examples, quiet_bitsandbytes
from trainctl.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("trainctl")

TRAINABLE_ONLY = "_trainctl_trainable_only"
"""Set on a model whose frozen weights are not saved (see :func:`trainctl.files.saved_keys`)."""


@dataclass
class PeftSpec:
    name: str = "none"

    @property
    def adapters(self) -> bool:
        """Low-rank adapters from Hugging Face `peft` (lora, dora, qlora)."""
        return False

    @property
    def partial(self) -> bool:
        """Some weights stay frozen: checkpoints hold only the trainable ones."""
        return False

    def validate(self, key: str = "peft") -> None:
        pass


@dataclass
class UnfreezeStep:
    epoch: int = 1
    """The epoch (0-based) from whose start these modules train."""
    modules: List[str] = field(default_factory=list)
    """Module-name patterns (shell-style, e.g. `blocks.1.*`) unfrozen at that epoch."""


@dataclass
class FreezeSpec(PeftSpec):
    """Train only some modules; the rest keep their (pretrained) weights."""

    name: str = "freeze"
    trainable: List[str] = field(default_factory=lambda: ["head", "head.*"])
    """Module or parameter-name patterns (shell-style) that train from the start; the default trains the
    head of the built-in models (a linear probe)."""
    unfreeze_at: List[UnfreezeStep] = field(default_factory=list)
    """Gradual unfreezing: `[{epoch: 2, modules: ['blocks.1.*']}]`. Learning rates of the new groups
    follow `optimizer.lr_multipliers` like any other parameter."""

    @property
    def partial(self) -> bool:
        return True

    def validate(self, key: str = "peft") -> None:
        check(all(p.strip() for p in self.trainable), f"{key}.trainable", "has an empty pattern",
              f"set {key}.trainable=[head]")
        seen = set()
        for i, step in enumerate(self.unfreeze_at):
            check(step.epoch >= 1, f"{key}.unfreeze_at[{i}].epoch", f"must be >= 1 (got {step.epoch}); "
                  f"modules trained from the start belong in {key}.trainable", f"move them to {key}.trainable")
            check(step.epoch not in seen, f"{key}.unfreeze_at[{i}].epoch", f"epoch {step.epoch} is listed twice",
                  "merge the two entries")
            check(bool(step.modules), f"{key}.unfreeze_at[{i}].modules", "is empty",
                  f"list module patterns, e.g. {key}.unfreeze_at=[{{epoch:2,modules:[blocks.1.*]}}]")
            seen.add(step.epoch)


@dataclass
class LoraSpec(PeftSpec):
    """Low-rank adapters (Hu et al., 2021) through Hugging Face `peft`: W + (alpha / r) B A on each targeted
    layer, B starting at zero so the first step sees the base model unchanged."""

    name: str = "lora"
    r: int = 8
    """Rank of the adapters."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with `rslora`)."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: Optional[Any] = None
    """Layers that get adapters: a list of module names (a name matches itself and any module whose
    name ends with `.name`) or one regular expression matched against the full name; null picks the
    usual layers: the hidden linear layers of `mlp`, the convolutions of `cnn`, the attention and MLP
    projections of `gpt`, and the attention projections of a Hugging Face architecture peft knows."""
    modules_to_save: Optional[List[str]] = None
    """Modules trained in full beside the adapters (e.g. a new head); null: the head of `mlp`/`cnn` and
    the classification head of a Hugging Face sequence classifier."""
    bias: str = "none"
    """Biases trained as well: none, all, or lora_only (those of adapted layers)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski, 2023)."""
    use_dora: bool = False
    """Weight-decomposed adapters (DoRA: a trained magnitude per output, the adapters set the direction)."""

    @property
    def adapters(self) -> bool:
        return True

    @property
    def partial(self) -> bool:
        return True

    def validate(self, key: str = "peft") -> None:
        check(self.r >= 1, f"{key}.r", f"must be >= 1 (got {self.r})", f"set {key}.r=8")
        check(self.alpha > 0, f"{key}.alpha", f"must be > 0 (got {self.alpha})", f"set {key}.alpha=16")
        check(0 <= self.dropout < 1, f"{key}.dropout", "must be in [0, 1)", f"set {key}.dropout=0.0")
        check_choice(self.bias, ("none", "all", "lora_only"), f"{key}.bias")
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as exc:
                raise ConfigError(f"{key}.target_modules", f"'{targets}' is not a regular expression: {exc}",
                                  f"set {key}.target_modules=[name, ...] or a valid pattern") from None
        else:
            check(targets is None or (isinstance(targets, (list, tuple)) and len(targets) > 0
                                      and all(isinstance(t, str) and t for t in targets)),
                  f"{key}.target_modules", "must be a list of module names, a regular expression, or null",
                  f"set {key}.target_modules=null")


@dataclass
class DoraSpec(LoraSpec):
    """LoRA with weight decomposition (Liu et al., 2024): magnitude and direction trained separately."""

    name: str = "dora"
    use_dora: bool = True


@dataclass
class QLoraSpec(LoraSpec):
    """LoRA over a base whose targeted linear layers are stored in 4 bits (Dettmers et al., 2023): NF4 with
    double quantisation, computed in the dtype of the `precision` group; needs bitsandbytes
    (`pip install 'trainctl[qlora]'`)."""

    name: str = "qlora"
    quant_type: str = "nf4"
    """nf4 (normal-float, for normally distributed weights) or fp4."""
    double_quant: bool = True
    """Quantise the per-block scales too (about 0.4 bits per weight saved)."""

    def validate(self, key: str = "peft") -> None:
        super().validate(key)
        check_choice(self.quant_type, ("nf4", "fp4"), f"{key}.quant_type")


@dataclass(frozen=True)
class PeftEntry:
    spec: type


PEFTS: Registry[PeftEntry] = Registry("peft")
PEFTS.add("none", PeftEntry(PeftSpec))
PEFTS.add("freeze", PeftEntry(FreezeSpec))
PEFTS.add("lora", PeftEntry(LoraSpec))
PEFTS.add("dora", PeftEntry(DoraSpec))
PEFTS.add("qlora", PeftEntry(QLoraSpec))

BUILTIN_TARGETS: Dict[str, Union[str, List[str]]] = {
    "mlp": r"blocks\.\d+\.0",
    "cnn": r"blocks\.\d+\.[03]",
    "gpt": r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.[02])",
}
"""Layers adapted when `peft.target_modules` is null: regular expressions over the built-in models' names."""
BUILTIN_SAVED = {"mlp": ["head"], "cnn": ["head"], "gpt": []}
"""Modules trained in full beside the adapters when `peft.modules_to_save` is null."""


def require_peft() -> Any:
    import warnings

    # peft asks transformers a question that transformers 5 renamed; the answer is the same
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        quiet_bitsandbytes()
        import peft
    except ImportError:
        raise ConfigError("peft", "adapters need the Hugging Face peft package, which is not installed",
                          "pip install 'trainctl[hf]'") from None
    return peft


# --- applying the group to a built model -----------------------------------------------------------------


def apply(model: "nn.Module", spec: PeftSpec, kind: Optional[str], compute_dtype: "torch.dtype") -> "nn.Module":
    """The model to train: ``model`` itself with parameters frozen (`freeze`), or wrapped with adapters.
    ``kind`` is the model option (mlp, cnn, gpt, hf; None for a custom model): it says which defaults
    apply; ``compute_dtype`` is QLoRA's compute precision."""
    if isinstance(spec, FreezeSpec):
        freeze(model, spec.trainable, "peft.trainable")
    elif isinstance(spec, LoraSpec):
        model = _with_adapters(model, spec, kind, compute_dtype)
    else:
        return model
    setattr(model, TRAINABLE_ONLY, True)
    return model


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def freeze(model: "nn.Module", patterns: Sequence[str], key: str) -> None:
    """Train only the parameters whose name, or whose module's name, matches one of ``patterns``."""
    matched = set()
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0] if "." in name else ""
        hits = [p for p in patterns if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module, p)]
        matched.update(hits)
        param.requires_grad_(bool(hits))
    unused = [p for p in patterns if p not in matched]
    if unused:
        raise ConfigError(key, f"pattern '{unused[0]}' matches no module or parameter "
                          f"(modules look like: {_module_examples(model)})", f"fix {key}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(key, "leaves nothing to train", f"list the modules to train in {key}")


def unfreeze(model: "nn.Module", patterns: Sequence[str], key: str) -> List["torch.nn.Parameter"]:
    """Make the parameters matching ``patterns`` trainable; returns the ones that were frozen, in order."""
    woken, matched = [], set()
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0] if "." in name else ""
        hits = [p for p in patterns if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module, p)]
        matched.update(hits)
        if hits and not param.requires_grad:
            param.requires_grad_(True)
            woken.append((name, param))
    unused = [p for p in patterns if p not in matched]
    if unused:
        raise ConfigError(key, f"pattern '{unused[0]}' matches no module or parameter "
                          f"(modules look like: {_module_examples(model)})", f"fix {key}")
    return woken


def _module_examples(model: "nn.Module") -> str:
    names = [n for n, m in model.named_modules() if n and not list(m.children())]
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


def _with_adapters(model: "nn.Module", spec: LoraSpec, kind: Optional[str], compute_dtype: "torch.dtype"
                   ) -> "nn.Module":
    """Adapters around ``model``; a Hugging Face model (kind hf) gets them around the transformers model
    inside its wrapper, so they are saved and loaded as peft does for that architecture."""
    peft = require_peft()
    hf = kind == "hf"
    targets = spec.target_modules
    if targets is None and kind in BUILTIN_TARGETS:
        targets = BUILTIN_TARGETS[kind]
    if targets is None and not hf:
        raise ConfigError("peft.target_modules", "has no default for this model",
                          f"name the layers to adapt, e.g. peft.target_modules=[...] (linear layers: "
                          f"{linear_examples(model)})")
    if isinstance(targets, (list, tuple)):
        targets = list(targets)
    saved = spec.modules_to_save
    if saved is None:
        saved = BUILTIN_SAVED.get(kind or "", None)
    inner = model.hf if hf else model
    task_type = None
    if hf:
        task_type = "SEQ_CLS" if model.task == "sequence_classification" else "CAUSAL_LM"
    if isinstance(spec, QLoraSpec):
        from trainctl.quantize import quantize_linears

        quantize_linears(inner, target_names(inner, targets), saved or [], spec.quant_type, spec.double_quant,
                         compute_dtype)
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                             modules_to_save=list(saved) if saved else None, bias=spec.bias,
                             use_rslora=spec.rslora, use_dora=spec.use_dora, task_type=task_type)
    try:
        wrapped = peft.get_peft_model(inner, config)
    except ValueError as exc:  # no module matched, or a layer type peft cannot adapt
        raise ConfigError("peft.target_modules", " ".join(str(exc).split())[:400],
                          f"choose layers that exist (linear layers: {linear_examples(inner)})") from None
    if hf:
        model.hf = wrapped
        return model
    return wrapped


def target_names(model: "nn.Module", targets: Any) -> List[str]:
    """Module names peft would adapt for ``targets`` (a regex matched in full, or names matched as suffixes);
    for null (a Hugging Face model), peft's own default for the architecture."""
    names = [n for n, _ in model.named_modules() if n]
    if targets is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = list(DEFAULTS.get(model_type, []))
        if not targets:
            raise ConfigError("peft.target_modules", f"peft has no default layers for model type '{model_type}'",
                              f"name them: peft.target_modules=[...] ({linear_examples(model)})")
    if isinstance(targets, str):
        return [n for n in names if re.fullmatch(targets, n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


# --- the numbers users see -----------------------------------------------------------------------------


def parameter_counts(model: "nn.Module") -> Dict[str, Any]:
    """Trainable and total parameters (a 4-bit weight counts its elements, not its bytes)."""
    trainable = total = 0
    for param in {id(p): p for p in model.parameters()}.values():
        n = _elements(param)
        total += n
        trainable += n if param.requires_grad else 0
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def _elements(param: "torch.Tensor") -> int:
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        import math

        return math.prod(state.shape)
    return param.numel()


def describe(counts: Dict[str, Any]) -> str:
    return f"{counts['trainable']:,} trainable of {counts['total']:,} parameters ({counts['percent']:.2f}%)"


# --- gradual unfreezing ---------------------------------------------------------------------------------


class Unfreezer:
    """Unfreezes the modules of `peft.unfreeze_at` when their epoch starts: their parameters become
    trainable and join the optimizer as new parameter groups (and the schedule, at its current factor)."""

    name = "unfreeze"

    def __init__(self, steps: List[UnfreezeStep], make_groups: Callable[[List[Any]], List[dict]]) -> None:
        self.steps = sorted(steps, key=lambda s: s.epoch)
        self.make_groups = make_groups
        self.done = 0
        """How many entries of ``steps`` have been applied."""

    def catch_up(self, run: Any, epoch: int) -> None:
        """Apply every entry whose epoch is <= ``epoch`` and not applied yet (called at each epoch's start,
        and before a resumed run loads its saved weights and optimizer state)."""
        model = run.model
        while self.done < len(self.steps) and self.steps[self.done].epoch <= epoch:
            step = self.steps[self.done]
            woken = unfreeze(model, step.modules, f"peft.unfreeze_at[{self.done}].modules")
            for group in self.make_groups(woken):
                add_param_group(run.optimizer, run.scheduler, group)
            run.clipper.params = [p for p in model.parameters() if p.requires_grad]
            self.done += 1
            if woken:
                log.info("epoch %d: unfroze %d tensors (%s); %s", epoch, len(woken), ", ".join(step.modules),
                         describe(parameter_counts(model)))


def add_param_group(optimizer: Any, scheduler: Any, group: dict) -> None:
    """Add ``group`` to the optimizer and to a LambdaLR-family schedule, at the schedule's current factor."""
    inner = getattr(scheduler, "scheduler", scheduler)
    base_lr = group["lr"]
    group = {**group, "initial_lr": base_lr}
    optimizer.add_param_group(group)
    if hasattr(inner, "lr_lambdas"):
        inner.base_lrs.append(base_lr)
        inner.lr_lambdas.append(inner.lr_lambdas[0])
        factor = inner.lr_lambdas[0](inner.last_epoch)
        optimizer.param_groups[-1]["lr"] = base_lr * factor
        inner._last_lr = [g["lr"] for g in optimizer.param_groups]
    elif hasattr(inner, "min_lrs"):  # ReduceLROnPlateau: new groups start at their base lr
        inner.min_lrs.append(inner.min_lrs[0])
        inner._last_lr = [g["lr"] for g in optimizer.param_groups]
