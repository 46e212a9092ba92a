"""The `performance` config group: torch.compile, activation checkpointing and channels_last, plus the
measurements behind throughput reports (compile time, peak memory, FLOPs per sample for MFU, time from
process start to the first optimizer step).

The spec and its checks are torch-free; the functions that change a model import torch when called.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, List, Optional

from trainctl.errors import ConfigError, check, check_choice

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("trainctl")

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CHECKPOINTING = ("none", "blocks", "modules")
WRAPPED = "_checkpoint_wrapped_module."
"""What activation checkpointing inserts into parameter names (state dicts stay free of it)."""

PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
               "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
               "V100": 125.0, "T4": 65.0}
"""Dense bf16/fp16 tensor-core peak TFLOP/s per GPU, matched as a substring of the device name (the
most specific first); `performance.peak_tflops` overrides it."""


@dataclass
class PerformanceSpec:
    """Speed and memory switches that do not change the math of a run."""

    compile: bool = False
    """Compile the model with torch.compile (in place: parameter names and checkpoints are unchanged).
    The compile time is reported separately (summary `compile_seconds`) and not counted in throughput."""
    compile_mode: str = "default"
    """torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune or max-autotune-no-cudagraphs."""
    activation_checkpointing: str = "none"
    """Recompute activations in backward instead of keeping them: none; blocks (each transformer block /
    conv stage of a built-in model, each entry of the outermost ModuleLists of a custom model); or
    modules (the modules matching `performance.checkpoint_modules`)."""
    checkpoint_modules: List[str] = field(default_factory=list)
    """Shell-style patterns matched against module names (`blocks.*`, `encoder.layers.*`) or class names
    (`TransformerEncoderLayer`), for activation_checkpointing=modules."""
    channels_last: bool = False
    """Channels-last memory format for the model and its image inputs (conv models; faster on GPUs with
    tensor cores and on many CPUs)."""
    peak_tflops: Optional[float] = None
    """Peak TFLOP/s of one device, for the model FLOPs utilisation (`train/mfu`). Null: known CUDA GPUs
    only. Setting it also turns MFU on for other devices."""

    def validate(self, key: str = "performance") -> None:
        check_choice(self.compile_mode, COMPILE_MODES, f"{key}.compile_mode")
        check_choice(self.activation_checkpointing, CHECKPOINTING, f"{key}.activation_checkpointing")
        check(self.activation_checkpointing != "modules" or bool(self.checkpoint_modules),
              f"{key}.checkpoint_modules", "activation_checkpointing=modules needs at least one pattern",
              f"set {key}.checkpoint_modules=[blocks.*] (module names or class names)")
        check(self.peak_tflops is None or self.peak_tflops > 0, f"{key}.peak_tflops", "must be > 0 or null",
              f"set {key}.peak_tflops=null")


# --- changing the model -----------------------------------------------------------------------------

def checkpointed_modules(model: "nn.Module", spec: PerformanceSpec, builtin: bool) -> List["nn.Module"]:
    """The outermost modules whose activations are recomputed in backward."""
    if spec.activation_checkpointing == "none":
        return []
    if spec.activation_checkpointing == "blocks":
        return blocks_of(model, builtin, "performance.activation_checkpointing",
                         "set performance.activation_checkpointing=modules and performance.checkpoint_modules=[PATTERN]")
    return matching_modules(model, spec.checkpoint_modules, "performance.checkpoint_modules")


def blocks_of(model: "nn.Module", builtin: bool, key: str, fix: str) -> List["nn.Module"]:
    """A built-in model's blocks (GPT blocks, CNN stages, MLP layers), or the entries of a custom
    model's outermost ModuleLists."""
    from torch import nn

    if builtin:
        return list(model.blocks)  # type: ignore[arg-type]
    chosen = [m for lst in _outermost(model, lambda name, m: isinstance(m, nn.ModuleList)) for m in lst]
    if not chosen:
        raise ConfigError(key, "blocks are the entries of the model's ModuleLists, and this model has none", fix)
    return chosen


def matching_modules(model: "nn.Module", patterns: List[str], key: str) -> List["nn.Module"]:
    """The outermost modules whose name or class name matches one of the shell-style ``patterns``."""
    def matches(name: str, module: Any) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(type(module).__name__, p) for p in patterns)
    chosen = _outermost(model, matches)
    if not chosen:
        names = [n for n, _ in model.named_modules() if n][:6]
        raise ConfigError(key, f"{patterns} matches no module of the model (names look like: {', '.join(names)})",
                          "fix the patterns (shell-style names such as 'blocks.*', or class names)")
    return chosen


