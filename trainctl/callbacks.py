"""Callbacks: small objects the runner calls at fixed points of a run. They read the run and its
state and answer by setting flags on the state (``state.request_stop``) or by returning values to log;
they never drive the loop. What a callback needs after a restart is in its ``state_dict()``, saved in
every checkpoint.

A callback is one class plus a registry entry (its settings' dataclass and a builder) and a YAML file
in `conf/callbacks/`; users pick any number: `trainctl run 'callbacks=[lr_monitor]'`. The runner calls
only the hooks a callback overrides, so an unused hook costs nothing per step. Early stopping is a
callback too (configured by its own `early_stopping` group). Specs are torch-free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from trainctl.errors import check, check_choice
from trainctl.registry import Registry

if TYPE_CHECKING:
    from trainctl.build import Run
    from trainctl.monitor import Monitors
    from trainctl.state import RunState

log = logging.getLogger("trainctl")

HOOKS = ("on_fit_start", "on_step_start", "on_after_first_backward", "on_before_optimizer_step", "on_step_end",
         "on_log", "on_eval_start", "on_eval_end", "on_fit_end")


class Callback:
    """Base class: every hook does nothing. Override the ones you need."""

    name = "callback"

    def on_fit_start(self, run: "Run", state: "RunState") -> None:
        """Once, before the first step of this session (after a resume, with the restored state)."""

    def on_step_start(self, run: "Run", state: "RunState") -> None:
        """Before the first micro-batch of each optimizer step."""

    def on_after_first_backward(self, run: "Run", state: "RunState", window: List[Any], terms: int) -> None:
        """After the backward pass of the first micro-batch of a window of two or more: ``p.grad`` holds
        that micro-batch's gradient alone (loss sum / the window's ``terms``; still scaled under fp16,
        local to this process under DDP). ``window``: this step's (transformed) micro-batches."""

    def on_before_optimizer_step(self, run: "Run", state: "RunState") -> None:
        """After the accumulation window's backward (gradients unscaled under fp16), before clipping and
        the optimizer step: the gradients of this step are in ``p.grad``."""

    def on_step_end(self, run: "Run", state: "RunState") -> None:
        """After the optimizer and the schedule stepped (``state.step`` counts this step)."""

    def on_log(self, run: "Run", state: "RunState") -> Dict[str, float]:
        """At each training log step: values to add to the record (metrics.jsonl, TensorBoard, console)."""
        return {}

    def on_eval_start(self, run: "Run", state: "RunState") -> None:
        """Before an evaluation (e.g. swap averaged weights in)."""

    def on_eval_end(self, run: "Run", state: "RunState", metrics: Dict[str, float]) -> None:
        """After an evaluation, with its metrics (the monitors are updated already)."""

    def on_fit_end(self, run: "Run", state: "RunState") -> None:
        """Once, after the last step and its checkpoint, before the final weights are written."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def hooked(callbacks: List[Callback], hook: str) -> List[Callback]:
    """The callbacks that override ``hook`` (the runner calls only those)."""
    return [c for c in callbacks if getattr(type(c), hook) is not getattr(Callback, hook)]


@dataclass(frozen=True)
class BuildContext:
    """What a callback's builder may read: the validated run spec, the data's task, the run's monitors."""

    spec: Any
    task: str
    monitors: "Monitors"


@dataclass(frozen=True)
class CallbackEntry:
    spec: type
    """The dataclass of its settings (`callbacks.<name>.*`)."""
    build: Callable[[Any, BuildContext], Optional[Callback]]
    """Settings -> callback, or None when these settings turn it off."""


CALLBACKS: Registry[CallbackEntry] = Registry("callbacks")
"""The callbacks users pick with `callbacks=[...]`."""


