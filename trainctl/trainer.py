"""The `trainer` config group: how long a run trains, how often it evaluates, on which device, what
"best" means, and what a non-finite step does. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainctl.errors import check, check_choice

DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class TrainerSpec:
    """How long to train, how often to evaluate, and where."""

    max_epochs: Optional[int] = 30
    """Passes over the training set; null trains until `trainer.max_steps`."""
    max_steps: Optional[int] = None
    """Optimizer steps; stops at whichever of max_epochs / max_steps comes first."""
    seed: int = 0
    """Seed of python, numpy and torch (model initialisation, dropout)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step (effective batch = batch_size x this)."""
    eval_every_n_epochs: Optional[int] = 1
    """Evaluate on the validation split every N epochs; null disables."""
    eval_every_n_steps: Optional[int] = None
    """Also evaluate every N optimizer steps; null disables."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps."""
    monitor: str = "auto"
    """Validation metric that defines the best result (auto: val/acc for classification, val/loss otherwise)."""
    mode: str = "auto"
    """min or max for `trainer.monitor` (auto: max for accuracy/F1, min for losses and errors)."""
    on_nonfinite: str = "stop"
    """A non-finite loss or gradient norm: stop (end the run as diverged; no checkpoint is written from
    that state) or skip (drop that optimizer step; costs one host sync per step)."""
    max_consecutive_skips: int = 10
    """With on_nonfinite=skip: stop as diverged after this many skipped steps in a row."""

    def validate(self, key: str = "trainer") -> None:
        check(self.max_epochs is not None or self.max_steps is not None, f"{key}.max_epochs",
              "max_epochs and max_steps are both null, so the run would never end", f"set {key}.max_epochs=30")
        check(self.max_epochs is None or self.max_epochs >= 1, f"{key}.max_epochs",
              f"must be >= 1 (got {self.max_epochs})", f"set {key}.max_epochs=30")
        check(self.max_steps is None or self.max_steps >= 1, f"{key}.max_steps",
              f"must be >= 1 or null (got {self.max_steps})", f"set {key}.max_steps=null")
        check(self.grad_accum_steps >= 1, f"{key}.grad_accum_steps",
              f"must be >= 1 (got {self.grad_accum_steps})", f"set {key}.grad_accum_steps=1")
        for name in ("eval_every_n_epochs", "eval_every_n_steps"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{key}.{name}", "must be >= 1 or null", f"set {key}.{name}=null")
        check(self.device.split(":")[0] in DEVICES, f"{key}.device",
              f"'{self.device}' is not one of {', '.join(DEVICES)} (or cuda:N)", f"set {key}.device=auto")
        check_choice(self.mode, ("auto", "min", "max"), f"{key}.mode")
        check_choice(self.on_nonfinite, ("stop", "skip"), f"{key}.on_nonfinite")
        check(self.max_consecutive_skips >= 1, f"{key}.max_consecutive_skips", "must be >= 1",
              f"set {key}.max_consecutive_skips=10")


