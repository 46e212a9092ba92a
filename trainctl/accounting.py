"""Where a session's time goes, and the run's summary.

The :class:`Clock` splits wall time into training, evaluation, checkpointing and compilation, and keeps
everything but training out of the throughput readings. :func:`summary` turns a run's state and
readings into `summary.json`: status, stop reason, best and final metrics, time and throughput,
memory, versions.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional

from trainctl import __version__
from trainctl.metrics import speed
from trainctl.performance import peak_memory_mib, seconds_since_process_start

if TYPE_CHECKING:
    from trainctl.build import Run
    from trainctl.state import RunState

DONE = ("completed", "early_stopped")


class Clock:
    """Seconds of this session spent evaluating, checkpointing and compiling (reported on their own and
    left out of throughput), the rest being training time, plus the time to the first optimizer step."""

    def __init__(self, run: "Run") -> None:
        self.meter = run.meter
        self.compile_clock = run.compile_clock
        self.started = time.perf_counter()
        self.before = 0.0
        """Training seconds of the sessions before this one (a resumed run)."""
        self.eval_seconds = self.checkpoint_seconds = self.compile_seconds = self.setup_seconds = 0.0
        self.first_step_seconds: Optional[float] = None
        """Seconds from process start to the end of this session's first optimizer step."""

    def start(self, train_seconds_before: float) -> None:
        self.started, self.before = time.perf_counter(), train_seconds_before

    def step_done(self) -> None:
        if self.first_step_seconds is None:
            self.first_step_seconds = seconds_since_process_start()

    def exclude_setup(self, seconds: float) -> None:
        """Time spent setting something up during the run (TensorBoard's import): not training time."""
        self.setup_seconds += seconds
        self.meter.exclude(seconds)

    def take_compile(self) -> float:
        """Move the compile seconds since the last call out of training time."""
        if self.compile_clock is None:
            return 0.0
        seconds = self.compile_clock.take()
        self.compile_seconds += seconds
        self.meter.exclude(seconds)
        return seconds

    @contextmanager
    def timing(self, kind: str) -> Iterator[None]:
        """Count the block as ``kind`` ("eval" or "checkpoint") time; compiling an evaluation graph counts
        as compile time."""
        self.take_compile()
        tic = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - tic
            self.meter.exclude(seconds)
            if kind == "eval":
                if self.compile_clock is not None:
                    compiled = self.compile_clock.take()
                    self.compile_seconds += compiled
                    seconds -= compiled
                self.eval_seconds += seconds
            else:
                self.checkpoint_seconds += seconds

    def train_seconds(self) -> float:
        """Training seconds over every session of the run."""
        self.take_compile()
        session = (time.perf_counter() - self.started - self.eval_seconds - self.checkpoint_seconds
                   - self.compile_seconds - self.setup_seconds)
        return self.before + max(0.0, session)


def summary(run: "Run", state: "RunState", clock: Clock, final: Dict[str, float], session_samples: int,
            session_steps: int, notes: Dict[str, Any]) -> Dict[str, Any]:
    """`summary.json` of a run at this point. ``notes``: the session's signal number and the errors to
    report (`checkpoint_error`, `error`, `logging_error`)."""
    import torch

    wall = time.perf_counter() - clock.started
    train_total = clock.train_seconds()
    reason = state.stop_reason or "completed"
    status = "done" if reason in DONE else reason if reason in ("interrupted", "pruned") else "failed"
    out = {
        "status": status, "stop_reason": reason, "monitor": run.monitor.metric, "mode": run.monitor.mode,
        "best_metric": run.monitor.best, "best_step": run.monitor.best_step,
        "final": {k: v for k, v in final.items() if k.startswith(("val/", "train/loss"))},
        "steps": state.step, "epochs_completed": state.epoch, "samples_seen": state.samples_seen,
        "world_size": run.world_size,
        "wall_seconds": round(wall, 3), "train_seconds": round(train_total, 3),
        "eval_seconds": round(clock.eval_seconds, 3), "checkpoint_seconds": round(clock.checkpoint_seconds, 3),
        "setup_seconds": round(clock.setup_seconds, 3),
        **_throughput(run, clock, max(train_total - clock.before, 1e-9), session_samples, session_steps),
        "skipped_steps": state.skipped_steps, "amp_skipped_steps": run.precision.overflow_skips,
        "training_state_mib": _training_state(run),
        "last_checkpoint": run.checkpoints.last if run.checkpoints is not None else None,
        "run_dir": str(run.run_dir) if run.run_dir else None,
        "trainctl_version": __version__, "torch_version": torch.__version__,
    }
    if notes.get("signal") is not None:
        out["signal"], out["signal_number"] = signal.Signals(notes["signal"]).name, int(notes["signal"])
    for key in ("checkpoint_error", "logging_error", "error"):
        if notes.get(key):
            out[key] = notes[key]
    return out


def _training_state(run: "Run") -> Optional[Dict[str, float]]:
    """Parameters, gradients and optimizer state held by this process (rank 0's under DDP/FSDP)."""
    from trainctl.sharding import state_mib

    try:
        return state_mib(run.model, run.optimizer)
    except (RuntimeError, AttributeError):  # an optimizer keeping its state in another form
        return None


def _throughput(run: "Run", clock: Clock, seconds: float, samples: int, steps: int) -> Dict[str, Any]:
    """This session's speed and memory figures."""
    tokens = samples * run.data.info.input_shape[0] if run.data.info.task == "lm" else None  # seq_len per sample
    values: Dict[str, Any] = speed(seconds, samples, steps, run.meter.session_data_seconds, tokens,
                                   peak_memory_mib(run.device), run.flops_per_sample, run.peak_tflops)
    values["data_wait_share"] = values.pop("data_wait")
    if run.compile_clock is not None:
        values["compile_seconds"] = round(run.compile_clock.seconds, 3)
    values["time_to_first_step_seconds"] = clock.first_step_seconds
    values["activation_checkpointed_modules"] = run.checkpointed_modules
    return values
