"""What "best" means: one tracker per monitored validation metric, shared by everything that asks.

The run's summary (`trainer.monitor`), the `best` checkpoint (`checkpoint.monitor`) and early stopping
(`early_stopping.monitor`, with its `min_delta`) each hold a :class:`Monitor`; when they watch the same
metric the same way they hold the same one. The runner updates every distinct monitor once per
evaluation; each component then reads `improved`. Torch-free.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple


def is_better(value: float, best: Optional[float], mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if mode == "max" else value < best


class Monitor:
    """The best value of one metric so far and the step it came from; a value improves on it when it
    beats it by more than ``min_delta``."""

    def __init__(self, metric: str, mode: str, min_delta: float = 0.0) -> None:
        self.metric, self.mode, self.min_delta = metric, mode, min_delta
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.improved = False
        """Whether the last update set a new best."""

    def improves(self, value: float) -> bool:
        if self.best is None:
            return is_better(value, None, self.mode)
        shifted = self.best + self.min_delta if self.mode == "max" else self.best - self.min_delta
        return is_better(value, shifted, self.mode)

    def update(self, metrics: Dict[str, float], step: int) -> bool:
        value = metrics.get(self.metric)
        self.improved = value is not None and self.improves(value)
        if self.improved:
            self.best, self.best_step = value, step
        return self.improved

    def state_dict(self) -> Dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("metric") == self.metric and state.get("mode", self.mode) == self.mode:
            self.best, self.best_step = state.get("best"), state.get("best_step")


class Monitors:
    """The run's monitors, one per (metric, mode, min_delta)."""

    def __init__(self) -> None:
        self._all: Dict[Tuple[str, str, float], Monitor] = {}

    def get(self, metric: str, mode: str, min_delta: float = 0.0) -> Monitor:
        key = (metric, mode, float(min_delta))
        if key not in self._all:
            self._all[key] = Monitor(metric, mode, min_delta)
        return self._all[key]

    def update(self, metrics: Dict[str, float], step: int) -> None:
        for monitor in self._all.values():
            monitor.update(metrics, step)

    def state_dict(self) -> Dict[str, Any]:
        return {f"{m}|{mode}|{delta!r}": monitor.state_dict() for (m, mode, delta), monitor in self._all.items()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for (metric, mode, delta), monitor in self._all.items():
            saved = state.get(f"{metric}|{mode}|{delta!r}")
            if isinstance(saved, dict):
                monitor.load_state_dict(saved)
