"""The training loop. Runner.fit() drives epochs; train_step() does one optimizer step over an
accumulation window; evaluate() runs validation. The runner builds nothing and reads no config:
components (precision, clipper, scheduler, meter, writer, display) do their own parts.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import torch

from trainctl import __version__
from trainctl.batches import Batch, windows_of
from trainctl.build import Run
from trainctl.checkpoint import save_weights, write_json
from trainctl.console import Display
from trainctl.metrics import TrainMeter, is_better
from trainctl.state import RunState

log = logging.getLogger("trainctl")


class Runner:
    def __init__(self, run: Run, display: Optional[Display] = None, state: Optional[RunState] = None) -> None:
        self.run = run
        self.state = state or RunState()
        self.display = display or Display("none", run.horizon.total_steps, run.horizon.total_epochs,
                                          attach_log=False)
        self.meter = TrainMeter(run.log_every_n_steps, run.device)
        self.final: Dict[str, float] = {}
        self.eval_seconds = 0.0
        self.train_seconds = 0.0
        self.lr = 0.0

    # --- the loop ------------------------------------------------------------------------------------

    def fit(self) -> Dict[str, Any]:
        run, state = self.run, self.state
        started = time.perf_counter()
        run.model.train()
        self._optimizer_mode("train")
        self.display.start(state.epoch, state.step)
        try:
            with self._stop_on_signals():
                while not state.should_stop and state.step < run.horizon.total_steps:
                    self._train_epoch()
                self.train_seconds = time.perf_counter() - started - self.eval_seconds
                if not state.should_stop and state.last_eval_step != state.step and self._evaluates():
                    self.evaluate()
        except BaseException as exc:
            self.train_seconds = self.train_seconds or time.perf_counter() - started - self.eval_seconds
            state.request_stop("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
            self.display.stop()
            self._finish(time.perf_counter() - started, error=exc)
            raise
        self.display.stop()
        state.request_stop("completed")
        return self._finish(time.perf_counter() - started)

    def _train_epoch(self) -> None:
        run, state = self.run, self.state
        batches = run.data.train.epoch(state.epoch, start=state.batch_in_epoch)
        for window in windows_of(batches, run.grad_accum_steps):
            self.train_step(window)
            state.batch_in_epoch += len(window)
            self._after_step()
            if state.should_stop or state.step >= run.horizon.total_steps:
                break
        if state.batch_in_epoch >= len(run.data.train):
            state.epoch += 1
            state.batch_in_epoch = 0
            due = run.eval_every_n_epochs and state.epoch % run.eval_every_n_epochs == 0
            if due and state.last_eval_step != state.step:  # a step-interval evaluation may have just run
                self.evaluate()

    def train_step(self, window: List[Batch]) -> None:
        """One optimizer step over the micro-batches of an accumulation window.

        Each micro-batch's loss *sum* is divided by the number of loss terms in the whole window, so
        the accumulated gradient equals that of one batch holding all of the window's samples.
        """
        run = self.run
        terms = sum(run.loss.count(y) for _, y in window)
        for x, y in window:
            with run.precision.autocast():
                loss_sum = run.loss(run.model(x), y)
            run.precision.backward(loss_sum / terms)
            self.meter.add(loss_sum)
        self.lr = run.optimizer.param_groups[0]["lr"]  # the lr this step used, before the schedule moves on
        grad_norm, _ = run.precision.step(run.optimizer, run.clipper)
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        samples = sum(len(x) for x, _ in window)
        self.state.samples_seen += samples
        self.state.step += 1
        self.meter.step_done(samples, terms, grad_norm)

    def _after_step(self) -> None:
        run, state = self.run, self.state
        self.display.step(state.step, state.epoch)
        if self.meter.should_log(state.step):
            values = self.meter.read()
            values["lr"] = self.lr
            self._record(values)
            if not math.isfinite(values["train/loss"]):
                log.error("step %d: the training loss is %s. Likely fixes: lower optimizer.lr, set "
                          "regularization.max_grad_norm=1.0, or add warmup (scheduler=warmup_cosine).",
                          state.step, values["train/loss"])
                state.request_stop("diverged")
        if run.eval_every_n_steps and state.step % run.eval_every_n_steps == 0:
            self.evaluate()

    # --- evaluation --------------------------------------------------------------------------------

    def _evaluates(self) -> bool:
        return bool(self.run.eval_every_n_epochs or self.run.eval_every_n_steps)

    def evaluate(self) -> Dict[str, float]:
        run, state = self.run, self.state
        tic = time.perf_counter()
        self._optimizer_mode("eval")
        metrics = run.evaluator(run.model, run.data.val, run.precision.autocast)
        self._optimizer_mode("train")
        state.last_eval_step = state.step
        value = metrics.get(run.monitor)
        if value is not None and is_better(value, state.best_metric, run.mode):
            state.best_metric, state.best_step = value, state.step
        run.scheduler.on_eval(metrics)
        self._record(metrics)
        seconds = time.perf_counter() - tic
        self.eval_seconds += seconds
        self.meter.exclude(seconds)
        return metrics

    def _optimizer_mode(self, mode: str) -> None:
        if self.run.optimizer_has_modes:
            getattr(self.run.optimizer, mode)()

    def _record(self, values: Dict[str, float]) -> None:
        self.final.update(values)
        if self.run.writer is not None:
            self.run.writer.write(self.state.step, self.state.epoch, values)
        self.display.report(self.state.step, self.state.epoch, values)

    # --- stopping and finishing ---------------------------------------------------------------------

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM stop the run at the next step boundary; a second SIGINT stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.state.should_stop and signum == signal.SIGINT:
                raise KeyboardInterrupt
            log.warning("%s received: stopping after the current step (press Ctrl-C again to stop now)",
                        signal.Signals(signum).name)
            self.state.request_stop("interrupted")

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def summary(self, wall_seconds: float, error: Optional[BaseException] = None) -> Dict[str, Any]:
        run, state = self.run, self.state
        train_seconds = max(self.train_seconds, 1e-9)
        reason = state.stop_reason or "completed"
        status = {"completed": "done", "interrupted": "interrupted"}.get(reason, "failed")
        summary = {
            "status": status, "stop_reason": reason, "monitor": run.monitor, "mode": run.mode,
            "best_metric": state.best_metric, "best_step": state.best_step,
            "final": {k: v for k, v in self.final.items() if k.startswith(("val/", "train/loss"))},
            "steps": state.step, "epochs_completed": state.epoch, "samples_seen": state.samples_seen,
            "wall_seconds": round(wall_seconds, 3), "train_seconds": round(train_seconds, 3),
            "samples_per_second": state.samples_seen / train_seconds,
            "run_dir": str(run.run_dir) if run.run_dir else None,
            "trainctl_version": __version__, "torch_version": torch.__version__,
        }
        if error is not None and not isinstance(error, KeyboardInterrupt):
            summary["error"] = f"{type(error).__name__}: {error}"
        return summary

    def _finish(self, wall_seconds: float, error: Optional[BaseException] = None) -> Dict[str, Any]:
        run = self.run
        self._optimizer_mode("eval")  # schedule-free: the saved weights are the averaged ones
        summary = self.summary(wall_seconds, error)
        if run.run_dir is not None:
            write_json(run.run_dir / "summary.json", summary)
            if error is None or isinstance(error, KeyboardInterrupt):
                save_weights(run.model, run.run_dir / "model.safetensors",
                             {"trainctl_version": __version__, "step": str(self.state.step)})
            if run.writer is not None:
                run.writer.close()
        return summary
