"""Callbacks: small objects the runner calls at fixed points. They read the run state and results and
answer by setting flags on the state (``state.request_stop``); they never drive the loop themselves.
Everything a callback needs after a restart is in its ``state_dict()``, saved in each checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional

from trainctl.errors import check, check_choice
from trainctl.metrics import is_better

if TYPE_CHECKING:
    from torch import nn

    from trainctl.state import RunState

log = logging.getLogger("trainctl")


class Callback:
    name = "callback"

    def on_eval(self, state: "RunState", metrics: Dict[str, float], model: "nn.Module") -> None:
        """After each evaluation."""

    def on_fit_end(self, state: "RunState", model: "nn.Module") -> None:
        """Once, after the last step and its checkpoint, before the final weights are written."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


@dataclass
class EarlyStoppingSpec:
    """Stop when the monitored validation metric has not improved for `patience` evaluations."""

    patience: Optional[int] = None
    """Evaluations without improvement before stopping; null disables early stopping."""
    monitor: str = "auto"
    """Validation metric to watch (auto: trainer.monitor)."""
    mode: str = "auto"
    """min or max (auto: from the metric, as for trainer.mode)."""
    min_delta: float = 0.0
    """An improvement must beat the best value by more than this."""
    restore_best_weights: bool = False
    """When training ends, put the best evaluated weights back before `model.safetensors` is written
    (the `last` checkpoint still holds the final state, so a resume continues from there)."""

    def validate(self, key: str = "early_stopping") -> None:
        check(self.patience is None or self.patience >= 1, f"{key}.patience",
              f"must be >= 1 or null (got {self.patience})", f"set {key}.patience=5")
        check(self.min_delta >= 0, f"{key}.min_delta", f"must be >= 0 (got {self.min_delta})",
              f"set {key}.min_delta=0")
        check_choice(self.mode, ("auto", "min", "max"), f"{key}.mode")

    @property
    def enabled(self) -> bool:
        return self.patience is not None


class EarlyStopping(Callback):
    name = "early_stopping"

    def __init__(self, monitor: str, mode: str, patience: int, min_delta: float = 0.0,
                 restore_best_weights: bool = False) -> None:
        self.monitor, self.mode = monitor, mode
        self.patience, self.min_delta = patience, min_delta
        self.restore_best_weights = restore_best_weights
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.wait = 0
        self.stopped_step: Optional[int] = None
        self.best_weights: Optional[Dict[str, Any]] = None

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return is_better(value, None, self.mode)
        shifted = self.best + self.min_delta if self.mode == "max" else self.best - self.min_delta
        return is_better(value, shifted, self.mode)

    def on_eval(self, state: "RunState", metrics: Dict[str, float], model: "nn.Module") -> None:
        value = metrics.get(self.monitor)
        if value is None:
            return
        if self._improves(value):
            self.best, self.best_step, self.wait = value, state.step, 0
            if self.restore_best_weights:
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_step = state.step
            log.info("early stopping at step %d: %s has not improved on %.6g (step %s) for %d evaluations",
                     state.step, self.monitor, self.best, self.best_step, self.wait)
            state.request_stop("early_stopped")

    def on_fit_end(self, state: "RunState", model: "nn.Module") -> None:
        if self.restore_best_weights and self.best_weights is not None and state.stop_reason in (
                "completed", "early_stopped"):
            model.load_state_dict(self.best_weights)
            log.info("restored the weights of step %s (%s %.6g)", self.best_step, self.monitor, self.best)

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "wait": self.wait,
                "stopped_step": self.stopped_step, "best_weights": self.best_weights}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best, self.best_step, self.wait = state["best"], state["best_step"], state["wait"]
        self.stopped_step = state.get("stopped_step")
        self.best_weights = state.get("best_weights")
