"""The training loop. Runner.fit() drives epochs; train_step() does one optimizer step over an
accumulation window; _after_step() is the step boundary where logging, evaluation, callbacks and
checkpoints happen, in that order. The runner builds nothing and reads no config: components
(precision, clipper, scheduler, meter, checkpointer, callbacks, writer, display) do their own parts.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional

import torch

from trainctl import __version__
from trainctl.batches import Batch, windows_of
from trainctl.build import Run
from trainctl.console import Display
from trainctl.files import write_json
from trainctl.metrics import TrainMeter, is_better, speed
from trainctl.performance import peak_memory_mib, seconds_since_process_start
from trainctl.precision import ScaledPrecision
from trainctl.saving import Saving
from trainctl.state import RunState

log = logging.getLogger("trainctl")

DONE = ("completed", "early_stopped")



class Runner(Saving):
    def __init__(self, run: Run, display: Optional[Display] = None, state: Optional[RunState] = None) -> None:
        self.run = run
        self.state = state or RunState()
        self.display = display or Display("none", run.horizon.total_steps, run.horizon.total_epochs,
                                          attach_log=False)
        self.meter = TrainMeter(run.log_every_n_steps, run.device, tokens=run.data.info.task == "lm",
                                memory=lambda: peak_memory_mib(run.device), flops_per_sample=run.flops_per_sample,
                                peak_tflops=run.peak_tflops, dist=run.dist)
        self.final: Dict[str, float] = {}
        self.eval_seconds = 0.0
        self.checkpoint_seconds = 0.0
        self.session_samples = 0
        self.session_steps = 0
        self.compile_seconds = 0.0
        """This session's compile seconds (kept out of training time, evaluation time and throughput)."""
        self.first_step_seconds: Optional[float] = None
        """Seconds from process start to the end of this session's first optimizer step."""
        self.lr = 0.0
        self.signal: Optional[int] = None
        self._stop_pending: Optional[str] = None
        """Under DDP/FSDP: why this rank wants the job to stop (a signal, a failed write), until the ranks agree."""
        self.write_error: Optional[str] = None
        """Why metrics.jsonl or TensorBoard could not be written (the writer stopped)."""
        self.last_checkpoint: Optional[str] = None
        self.checkpoint_error: Optional[str] = None
        self._improved = False
        self._spec_yaml: Optional[str] = None
        self._started = time.perf_counter()
        self._train_seconds_before = 0.0

    # --- the loop ------------------------------------------------------------------------------------

    def fit(self) -> Dict[str, Any]:
        run, state = self.run, self.state
        self._started = time.perf_counter()
        self._train_seconds_before = state.train_seconds
        samples_before, steps_before = state.samples_seen, state.step
        run.model.train()
        self._optimizer_mode("train")
        self.display.start(state.epoch, state.step)
        try:
            with self._stop_on_signals():
                if state.eval_pending:  # the interrupted session owed this evaluation
                    state.eval_pending = False
                    self.evaluate()
                    self._maybe_checkpoint(False, state.step >= run.horizon.total_steps)
                while not state.should_stop and state.step < run.horizon.total_steps:
                    self._train_epoch()
        except BaseException as exc:
            state.request_stop("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
            self.display.stop()
            self.session_samples, self.session_steps = state.samples_seen - samples_before, state.step - steps_before
            self._finish(error=exc)
            raise
        self.display.stop()
        state.request_stop("completed")
        self.session_samples, self.session_steps = state.samples_seen - samples_before, state.step - steps_before
        return self._finish()

    def _train_epoch(self) -> None:
        run, state = self.run, self.state
        batches = self.meter.timed(run.data.train.epoch(state.epoch, start=state.batch_in_epoch))
        for window in windows_of(batches, run.grad_accum_steps):
            self.train_step(window)
            state.batch_in_epoch += len(window)
            self._after_step()
            if state.should_stop or state.step >= run.horizon.total_steps or state.batch_in_epoch == 0:
                break

    def train_step(self, window: List[Batch]) -> None:
        """One optimizer step over the micro-batches of an accumulation window.

        Each micro-batch's loss *sum* is divided by the number of loss terms in the whole window, so
        the accumulated gradient equals that of one batch holding all of the window's samples.
        """
        run = self.run
        terms = sum(run.loss.count(y) for _, y in window)
        window_loss: Optional[torch.Tensor] = None
        model = run.train_model
        assert model is not None
        for i, (x, y) in enumerate(window):
            # Ranks hold equal shares, so DDP's average of their gradients is the whole window's gradient;
            # they are exchanged once per window, after its last micro-batch.
            with self._sync_gradients(model, i == len(window) - 1):
                with run.precision.autocast():
                    loss_sum = run.loss(model(x), y)
                run.precision.backward(loss_sum / terms)
            loss_sum = loss_sum.detach()
            window_loss = loss_sum if window_loss is None else window_loss + loss_sum
        assert window_loss is not None
        self.lr = run.optimizer.param_groups[0]["lr"]  # the lr this step used, before the schedule moves on
        guard = self._finite_guard(window_loss) if run.skip_nonfinite else None
        grad_norm, stepped = run.precision.step(run.optimizer, run.clipper, guard)
        if stepped:
            run.scheduler.step()
        else:  # the schedule keeps counting steps; torch warns when it moves before any optimizer step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        samples = sum(len(x) for x, _ in window) * run.world_size  # every rank holds an equal share
        terms *= run.world_size
        self.state.samples_seen += samples
        self.state.step += 1
        if stepped:
            self.meter.add(window_loss)
            self.meter.step_done(samples, terms, grad_norm)
            self.state.consecutive_skips = 0
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

    # --- the step boundary -----------------------------------------------------------------------------

    def _after_step(self) -> None:
        run, state = self.run, self.state
        epoch_end = state.batch_in_epoch >= len(run.data.train)
        if epoch_end:
            state.epoch += 1
            state.batch_in_epoch = 0
        last = state.step >= run.horizon.total_steps
        if self.first_step_seconds is None:
            self.first_step_seconds = seconds_since_process_start()
        self.display.step(state.step, state.epoch)
        if run.dist is not None and (epoch_end or self.meter.should_log(state.step)):
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
        self._maybe_checkpoint(epoch_end, last)

    def _agree_on_stop(self) -> None:
        """A signal reaches the ranks at different moments; they stop together, at the first log step
        or epoch end where any of them has one."""
        dist = self.run.dist
        assert dist is not None
        if dist.any(self._stop_pending is not None) and self.state.stop_reason is None:
            # rank 0's reason when it has one (a failed write is only seen there), else a signal's
            self.state.request_stop(dist.broadcast(self._stop_pending) or "interrupted")

    def _eval_due(self, epoch_end: bool, last: bool) -> bool:
        run, state = self.run, self.state
        if state.last_eval_step == state.step:
            return False
        return bool((run.eval_every_n_steps and state.step % run.eval_every_n_steps == 0)
                    or (epoch_end and run.eval_every_n_epochs and state.epoch % run.eval_every_n_epochs == 0)
                    or (last and self._evaluates()))

    def _log_training(self) -> None:
        self._exclude_compile_time()
        values = self.meter.read()
        values["lr"] = self.lr
        if self.run.skip_nonfinite:
            values["train/skipped_steps"] = self.state.skipped_steps
        if isinstance(self.run.precision, ScaledPrecision):
            values["train/amp_skipped_steps"] = self.run.precision.overflow_skips
            values["train/loss_scale"] = self.run.precision.scaler.get_scale()
        self._record(values)
        if not all(math.isfinite(values.get(k, 0.0)) for k in ("train/loss", "train/grad_norm")):
            self._diverged(f"the training loss or gradient norm became non-finite (train/loss "
                           f"{values['train/loss']}, logged every {self.meter.every} steps)")

    def _diverged(self, what: str) -> None:
        kept = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
        log.error("step %d: %s. The run stops as diverged and no checkpoint is written from this state%s. "
                  "Likely fixes: lower optimizer.lr, set regularization.max_grad_norm=1.0, add warmup "
                  "(scheduler=warmup_cosine), or trainer.on_nonfinite=skip to skip bad steps.",
                  self.state.step, what, kept)
        self.state.request_stop("diverged")

    # --- evaluation --------------------------------------------------------------------------------

    def _evaluates(self) -> bool:
        return bool(self.run.eval_every_n_epochs or self.run.eval_every_n_steps)

    def evaluate(self) -> Dict[str, float]:
        run, state = self.run, self.state
        self._exclude_compile_time()
        tic = time.perf_counter()
        self._optimizer_mode("eval")
        metrics = run.evaluator(run.model, run.data.val, run.precision.autocast)
        self._optimizer_mode("train")
        state.last_eval_step = state.step
        value = metrics.get(run.monitor)
        if value is not None and is_better(value, state.best_metric, run.mode):
            state.best_metric, state.best_step = value, state.step
        run.scheduler.on_eval(metrics)
        if run.checkpointer is not None:
            self._improved = run.checkpointer.improved(metrics, state.step)
        for callback in run.callbacks:
            callback.on_eval(state, metrics, run.model)
        self._record(metrics)
        seconds = time.perf_counter() - tic
        self.meter.exclude(seconds)
        if run.compile_clock is not None:  # compiling the eval graph counts as compile time, not eval time
            compiled = run.compile_clock.take()
            self.compile_seconds += compiled
            seconds -= compiled
        self.eval_seconds += seconds
        return metrics

    def _exclude_compile_time(self) -> None:
        if self.run.compile_clock is not None:
            seconds = self.run.compile_clock.take()
            self.compile_seconds += seconds
            self.meter.exclude(seconds)

    def _optimizer_mode(self, mode: str) -> None:
        if self.run.optimizer_has_modes:
            getattr(self.run.optimizer, mode)()

    def _record(self, values: Dict[str, float]) -> None:
        self.final.update(values)
        writer = self.run.writer
        if writer is not None and writer.error is None:
            writer.write(self.state.step, self.state.epoch, values)
            if writer.error is not None:
                self._write_failed(writer.error)
        self.display.report(self.state.step, self.state.epoch, values)

    def _write_failed(self, error: str) -> None:
        """metrics.jsonl or TensorBoard can no longer be written: stop cleanly (the last checkpoint stays
        valid), or with `checkpoint.on_error=continue` train on without them."""
        self.write_error = error
        if self.run.spec.checkpoint.on_error == "continue":
            log.error("%s; training continues without metrics (checkpoint.on_error=continue)", error)
            return
        kept = f"the last checkpoint ({self.last_checkpoint}) stays valid" if self.last_checkpoint else "no checkpoint was saved"
        log.error("%s; the run stops and %s (set checkpoint.on_error=continue to train on without metrics)", error, kept)
        self._stop("failed")

    def _stop(self, reason: str) -> None:
        """Stop at this step boundary; under DDP/FSDP at the next one all ranks agree on."""
        if self.run.dist is None:
            self.state.request_stop(reason)
        elif self._stop_pending is None:
            self._stop_pending = reason

    # --- stopping and finishing ---------------------------------------------------------------------

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM stop the run at the next step boundary; a second SIGINT stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = self.signal or signum
            if self.run.dist is not None:
                self._stop_pending = self._stop_pending or "interrupted"
                log.warning("%s received: every process stops at the next log step or epoch end and a "
                            "checkpoint is saved (press Ctrl-C again to stop now)", signal.Signals(signum).name)
                return
            log.warning("%s received: stopping after the current step and saving a checkpoint "
                        "(press Ctrl-C again to stop now)", signal.Signals(signum).name)
            self.state.request_stop("interrupted")

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _train_seconds(self) -> float:
        self._exclude_compile_time()
        session = (time.perf_counter() - self._started - self.eval_seconds - self.checkpoint_seconds
                   - self.compile_seconds)
        return self._train_seconds_before + max(0.0, session)

    def summary(self, error: Optional[BaseException] = None) -> Dict[str, Any]:
        run, state = self.run, self.state
        wall = time.perf_counter() - self._started
        session_train = max(self._train_seconds() - self._train_seconds_before, 1e-9)
        reason = state.stop_reason or "completed"
        status = "done" if reason in DONE else "interrupted" if reason == "interrupted" else "failed"
        summary = {
            "status": status, "stop_reason": reason, "monitor": run.monitor, "mode": run.mode,
            "best_metric": state.best_metric, "best_step": state.best_step,
            "final": {k: v for k, v in self.final.items() if k.startswith(("val/", "train/loss"))},
            "steps": state.step, "epochs_completed": state.epoch, "samples_seen": state.samples_seen,
            "world_size": run.world_size,
            "wall_seconds": round(wall, 3), "train_seconds": round(self._train_seconds(), 3),
            "eval_seconds": round(self.eval_seconds, 3), "checkpoint_seconds": round(self.checkpoint_seconds, 3),
            **self._throughput(session_train),
            "skipped_steps": state.skipped_steps, "amp_skipped_steps": run.precision.overflow_skips,
            "training_state_mib": self._training_state(),
            "last_checkpoint": self.last_checkpoint,
            "run_dir": str(run.run_dir) if run.run_dir else None,
            "trainctl_version": __version__, "torch_version": torch.__version__,
        }
        if self.signal is not None:
            summary["signal"], summary["signal_number"] = signal.Signals(self.signal).name, int(self.signal)
        if self.checkpoint_error:
            summary["checkpoint_error"] = self.checkpoint_error
        if self.write_error:
            summary["error" if reason == "failed" and error is None else "logging_error"] = self.write_error
        if error is not None and not isinstance(error, KeyboardInterrupt):
            summary["error"] = f"{type(error).__name__}: {error}"
        return summary

    def _training_state(self) -> Optional[Dict[str, float]]:
        """Parameters, gradients and optimizer state held by this process (rank 0's under DDP/FSDP)."""
        from trainctl.sharding import state_mib

        try:
            return state_mib(self.run.model, self.run.optimizer)
        except (RuntimeError, AttributeError):  # an optimizer keeping its state in another form
            return None

    def _throughput(self, seconds: float) -> Dict[str, Any]:
        """This session's speed and memory figures for the summary."""
        run = self.run
        tokens = None
        if run.data.info.task == "lm":  # every sample is one window of seq_len tokens
            tokens = self.session_samples * run.data.info.input_shape[0]
        values: Dict[str, Any] = speed(seconds, self.session_samples, self.session_steps,
                                       self.meter.session_data_seconds, tokens, peak_memory_mib(run.device),
                                       run.flops_per_sample, run.peak_tflops)
        values["data_wait_share"] = values.pop("data_wait")
        if run.compile_clock is not None:
            values["compile_seconds"] = round(run.compile_clock.seconds, 3)
        values["time_to_first_step_seconds"] = self.first_step_seconds
        values["activation_checkpointed_modules"] = run.checkpointed_modules
        return values

    def _finish(self, error: Optional[BaseException] = None) -> Dict[str, Any]:
        run, state = self.run, self.state
        if error is None:
            for callback in run.callbacks:
                callback.on_fit_end(state, run.model)
        self._optimizer_mode("eval")  # schedule-free: the saved weights are the averaged ones
        crashed = error is not None and not isinstance(error, KeyboardInterrupt)
        if run.run_dir is not None and state.stop_reason != "diverged" and not crashed:
            self._save_final_weights(run.run_dir / "model.safetensors", error is None)
        summary = self.summary(error)
        if run.compile_clock is not None:
            run.compile_clock.close()
        if run.writer is not None:
            run.writer.close()
            if run.writer.error is not None and self.write_error is None:  # the last records could not be flushed
                self.write_error = summary["logging_error"] = run.writer.error
                log.error("%s", run.writer.error)
        if run.run_dir is not None and run.is_main:
            try:  # in place if the disk has no room for a new copy: the run's end is recorded either way
                write_json(run.run_dir / "summary.json", summary, in_place_when_full=True)
            except OSError as exc:
                log.error("could not write the summary: %s", exc.strerror or exc)
                print(f"trainctl: error: could not write {run.run_dir / 'summary.json'}: {exc.strerror or exc}",
                      file=sys.stderr, flush=True)
        return summary
