"""Checkpoints, decided in one place: :class:`Checkpoints` knows when a step ends with a checkpoint
(cadence, `best`, the end of the run or a signal), writes it through a backend (whole files written by
rank 0, or every rank's shard under FSDP), applies `checkpoint.on_error` when a save fails, and writes
the run's final weights. :func:`snapshot` and :func:`restore` say what a checkpoint holds besides the
weights and put it back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from trainctl import __version__
from trainctl.checkpoint import CheckpointSpec, CheckpointStore, rng_state, set_rng_state
from trainctl.files import CheckpointError, failure_text, save_weights

if TYPE_CHECKING:
    from torch import nn

    from trainctl.build import Run
    from trainctl.monitor import Monitor
    from trainctl.parallel import Distributed
    from trainctl.state import RunState

log = logging.getLogger("trainctl")
progress_log = logging.getLogger("trainctl.progress")

NO_CHECKPOINT = ("diverged", "failed", "checkpoint_failed")
"""Stop reasons after which no checkpoint is written: the state is not one to continue from."""


class WholeFiles:
    """Rank 0 writes the whole model and state; the other ranks learn how it went."""

    def __init__(self, store: CheckpointStore, model: "nn.Module", dist: Optional["Distributed"]) -> None:
        self.store, self.model, self.dist = store, model, dist

    def save(self, step: int, snapshot: Dict[str, Any], spec_yaml: str, meta: Dict[str, Any],
             best: bool) -> Tuple[Optional[str], Optional[str]]:
        outcome: Tuple[Optional[str], Optional[str]] = (None, None)  # (path, error)
        if self.dist is None or self.dist.is_main:
            try:
                outcome = (str(self.store.save(step, self.model, snapshot, spec_yaml, meta, best)), None)
            except CheckpointError as exc:
                outcome = (None, str(exc))
        return self.dist.broadcast(outcome) if self.dist is not None else outcome

    def export(self, path: Path, metadata: Dict[str, str], together: bool) -> None:
        if self.dist is None or self.dist.is_main:
            save_weights(self.model, path, metadata)


class Shards:
    """Under FSDP every rank writes its shard of the model and optimizer state (see :mod:`trainctl.sharding`)."""

    def __init__(self, store: CheckpointStore, model: "nn.Module", optimizer: Any, dist: "Distributed") -> None:
        self.store, self.model, self.optimizer, self.dist = store, model, optimizer, dist

    def save(self, step: int, snapshot: Dict[str, Any], spec_yaml: str, meta: Dict[str, Any],
             best: bool) -> Tuple[Optional[str], Optional[str]]:
        from trainctl.sharding import save_checkpoint

        return save_checkpoint(self.store, self.dist, self.model, self.optimizer, step, snapshot, spec_yaml,
                               meta, best)

    def export(self, path: Path, metadata: Dict[str, str], together: bool) -> None:
        if together:  # gathering the full weights needs every rank here, not on the way out of an exception
            from trainctl.sharding import export_weights

            export_weights(self.model, path, metadata, self.dist.is_main)


class Checkpoints:
    """When to save, saving, the error policy, and the final weights (written also when `checkpoint=off`
    saves no checkpoints)."""

    def __init__(self, spec: CheckpointSpec, store: CheckpointStore, monitor: "Monitor", backend: Any,
                 spec_yaml: Any) -> None:
        self.spec, self.store, self.monitor, self.backend = spec, store, monitor, backend
        self._spec_yaml = spec_yaml
        """The resolved spec as YAML, or a function that renders it (~50 ms: once, at the first save)."""
        self.last: Optional[str] = None
        """The last checkpoint this run saved or resumed from."""
        self.error: Optional[str] = None
        """Why the last save failed (None once one succeeds)."""
        self._best_due = False

    def evaluated(self) -> None:
        """An evaluation updated the monitor: a new best is saved at this step's boundary."""
        self._best_due = self.spec.save_best and self.monitor.improved

    def due(self, state: "RunState", epoch_end: bool, last: bool) -> Optional[bool]:
        """Whether this step boundary ends with a checkpoint: None if not, else whether it is the new best."""
        best, self._best_due = self._best_due, False
        if not self.spec.enabled or state.stop_reason in NO_CHECKPOINT:
            return None
        spec = self.spec
        final = (last or state.should_stop) and spec.save_last
        periodic = bool((spec.every_n_steps and state.step % spec.every_n_steps == 0)
                        or (epoch_end and spec.every_n_epochs and state.epoch % spec.every_n_epochs == 0))
        return best if (final or best or periodic) else None

    def save(self, state: "RunState", snapshot: Dict[str, Any], world_size: int, metric: Optional[float],
             best: bool) -> Optional[str]:
        """Save a checkpoint of ``state``. Returns the stop reason a failed save calls for (None: go on)."""
        import torch

        if callable(self._spec_yaml):
            self._spec_yaml = self._spec_yaml()
        meta = {"trainctl_version": __version__, "torch_version": torch.__version__, "world_size": world_size,
                "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, "samples_seen": state.samples_seen,
                "monitor": self.monitor.metric, "metric": metric}
        path, error = self.backend.save(state.step, snapshot, self._spec_yaml, meta, best)
        if error is None:
            self.last, self.error = str(path), None
            progress_log.info("checkpoint saved: %s%s", path, " (best)" if best else "")
            return None
        self.error = error
        if self.spec.on_error == "continue":
            log.error("%s; the previous checkpoint stays valid; training continues (checkpoint.on_error=continue)",
                      error)
            return None
        log.error("%s; the previous checkpoint (%s) stays valid; the run stops (set checkpoint.on_error=continue "
                  "to train on)", error, self.last or "none")
        return "checkpoint_failed"

    def write_weights(self, path: Path, step: int, together: bool) -> Optional[str]:
        """The run's final `model.safetensors`. Returns why it could not be written (None: written)."""
        try:
            self.backend.export(path, {"trainctl_version": __version__, "step": str(step)}, together)
        except Exception as exc:  # a full disk (safetensors has its own error type), permissions, ...
            self.error = f"could not write {path}: {failure_text(exc, path.parent)}"
            log.error("%s%s", self.error, f"; the last checkpoint ({self.last}) holds the state" if self.last else "")
            return self.error
        return None

    def state_dict(self) -> Dict[str, Any]:
        return {"monitor": self.monitor.metric, "best": self.monitor.best, "best_step": self.monitor.best_step}


