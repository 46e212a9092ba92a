"""The `averaging` options' specs (torch-free) and the combinations with other groups they refuse; the
averages themselves are in :mod:`trainctl.averaging`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from trainctl.errors import ConfigError, check, check_choice
from trainctl.optim import has_train_eval_modes


@dataclass
class AveragingSpec:
    """No weight averaging (the `none` option; the base of the others)."""

    name: str = "none"
    """none, ema or swa; the option picked with `averaging=NAME`."""

    def validate(self, key: str = "averaging") -> None:
        pass

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    @property
    def evaluates_average(self) -> bool:
        return bool(getattr(self, "use_for_eval", False))


@dataclass
class EMASpec(AveragingSpec):
    """Exponential moving average of the weights."""

    name: str = "ema"
    decay: float = 0.999
    """Weight of the old average at each update (0 < decay < 1)."""
    half_life_steps: Optional[float] = None
    """Half-life in optimizer steps instead of `decay`: decay = 0.5 ** (every_n_steps / half_life_steps)."""
    warmup: bool = True
    """Start with a short memory: the k-th update uses min(decay, (1 + k) / (10 + k))."""
    every_n_steps: int = 1
    """Update the average every N optimizer steps."""
    buffers: str = "average"
    """Float buffers (batch-norm statistics): average (like the weights) or copy (the model's current ones)."""
    use_for_eval: bool = True
    """Evaluate, pick `best` on, save and export the averaged weights."""

    def validate(self, key: str = "averaging") -> None:
        check(0.0 < self.decay < 1.0, f"{key}.decay", f"must be in (0, 1) (got {self.decay})",
              f"set {key}.decay=0.999")
        check(self.half_life_steps is None or self.half_life_steps > 0, f"{key}.half_life_steps",
              "must be > 0 or null", f"set {key}.half_life_steps=null")
        check(self.every_n_steps >= 1, f"{key}.every_n_steps", f"must be >= 1 (got {self.every_n_steps})",
              f"set {key}.every_n_steps=1")
        check_choice(self.buffers, ("average", "copy"), f"{key}.buffers")

    @property
    def base_decay(self) -> float:
        if self.half_life_steps is not None:
            return 0.5 ** (self.every_n_steps / self.half_life_steps)
        return self.decay

    def decay_at(self, k: int) -> float:
        """The decay of the k-th update after the first (the first copies the weights)."""
        decay = self.base_decay
        return min(decay, (1 + k) / (10 + k)) if self.warmup else decay


@dataclass
class SWASpec(AveragingSpec):
    """Stochastic weight averaging with torch's SWALR schedule."""

    name: str = "swa"
    start_epoch: Optional[int] = None
    """Epoch (counted from 0) from which SWALR sets the learning rate; the weights at its end and at the
    end of every later epoch are averaged. null: from `start_fraction`."""
    start_fraction: float = 0.75
    """The start as a share of the run's epochs: start_epoch = int(start_fraction x epochs)."""
    swa_lr: Optional[float] = None
    """Learning rate SWALR anneals to (each parameter group keeps its lr_multipliers factor); null: the
    optimizer's peak lr."""
    anneal_epochs: int = 1
    """Epochs over which the lr moves from the schedule's value at the start to swa_lr (0: at once)."""
    anneal_strategy: str = "cos"
    """cos or linear."""
    use_for_eval: bool = True
    """Evaluate, pick `best` on, save and export the averaged weights (once the first snapshot is taken)."""

    def validate(self, key: str = "averaging") -> None:
        check(self.start_epoch is None or self.start_epoch >= 0, f"{key}.start_epoch", "must be >= 0 or null",
              f"set {key}.start_epoch=null")
        check(0.0 <= self.start_fraction < 1.0, f"{key}.start_fraction",
              f"must be in [0, 1) (got {self.start_fraction})", f"set {key}.start_fraction=0.75")
        check(self.swa_lr is None or self.swa_lr > 0, f"{key}.swa_lr", "must be > 0 or null",
              f"set {key}.swa_lr=null")
        check(self.anneal_epochs >= 0, f"{key}.anneal_epochs", "must be >= 0", f"set {key}.anneal_epochs=1")
        check_choice(self.anneal_strategy, ("cos", "linear"), f"{key}.anneal_strategy")

    def start(self, total_epochs: int) -> int:
        return self.start_epoch if self.start_epoch is not None else int(self.start_fraction * total_epochs)


def averaging_problem(spec: Any) -> Optional[ConfigError]:
    """Combinations with other groups that cannot work (None: fine). ``spec`` is the RunSpec."""
    avg = spec.averaging
    if not avg.enabled:
        return None
    if spec.parallelism.sharded:
        return ConfigError("averaging", f"averaging={avg.name} is not available with parallelism=fsdp: the "
                           "weights are sharded across the processes", "use parallelism=ddp, or averaging=none")
    if spec.peft.name == "qlora":
        return ConfigError("averaging", "peft=qlora keeps its base in 4 bits, which cannot be copied into an "
                           "average", "use peft=lora, or averaging=none")
    if getattr(spec.peft, "unfreeze_at", None):
        return ConfigError("averaging", "the average covers the parameters that train from the start; "
                           "peft.unfreeze_at adds some later", "drop peft.unfreeze_at, or set averaging=none")
    if has_train_eval_modes(spec.optimizer):
        return ConfigError("averaging", f"optimizer={spec.optimizer.name} averages its weights itself (its "
                           "evaluation weights are not the trained ones)", "use optimizer=adamw, or averaging=none")
    epochs = spec.trainer.max_epochs if spec.trainer.max_steps is None else None
    if isinstance(avg, SWASpec) and avg.start_epoch is not None and epochs is not None:
        check(avg.start_epoch < epochs, "averaging.start_epoch", f"SWA would start in epoch {avg.start_epoch} "
              f"(counted from 0) of a run of {epochs} epoch(s): no snapshot would be taken",
              f"set averaging.start_epoch={epochs - 1} or less, or trainer.max_epochs={avg.start_epoch + 2}")
    if avg.evaluates_average and spec.early_stopping.restore_best_weights:
        return ConfigError("early_stopping.restore_best_weights", "the final weights are the averaged ones "
                           "(averaging.use_for_eval=true)", "set early_stopping.restore_best_weights=false and "
                           "evaluate checkpoints/best, which holds the best averaged weights")
    return None