# --- early stopping ----------------------------------------------------------------------------------

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

    def __init__(self, monitor: Any, patience: int, restore_best_weights: bool = False) -> None:
        self.monitor = monitor
        """A :class:`trainctl.monitor.Monitor` (with the early-stopping `min_delta`)."""
        self.patience = patience
        self.restore_best_weights = restore_best_weights
        self.wait = 0
        self.stopped_step: Optional[int] = None
        self.best_weights: Optional[Dict[str, Any]] = None

    @property
    def best(self) -> Optional[float]:
        return self.monitor.best

    @property
    def best_step(self) -> Optional[int]:
        return self.monitor.best_step

    def on_eval_end(self, run: "Run", state: "RunState", metrics: Dict[str, float]) -> None:
        if self.monitor.metric not in metrics:
            return
        if self.monitor.improved:
            self.wait = 0
            if self.restore_best_weights:
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_step = state.step
            log.info("early stopping at step %d: %s has not improved on %.6g (step %s) for %d evaluations",
                     state.step, self.monitor.metric, self.monitor.best, self.monitor.best_step, self.wait)
            state.request_stop("early_stopped")

    def on_fit_end(self, run: "Run", state: "RunState") -> None:
        if self.restore_best_weights and self.best_weights is not None and state.stop_reason in (
                "completed", "early_stopped"):
            run.model.load_state_dict(self.best_weights)
            log.info("restored the weights of step %s (%s %.6g)", self.monitor.best_step, self.monitor.metric,
                     self.monitor.best)

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.monitor.best, "best_step": self.monitor.best_step, "wait": self.wait,
                "stopped_step": self.stopped_step, "best_weights": self.best_weights}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.wait = state["wait"]
        self.stopped_step = state.get("stopped_step")
        self.best_weights = state.get("best_weights")
        self.monitor.best, self.monitor.best_step = state["best"], state["best_step"]


def build_early_stopping(spec: EarlyStoppingSpec, ctx: BuildContext) -> Optional[Callback]:
    if not spec.enabled:
        return None
    monitor = ctx.monitors.get(ctx.spec.monitor(ctx.task, spec), ctx.spec.monitor_mode(ctx.task, spec), spec.min_delta)
    return EarlyStopping(monitor, int(spec.patience), spec.restore_best_weights)


EARLY_STOPPING = CallbackEntry(EarlyStoppingSpec, build_early_stopping)
"""Early stopping is configured by its own group (`early_stopping.patience=5`), built like any callback."""


# --- lr_monitor ----------------------------------------------------------------------------------------

@dataclass
class LRMonitorSpec:
    """Log the learning rate of every parameter group and the global gradient norm at each log step."""

    grad_norm: bool = True
    """Log `train/grad_norm` (before clipping) even when nothing clips by norm; one reduction over the
    gradients on the steps that are logged, none on the others."""

    def validate(self, key: str = "callbacks.lr_monitor") -> None:
        pass


class LRMonitor(Callback):
    """`lr/<group>` for every parameter group (the lr of the step just taken) and, unless clipping by
    norm reports it already, `train/grad_norm` of the logged step."""

    name = "lr_monitor"

    def __init__(self, grad_norm: bool) -> None:
        self.grad_norm = grad_norm
        self._norm: Any = None
        self._lrs: List[float] = []

    def on_before_optimizer_step(self, run: "Run", state: "RunState") -> None:
        if (state.step + 1) % run.log_every_n_steps:
            return  # only the steps that are logged pay for the reduction
        self._lrs = [group["lr"] for group in run.optimizer.param_groups]
        if self.grad_norm and run.clipper.max_grad_norm is None:
            self._norm = run.clipper.total_norm()

    def on_log(self, run: "Run", state: "RunState") -> Dict[str, float]:
        values = {f"lr/{i}": lr for i, lr in enumerate(self._lrs)}
        if self._norm is not None:
            values["train/grad_norm"] = float(self._norm)  # a log step reads the device anyway
            self._norm = None
        return values


CALLBACKS.add("lr_monitor", CallbackEntry(LRMonitorSpec, lambda spec, ctx: LRMonitor(spec.grad_norm)))
