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
    eval_pending: bool = False
    """An evaluation was due when the run was interrupted; a resumed run does it first."""
    train_seconds: float = 0.0
    """Training time over every session of the run (evaluation and checkpointing excluded)."""
    skipped_steps: int = 0
    """Optimizer steps skipped for a non-finite loss or gradient (trainer.on_nonfinite=skip)."""
    consecutive_skips: int = 0
    should_stop: bool = False
    stop_reason: Optional[str] = None
    """Once the run ends: completed, early_stopped, interrupted, diverged, checkpoint_failed or failed."""

    def state_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the counters; the stop flag of the saved session is not carried over."""
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)
        self.should_stop, self.stop_reason = False, None

    def request_stop(self, reason: str) -> None:
        if not self.should_stop:
            self.should_stop = True
            self.stop_reason = reason