def _outermost(model: "nn.Module", pick: Callable[[str, Any], bool]) -> List["nn.Module"]:
    found: List[Any] = []

    def visit(prefix: str, module: Any) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if pick(path, child):
                found.append(child)
            else:
                visit(f"{path}.", child)
    visit("", model)
    return found


def apply_activation_checkpointing(model: "nn.Module", spec: PerformanceSpec, builtin: bool) -> int:
    """Wrap the chosen modules so their activations are recomputed in backward; returns how many.

    Uses torch's checkpoint wrapper (non-reentrant, RNG state preserved so dropout masks repeat), the
    one FSDP composes with. State dicts keep the unwrapped names.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as wrap,
        checkpoint_wrapper,
    )

    chosen = checkpointed_modules(model, spec, builtin)
    if chosen:
        ids = {id(m) for m in chosen}
        wrap(model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: id(m) in ids)
    return len(chosen)


def clean_name(name: str) -> str:
    """A parameter name without the activation-checkpointing wrapper's part."""
    return name.replace(WRAPPED, "")


def apply_channels_last(model: "nn.Module") -> None:
    import torch

    model.to(memory_format=torch.channels_last)


def compile_model(model: "nn.Module", spec: PerformanceSpec) -> None:
    """torch.compile the model in place (Module.compile keeps parameter names, unlike torch.compile(m))."""
    model.compile(mode=None if spec.compile_mode == "default" else spec.compile_mode)


class CompileClock:
    """Seconds spent compiling (dynamo tracing, inductor codegen, lazy backward compiles), measured from
    torch's compile-start/compile-end callbacks so they can be kept out of training throughput."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._taken = 0.0
        self._since: Optional[float] = None
        self._handler: Any = None

    def start(self) -> "CompileClock":
        from torch._dynamo.callback import callback_handler

        self._handler = callback_handler
        callback_handler.register_start_callback(self._on_start)
        callback_handler.register_end_callback(self._on_end)
        return self

    def _on_start(self, *args: Any) -> None:
        self._since = time.perf_counter()

    def _on_end(self, *args: Any) -> None:
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None

    def take(self) -> float:
        """Compile seconds since the previous call."""
        new, self._taken = self.seconds - self._taken, self.seconds
        return new

    def close(self) -> None:
        if self._handler is not None:
            self._handler.remove_start_callback(self._on_start)
            self._handler.remove_end_callback(self._on_end)
            self._handler = None


# --- measurements -------------------------------------------------------------------------------------

def peak_tflops(device: "torch.device", spec: PerformanceSpec) -> Optional[float]:
    """The device's peak TFLOP/s for MFU, or None when unknown."""
    if spec.peak_tflops is not None:
        return spec.peak_tflops
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    log.info("MFU is not reported: the peak TFLOP/s of '%s' is not known to trainctl "
             "(set performance.peak_tflops)", name)
    return None


def flops_per_sample(model: "nn.Module", loss: Callable[[Any, Any], Any], batch: Any) -> Optional[float]:
    """Forward + backward FLOPs of one training sample, counted once with torch.utils.flop_counter on
    meta copies of the parameters and of ``batch``: nothing is computed, no state or RNG changes.
    Activation recomputation is not counted (MFU counts model FLOPs)."""
    import torch
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    x, y = batch
    state = {name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
             for name, t in [*model.named_parameters(), *model.named_buffers()]}
    try:
        with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
            out = functional_call(model, state, (x.to("meta"),), tie_weights=True)
            loss(out.float(), y.to("meta")).backward()
    except Exception as exc:  # a custom model whose ops have no meta kernels
        log.warning("could not count the model's FLOPs, so MFU is not reported: %s", exc)
        return None
    return counter.get_total_flops() / len(x)


def peak_memory_mib(device: "torch.device") -> Optional[float]:
    """Peak memory of this process so far: CUDA max allocated on a GPU, peak resident set size otherwise."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


_IMPORTED_AT = time.time()


def seconds_since_process_start() -> float:
    """Wall seconds since this process started (Linux: from /proc; elsewhere: since trainctl was imported)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            return float(uptime.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED_AT