def backend_for(store: CheckpointStore, model: "nn.Module", optimizer: Any, dist: Optional["Distributed"]) -> Any:
    if dist is not None and dist.sharded:
        return Shards(store, model, optimizer, dist)
    return WholeFiles(store, model, dist)


# --- what a checkpoint holds besides the weights --------------------------------------------------------

def snapshot(run: "Run", state: "RunState") -> Dict[str, Any]:
    """Everything besides the weights that a resumed run needs to continue exactly. Under DDP/FSDP a
    collective: every rank's RNG state is gathered (each rank draws its own dropout masks)."""
    saved = {
        "run": {**state.state_dict(), "monitors": run.monitors.state_dict()},
        "scheduler": run.scheduler.state_dict(), "precision": run.precision.state_dict(),
        "checkpointer": run.checkpoints.state_dict() if run.checkpoints is not None and run.checkpoints.spec.enabled
        else {},
        "callbacks": {c.name: c.state_dict() for c in run.callbacks},
        "meter": run.meter.state_dict(), "rng": rng_state() if run.dist is None else run.dist.gather(rng_state()),
    }
    if not run.sharded:  # FSDP's optimizer state is sharded, beside the weights
        saved["optimizer"] = run.optimizer.state_dict()
    return saved


def restore(run: "Run", state: "RunState", saved: Dict[str, Any], new_settings: bool = False,
            fresh: Optional[List[Dict[str, Any]]] = None) -> None:
    """Put a checkpoint's state back (the weights are loaded before this; under FSDP the optimizer state
    too, and ``fresh`` holds the optimizer settings from before that load). ``new_settings``: the
    optimizer settings changed since the save; apply the new ones."""
    from trainctl.optim import load_optimizer_state

    state.load_state_dict(saved["run"])
    run.monitors.load_state_dict(saved["run"].get("monitors", {}))
    load_optimizer_state(run.optimizer, run.scheduler, saved.get("optimizer"), saved["scheduler"], new_settings, fresh)
    run.precision.load_state_dict(saved["precision"])
    for callback in run.callbacks:
        if callback.name in saved["callbacks"]:
            callback.load_state_dict(saved["callbacks"][callback.name])
    run.meter.load_state_dict(saved["meter"])
    rng = saved["rng"]
    if isinstance(rng, list):  # saved by a DDP run (resume checked the world size): one state per rank
        rng = rng[run.dist.rank if run.dist is not None else 0]
    set_rng_state(rng)
