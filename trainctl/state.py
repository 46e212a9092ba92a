"""RunState: the counters and flags of a run in progress; everything a restart needs besides the
model, optimizer and scheduler states."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional


@dataclass
class RunState:
    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Current epoch (0-based)."""
    batch_in_epoch: int = 0
    """Training batches of the current epoch already consumed (the data position)."""
    samples_seen: int = 0
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    last_eval_step: Optional[int] = None
    should_stop: bool = False
    stop_reason: Optional[str] = None
    """completed, interrupted, diverged or failed once the run ends."""

    def state_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def request_stop(self, reason: str) -> None:
        if not self.should_stop:
            self.should_stop = True
            self.stop_reason = reason
