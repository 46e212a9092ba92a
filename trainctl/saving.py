"""The runner's checkpoint side: when a step ends with a checkpoint, what the state dict holds, how
a checkpoint's state is restored, and the run's final weights. Under DDP rank 0 writes and the others
learn the outcome; under FSDP every rank writes its shard (see :mod:`trainctl.sharding`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch

from trainctl import __version__
from trainctl.checkpoint import rng_state, set_rng_state
from trainctl.files import CheckpointError, save_weights
from trainctl.spec import spec_yaml

if TYPE_CHECKING:
    from pathlib import Path

    from trainctl.build import Run
    from trainctl.metrics import TrainMeter
    from trainctl.state import RunState

log = logging.getLogger("trainctl")
progress_log = logging.getLogger("trainctl.progress")

NO_CHECKPOINT = ("diverged", "failed", "checkpoint_failed")
"""Stop reasons after which no checkpoint is written: the state is not one to continue from."""


class Saving:
    """Mixed into :class:`trainctl.runner.Runner`."""

    run: "Run"
    state: "RunState"
    meter: "TrainMeter"
    final: Dict[str, float]
    last_checkpoint: Optional[str]
    checkpoint_error: Optional[str]
    checkpoint_seconds: float
    _improved: bool
    _spec_yaml: Optional[str]
    _diverged: Callable[[str], None]

    def _maybe_checkpoint(self, epoch_end: bool, last: bool) -> None:
        run, state = self.run, self.state
        improved, self._improved = self._improved, False
        checkpointer = run.checkpointer
        if checkpointer is None or state.stop_reason in NO_CHECKPOINT:
            return
        final = (last or state.should_stop) and checkpointer.spec.save_last
        if not (final or improved or checkpointer.periodic_due(state.step, state.epoch, epoch_end)):
            return
        if not self.meter.finite():  # never checkpoint a state reached through a non-finite step
            self._diverged("the training loss or gradient norm became non-finite")
            return
        self.save_checkpoint(best=improved)

    def save_checkpoint(self, best: bool = False) -> None:
        run, state = self.run, self.state
        assert run.checkpointer is not None
        tic = time.perf_counter()
        state.train_seconds = self._train_seconds()
        meta = {"trainctl_version": __version__, "torch_version": torch.__version__, "world_size": run.world_size,
                "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, "samples_seen": state.samples_seen,
                "monitor": run.checkpointer.monitor, "metric": self.final.get(run.checkpointer.monitor)}
        saved = self.state_dict()  # under DDP/FSDP a collective: it gathers every rank's RNG state
        if run.is_main:
            self._spec_yaml = self._spec_yaml or spec_yaml(run.spec)  # ~50 ms to render: once per run
        outcome: Tuple[Optional[str], Optional[str]] = (None, None)  # (path, error)
        if run.sharded:  # every rank writes its shard
            from trainctl.sharding import save_checkpoint

            assert run.dist is not None
            outcome = save_checkpoint(run.checkpointer, run.dist, run.model, run.optimizer, state.step, saved,
                                      self._spec_yaml, meta, best)
        else:  # rank 0 writes; the others learn how it went, so all stop or go on together
            if run.is_main:
                try:
                    outcome = (str(run.checkpointer.save(state.step, run.model, saved, self._spec_yaml or "", meta,
                                                         best)), None)
                except CheckpointError as exc:
                    outcome = (None, str(exc))
            if run.dist is not None:
                outcome = run.dist.broadcast(outcome)
        path, error = outcome
        if error is not None:
            self.checkpoint_error = error
            if run.spec.checkpoint.on_error == "continue":
                log.error("%s; the previous checkpoint stays valid; training continues "
                          "(checkpoint.on_error=continue)", error)
            else:
                log.error("%s; the previous checkpoint (%s) stays valid; the run stops "
                          "(set checkpoint.on_error=continue to train on)", error, self.last_checkpoint or "none")
                state.request_stop("checkpoint_failed")
        else:
            self.last_checkpoint = str(path)
            self.checkpoint_error = None
            progress_log.info("checkpoint saved: %s%s", path, " (best)" if best else "")
        seconds = time.perf_counter() - tic
        self.checkpoint_seconds += seconds
        self.meter.exclude(seconds)

    def state_dict(self) -> Dict[str, Any]:
        """Everything besides the weights that a resumed run needs to continue exactly."""
        run = self.run
        saved = {
            "run": self.state.state_dict(), "scheduler": run.scheduler.state_dict(),
            "precision": run.precision.state_dict(),
            "checkpointer": run.checkpointer.state_dict() if run.checkpointer else {},
            "callbacks": {c.name: c.state_dict() for c in run.callbacks},
            "meter": self.meter.state_dict(), "rng": self._rng_states(),
        }
        if not run.sharded:  # FSDP's optimizer state is sharded, beside the weights
            saved["optimizer"] = run.optimizer.state_dict()
        return saved

    def _rng_states(self) -> Any:
        """This process's RNG state; under DDP every rank's, as a list on rank 0 (each rank draws its own
        dropout masks, and a resumed rank continues its own stream)."""
        if self.run.dist is None:
            return rng_state()
        return self.run.dist.gather(rng_state())

    def load_state_dict(self, saved: Dict[str, Any], new_settings: bool = False,
                        fresh: Optional[List[Dict[str, Any]]] = None) -> None:
        """Restore a checkpoint's state (the weights are loaded separately, before this; under FSDP the
        optimizer state too, and ``fresh`` holds the optimizer settings from before that load).
        ``new_settings``: the optimizer settings changed since the save; apply the new ones."""
        from trainctl.optim import load_optimizer_state

        run = self.run
        self.state.load_state_dict(saved["run"])
        load_optimizer_state(run.optimizer, run.scheduler, saved.get("optimizer"), saved["scheduler"], new_settings,
                             fresh)
        run.precision.load_state_dict(saved["precision"])
        if run.checkpointer is not None and saved.get("checkpointer"):
            run.checkpointer.load_state_dict(saved["checkpointer"])
        for callback in run.callbacks:
            if callback.name in saved["callbacks"]:
                callback.load_state_dict(saved["callbacks"][callback.name])
        self.meter.load_state_dict(saved["meter"])
        rng = saved["rng"]
        if isinstance(rng, list):  # saved by a DDP run (resume checked the world size): one state per rank
            rng = rng[run.dist.rank if run.dist is not None else 0]
        set_rng_state(rng)

    def _save_final_weights(self, path: "Path", together: bool) -> None:
        """``model.safetensors`` of the run directory: written by rank 0; under FSDP gathered from every
        rank first, which needs them all here (``together``: not on the way out of an exception)."""
        run = self.run
        meta = {"trainctl_version": __version__, "step": str(self.state.step)}
        try:
            if run.sharded:
                if not together:
                    return
                from trainctl.sharding import export_weights

                export_weights(run.model, path, meta, run.is_main)
            elif run.is_main:
                save_weights(run.model, path, meta)
        except Exception as exc:  # a full disk (safetensors has its own error type), permissions, ...
            from trainctl.files import failure_text

            self.checkpoint_error = f"could not write {path}: {failure_text(exc, path.parent)}"
            log.error("%s%s", self.checkpoint_error, f"; the last checkpoint ({self.last_checkpoint}) holds the state"
                      if self.last_checkpoint else "")
            if self.state.stop_reason in ("completed", "early_stopped"):
                self.state.stop_reason = "checkpoint_failed"
