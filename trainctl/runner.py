"""The training loop, and nothing else. It builds nothing and reads no config: the components of the
built :class:`~trainctl.build.Run` do their parts, and the loop reads top to bottom like the algorithm:

    for each epoch, for each accumulation window of micro-batches:
        transform each micro-batch; forward and backward it, its loss sum scaled by the window's terms
        precision.step: unscale -> callbacks and step wrappers see the gradients -> clip -> step
        schedule.step; zero the gradients; count samples and terms
        at the step boundary: log, evaluate (monitors, schedule, callbacks), checkpoint

Callbacks are called only at the hooks they override; timing lives in :class:`~trainctl.accounting.Clock`,
checkpoints in :class:`~trainctl.checkpointing.Checkpoints`.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch

from trainctl.accounting import Clock, summary
from trainctl.batches import Batch, windows_of
from trainctl.callbacks import HOOKS, hooked
from trainctl.checkpointing import snapshot
from trainctl.console import Display
from trainctl.files import write_json
from trainctl.interrupts import stop_on_signals
from trainctl.metrics import MetricsWriter
from trainctl.optim import step_closure, takes_closure
from trainctl.state import RunState

if TYPE_CHECKING:
    from trainctl.build import Run

log = logging.getLogger("trainctl")


class Runner:
    def __init__(self, run: "Run", display: Optional[Display] = None, state: Optional[RunState] = None,
                 writer: Optional[MetricsWriter] = None) -> None:
        self.run = run
        self.state = state or RunState()
        self.display = display or Display("none", run.horizon.total_steps, run.horizon.total_epochs,
                                          attach_log=False)
        self.writer = writer
        self.meter = run.meter
        self.clock = Clock(run)
        self.hooks = {name: hooked(run.callbacks, name) for name in HOOKS}
        """The callbacks that override each hook; the others cost nothing."""
        self.closes = takes_closure(run.optimizer)
        """The optimizer re-evaluates the window's loss within its step (L-BFGS): it gets a closure."""
        self.final: Dict[str, float] = {}
        """The latest reading of every logged value (the summary's `final`)."""
        self.lr = 0.0
        self.signal: Optional[int] = None
        self.notes: Dict[str, Any] = {}
        """What the summary reports besides the readings: the signal, errors."""
        self._stop_pending: Optional[str] = None
        """Why the run should stop at the next step boundary (a signal; under DDP/FSDP also a failed write,
        until the ranks agree)."""
        self._session: Tuple[int, int] = (0, 0)

    # --- the loop ------------------------------------------------------------------------------------

    def fit(self) -> Dict[str, Any]:
        run, state = self.run, self.state
        self.clock.start(state.train_seconds)
        self._session = (state.samples_seen, state.step)
        run.model.train()
        self._optimizer_mode("train")
        self._call("on_fit_start")
        self.display.start(state.epoch, state.step)
        try:
            with stop_on_signals(self):
                if state.eval_pending:  # the interrupted session owed this evaluation
                    state.eval_pending = False
                    self.evaluate()
                    self._checkpoint_if_due(False, state.step >= run.horizon.total_steps)
                while not state.should_stop and state.step < run.horizon.total_steps:
                    self._train_epoch()
        except BaseException as exc:
            state.request_stop("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
            self.display.stop()
            self._finish(error=exc)
            raise
        self.display.stop()
        state.request_stop("completed")
        return self._finish()

    def _train_epoch(self) -> None:
        run, state = self.run, self.state
        if run.unfreezer is not None:
            run.unfreezer.catch_up(run, state.epoch)
        batches = self.meter.timed(run.data.train.epoch(state.epoch, start=state.batch_in_epoch))
        per_epoch = len(run.data.train)
        for window in windows_of(batches, run.grad_accum_steps):
            self.train_step(window)
            state.batch_in_epoch += len(window)
            self._after_step(state.batch_in_epoch >= per_epoch)
            if state.should_stop or state.step >= run.horizon.total_steps or state.batch_in_epoch == 0:
                break

    def train_step(self, window: List[Batch]) -> None:
        """One optimizer step over the micro-batches of an accumulation window.

        Each micro-batch's loss *sum* is divided by the number of loss terms in the whole window, so
        the accumulated gradient equals that of one batch holding all of the window's samples.
        """
        run = self.run
        self._call("on_step_start")
        if run.transforms:
            window = [self._transformed(x, y) for x, y in window]
        terms = sum(run.loss.count(y) for _, y in window)
        window_loss = self._forward_backward(window, terms)
        self.lr = run.optimizer.param_groups[0]["lr"]  # the lr this step used, before the schedule moves on
        guard = self._finite_guard(window_loss) if run.skip_nonfinite else None
        before = self._before_optimizer_step(window, terms) if (run.step_wrappers or self.hooks[
            "on_before_optimizer_step"]) else None
        closure = step_closure(run, window_loss, terms, lambda: self._forward_backward(window, terms)) if (
            self.closes) else None
        grad_norm, stepped = run.precision.step(run.optimizer, run.clipper, guard, before, closure)
        if stepped:
            run.scheduler.step()
        else:  # the schedule keeps counting steps; torch warns when it moves before any optimizer step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        self._count(window, terms, window_loss, grad_norm, stepped)
        self._call("on_step_end")

    def _forward_backward(self, window: List[Batch], terms: int) -> torch.Tensor:
        """The window's gradients, accumulated in ``p.grad``; returns the window's loss sum (on the device)."""
        run = self.run
        model = run.train_model
        assert model is not None
        tally = self.meter.tally()  # training metrics from the same outputs (a step's first pass only)
        window_loss: Optional[torch.Tensor] = None
        for i, (x, y) in enumerate(window):
            # Ranks hold equal shares, so DDP's average of their gradients is the whole window's gradient;
            # they are exchanged once per window, after its last micro-batch.
            with self._sync_gradients(model, i == len(window) - 1):
                with run.precision.autocast():
                    loss_sum = run.loss(outputs := model(x), y)
                if tally is not None:
                    tally(outputs.detach(), y)
                del outputs  # not held through the backward pass
                run.precision.backward(loss_sum / terms)
            if not i and self.hooks["on_after_first_backward"] and len(window) > 1:
                self._call("on_after_first_backward", window, terms)  # p.grad: this micro-batch's alone
            loss_sum = loss_sum.detach()
            window_loss = loss_sum if window_loss is None else window_loss + loss_sum
        assert window_loss is not None
        return window_loss

    def _transformed(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        for transform in self.run.transforms:
            x, y = transform(x, y)
        return x, y

    def _before_optimizer_step(self, window: List[Batch], terms: int) -> Callable[[], None]:
        """Called by the precision policy once the gradients are unscaled: callbacks look, wrappers act."""
        run = self.run

        def recompute() -> None:
            run.optimizer.zero_grad(set_to_none=True)
            self._forward_backward(window, terms)

        def before() -> None:
            self._call("on_before_optimizer_step")
            for wrapper in run.step_wrappers:
                wrapper.before_step(run.clipper.params, recompute)
        return before

    def _count(self, window: List[Batch], terms: int, window_loss: torch.Tensor,
               grad_norm: Optional[torch.Tensor], stepped: bool) -> None:
        run, state = self.run, self.state
        samples = sum(len(x) for x, _ in window) * run.world_size  # every rank holds an equal share
        terms *= run.world_size
        state.samples_seen += samples
        state.step += 1
        if stepped:
            self.meter.add(window_loss)
            self.meter.step_done(samples, terms, grad_norm)
            state.consecutive_skips = 0
        elif run.precision.overflow:  # the loss scaler skipped an overflowing step: expected, counted
            self.meter.add(window_loss)
            self.meter.step_done(samples, terms, None)
        else:
            self.meter.step_done(samples, 0, None)
            self._skipped()

    def _sync_gradients(self, model: torch.nn.Module, final: bool) -> ContextManager:
        if self.run.dist is None:
            return nullcontext()
        return self.run.dist.no_sync(model, final)

    def _finite_guard(self, window_loss: torch.Tensor) -> Callable[[Optional[torch.Tensor]], bool]:
        def guard(norm: Optional[torch.Tensor]) -> bool:
            norm = self.run.clipper.total_norm() if norm is None else norm
            return bool(torch.isfinite(window_loss) & torch.isfinite(norm))
        return guard

    def _skipped(self) -> None:
        state = self.state
        state.skipped_steps += 1
        state.consecutive_skips += 1
        log.warning("step %d: non-finite loss or gradient norm; the optimizer step was skipped "
                    "(%d in a row, %d in total)", state.step, state.consecutive_skips, state.skipped_steps)
        if state.consecutive_skips >= self.run.max_consecutive_skips:
            self._diverged(f"{state.consecutive_skips} optimizer steps in a row had a non-finite loss or "
                           f"gradient norm (trainer.max_consecutive_skips={self.run.max_consecutive_skips})")

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.hooks[hook]:
            getattr(callback, hook)(self.run, self.state, *args)

    # --- the step boundary -----------------------------------------------------------------------------

    def _after_step(self, epoch_end: bool) -> None:
        run, state = self.run, self.state
        if epoch_end:
            state.epoch += 1
            state.batch_in_epoch = 0
        last = state.step >= run.horizon.total_steps
        self.clock.step_done()
        self.display.step(state.step, state.epoch)
        if run.dist is None:
            if self._stop_pending is not None:  # a signal during this step (see trainctl.interrupts)
                state.request_stop(self._stop_pending)
        elif epoch_end or self.meter.should_log(state.step):
            self._agree_on_stop()
        if self.meter.should_log(state.step):
            self._log_training()
        if state.stop_reason == "diverged":
            return
        if self._eval_due(epoch_end, last):
            if state.stop_reason == "interrupted":
                state.eval_pending = True  # stop promptly; the resumed run evaluates first
            else:
                self.evaluate()
        self._checkpoint_if_due(epoch_end, last)

    def _agree_on_stop(self) -> None:
        """A signal reaches the ranks at different moments; they stop together, at the first log step
        or epoch end where any of them has one."""
        dist = self.run.dist
        assert dist is not None
        if dist.any(self._stop_pending is not None) and self.state.stop_reason is None:
            # rank 0's reason when it has one (a failed write is only seen there), else a signal's
            self.state.request_stop(dist.broadcast(self._stop_pending) or "interrupted")

    def _stop(self, reason: str) -> None:
        """Stop at this step boundary; under DDP/FSDP at the next one all ranks agree on."""
        if self.run.dist is None:
            self.state.request_stop(reason)
        elif self._stop_pending is None:
            self._stop_pending = reason

    def _eval_due(self, epoch_end: bool, last: bool) -> bool:
        run, state = self.run, self.state
        if state.last_eval_step == state.step:
            return False
        return bool((run.eval_every_n_steps and state.step % run.eval_every_n_steps == 0)
                    or (epoch_end and run.eval_every_n_epochs and state.epoch % run.eval_every_n_epochs == 0)
                    or (last and self._evaluates()))

    def _log_training(self) -> None:
        self.clock.take_compile()
        values = self.meter.read()
        values["lr"] = self.lr
        if self.run.skip_nonfinite:
            values["train/skipped_steps"] = self.state.skipped_steps
        values.update(self.run.precision.log_values())
        for wrapper in self.run.step_wrappers:
            values.update(wrapper.log_values())
        for callback in self.hooks["on_log"]:
            values.update(callback.on_log(self.run, self.state))
        self._record(values)
        if not all(math.isfinite(values.get(k, 0.0)) for k in ("train/loss", "train/grad_norm")):
            self._diverged(f"the training loss or gradient norm became non-finite (train/loss "
                           f"{values['train/loss']}, logged every {self.meter.every} steps)")

    def _diverged(self, what: str) -> None:
        last = self.run.checkpoints.last if self.run.checkpoints is not None else None
        kept = f"; the last good checkpoint is {last}" if last else ""
        log.error("step %d: %s. The run stops as diverged and no checkpoint is written from this state%s. "
                  "Likely fixes: lower optimizer.lr, set regularization.max_grad_norm=1.0, add warmup "
                  "(scheduler=warmup_cosine), or trainer.on_nonfinite=skip to skip bad steps.",
                  self.state.step, what, kept)
        self.state.request_stop("diverged")

    # --- evaluation and checkpoints ------------------------------------------------------------------

    def _evaluates(self) -> bool:
        return bool(self.run.eval_every_n_epochs or self.run.eval_every_n_steps)

    def evaluate(self) -> Dict[str, float]:
        run, state = self.run, self.state
        with self.clock.timing("eval"):
            self._call("on_eval_start")
            self._optimizer_mode("eval")
            metrics = run.evaluator(run.model, run.data.val, run.precision.autocast)
            self._optimizer_mode("train")
            state.last_eval_step = state.step
            run.monitors.update(metrics, state.step)
            run.scheduler.on_eval(metrics)
            if run.checkpoints is not None:
                run.checkpoints.evaluated()
            self._call("on_eval_end", metrics)
            self._record(metrics)
        return metrics

    def _checkpoint_if_due(self, epoch_end: bool, last: bool) -> None:
        run, state = self.run, self.state
        best = run.checkpoints.due(state, epoch_end, last) if run.checkpoints is not None else None
        if best is None:
            return
        if not self.meter.finite():  # never checkpoint a state reached through a non-finite step
            self._diverged("the training loss or gradient norm became non-finite")
            return
        assert run.checkpoints is not None
        state.train_seconds = self.clock.train_seconds()
        with self.clock.timing("checkpoint"):
            failed = run.checkpoints.save(state, snapshot(run, state), run.world_size,
                                          self.final.get(run.checkpoints.monitor.metric), best)
        if failed:
            state.request_stop(failed)

    def _optimizer_mode(self, mode: str) -> None:
        if self.run.optimizer_has_modes:
            getattr(self.run.optimizer, mode)()

    def _record(self, values: Dict[str, float]) -> None:
        self.final.update(values)
        writer = self.writer
        if writer is not None and writer.error is None:
            writer.write(self.state.step, self.state.epoch, values)
            self.clock.exclude_setup(writer.take_setup_seconds())
            if writer.error is not None:
                self._write_failed(writer.error)
        self.display.report(self.state.step, self.state.epoch, values)

    def _write_failed(self, error: str) -> None:
        """metrics.jsonl or TensorBoard can no longer be written: stop cleanly (the last checkpoint stays
        valid), or with `checkpoint.on_error=continue` train on without them."""
        self.notes["write_error"] = error
        if self.run.spec.checkpoint.on_error == "continue":
            log.error("%s; training continues without metrics (checkpoint.on_error=continue)", error)
            return
        last = self.run.checkpoints.last if self.run.checkpoints is not None else None
        kept = f"the last checkpoint ({last}) stays valid" if last else "no checkpoint was saved"
        log.error("%s; the run stops and %s (set checkpoint.on_error=continue to train on without metrics)", error, kept)
        self._stop("failed")

    # --- stopping and finishing ---------------------------------------------------------------------

    def summary(self, error: Optional[BaseException] = None) -> Dict[str, Any]:
        run, state = self.run, self.state
        reason = state.stop_reason or "completed"
        notes = {"signal": self.signal,
                 "checkpoint_error": run.checkpoints.error if run.checkpoints is not None else None}
        write_error = self.notes.get("write_error")
        if write_error:
            notes["error" if reason == "failed" and error is None else "logging_error"] = write_error
        if error is not None and not isinstance(error, KeyboardInterrupt):
            notes["error"] = f"{type(error).__name__}: {error}"
        samples, steps = state.samples_seen - self._session[0], state.step - self._session[1]
        return summary(run, state, self.clock, self.final, samples, steps, notes)

    def _finish(self, error: Optional[BaseException] = None) -> Dict[str, Any]:
        run, state = self.run, self.state
        if error is None:
            self._call("on_fit_end")
        self._optimizer_mode("eval")  # schedule-free: the saved weights are the averaged ones
        crashed = error is not None and not isinstance(error, KeyboardInterrupt)
        if run.run_dir is not None and run.checkpoints is not None and state.stop_reason != "diverged" and not crashed:
            if run.checkpoints.write_weights(run.run_dir / "model.safetensors", state.step, error is None):
                if state.stop_reason in ("completed", "early_stopped"):
                    state.stop_reason = "checkpoint_failed"
        out = self.summary(error)
        if run.compile_clock is not None:
            run.compile_clock.close()
        if self.writer is not None:
            self.writer.close()
            if self.writer.error is not None and not self.notes.get("write_error"):  # the last records were lost
                self.notes["write_error"] = out["logging_error"] = self.writer.error
                log.error("%s", self.writer.error)
        if run.run_dir is not None and run.is_main:
            try:  # in place if the disk has no room for a new copy: the run's end is recorded either way
                write_json(run.run_dir / "summary.json", out, in_place_when_full=True)
            except OSError as exc:
                log.error("could not write the summary: %s", exc.strerror or exc)
                print(f"trainctl: error: could not write {run.run_dir / 'summary.json'}: {exc.strerror or exc}",
                      file=sys.stderr, flush=True)
        return out
