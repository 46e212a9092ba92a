"""The learning-rate range test (`trainctl lr-find`) on trainctl's own training step.

A built :class:`~trainctl.build.Run` trains for a fixed number of optimizer steps through
:meth:`trainctl.runner.Runner.train_step` - so AMP, gradient accumulation, clipping, batch transforms,
step wrappers and DDP act exactly as in a real run - while its schedule is replaced by an exponential
ramp of the learning rate: step ``i`` of ``n`` uses ``start * (end / start) ** (i / (n - 1))`` times each
parameter group's share of `optimizer.lr` (the `optimizer.lr_multipliers` ratios are kept).

The loss of every step (the mean over ranks under DDP) is smoothed by an exponential moving average
with bias correction: ``avg_i = beta * avg_{i-1} + (1 - beta) * loss_i`` with ``avg_{-1} = 0`` and
``beta = 1 - smooth``, reported as ``avg_i / (1 - beta ** (i + 1))``. The test stops early once the
smoothed loss exceeds ``diverge`` times its best value so far (or a loss is not finite).

Two suggestions come from the smoothed curve: the lr where it falls fastest against log(lr) (the
steepest descent, ignoring ``skip_start`` points at the start and ``skip_end`` at the end, which are
noisy), and the lr of its minimum divided by 10. Weight averaging (`averaging=ema|swa`) is left out:
it does not change the training step's loss, and SWA would set the lr itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

if TYPE_CHECKING:
    from trainctl.build import Run


def ramp(start: float, end: float, steps: int) -> List[float]:
    """The lr of each of ``steps`` optimizer steps: from ``start`` to ``end`` in equal ratios."""
    if steps == 1:
        return [start]
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def smoothed(losses: List[float], smooth: float) -> List[float]:
    """Bias-corrected exponential moving average of ``losses`` (``smooth`` = weight of the newest value)."""
    beta, avg, out = 1.0 - smooth, 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1.0 - beta) * loss
        out.append(avg / (1.0 - beta ** (i + 1)) if beta < 1.0 else loss)
    return out


def suggest(lrs: List[float], smooth_losses: List[float], skip_start: int = 10, skip_end: int = 5
            ) -> Dict[str, Optional[float]]:
    """``steepest``: the lr at the most negative gradient of the smoothed loss with respect to log(lr),
    the first ``skip_start`` and last ``skip_end`` points left out (fewer when the test stopped early,
    so that at least 3 points remain); ``min_over_10``: the lr of the smoothed minimum / 10."""
    import numpy as np

    n = len(lrs)
    if n == 0:
        return {"steepest": None, "min_over_10": None, "minimum": None}
    best = int(np.argmin(smooth_losses))
    out: Dict[str, Optional[float]] = {"steepest": None, "min_over_10": lrs[best] / 10, "minimum": lrs[best]}
    if n < 3:
        return out
    while n - skip_start - skip_end < 3 and (skip_start or skip_end):  # shrink the larger skip first
        if skip_start >= skip_end:
            skip_start -= 1
        else:
            skip_end -= 1
    x = np.log(np.asarray(lrs[skip_start:n - skip_end], dtype=float))
    y = np.asarray(smooth_losses[skip_start:n - skip_end], dtype=float)
    out["steepest"] = float(np.exp(x[int(np.argmin(np.gradient(y, x)))]))
    return out


@dataclass
class LRFindResult:
    start_lr: float
    end_lr: float
    steps: int
    smooth: float
    diverge: float
    lrs: List[float] = field(default_factory=list)
    """The `optimizer.lr` each step used (each group: times its share)."""
    losses: List[float] = field(default_factory=list)
    """The training loss of each step (an fp16 step the loss scaler skipped included)."""
    smooth_losses: List[Optional[float]] = field(default_factory=list)
    """None for a non-finite loss (the last point of a test that stopped there)."""
    stop_reason: str = "completed"
    """completed, diverged (smoothed loss above diverge x best) or nonfinite."""
    suggestions: Dict[str, Optional[float]] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


class Ramp:
    """Stands in for the run's :class:`~trainctl.schedule.Schedule`: ``step()`` after each optimizer step
    moves every group to the next lr of the ramp, times the group's share of `optimizer.lr`."""

    def __init__(self, optimizer: Any, lrs: List[float], peak: float) -> None:
        self.optimizer = optimizer
        self.lrs = lrs
        self.shares = [g.get("initial_lr", g["lr"]) / peak if peak else 1.0 for g in optimizer.param_groups]
        self.index = 0
        self._apply()

    def _apply(self) -> None:
        lr = self.lrs[min(self.index, len(self.lrs) - 1)]
        for group, share in zip(self.optimizer.param_groups, self.shares):
            group["lr"] = lr * share

    def step(self) -> None:
        self.index += 1
        self._apply()

    def on_eval(self, metrics: Dict[str, float]) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.index = int(state["index"])
        self._apply()


def range_test(run: "Run", start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
               smooth: float = 0.05, diverge: float = 4.0, skip_start: int = 10, skip_end: int = 5,
               on_step: Optional[Callable[[int, float, Optional[float]], None]] = None) -> LRFindResult:
    """Train ``run`` (freshly built; its weights and optimizer state change) for up to ``steps`` optimizer
    steps under the exponential ramp and return the curve and the suggestions. Under DDP every rank calls
    this and gets the same result. ``on_step(i, lr, smoothed loss)`` after each step."""
    from trainctl.averaging import Averaging
    from trainctl.batches import windows_of
    from trainctl.runner import Runner

    lrs = ramp(start_lr, end_lr, steps)
    result = LRFindResult(start_lr, end_lr, steps, smooth, diverge)
    run.callbacks = [c for c in run.callbacks if not isinstance(c, Averaging)]
    run.scheduler = Ramp(run.optimizer, lrs, run.spec.optimizer.lr)  # type: ignore[assignment]
    runner = Runner(run)
    meter, state = run.meter, runner.state
    run.model.train()
    if run.optimizer_has_modes:  # schedule-free optimizers train on their training weights
        run.optimizer.train()  # type: ignore[attr-defined]
    runner._call("on_fit_start")
    meter.read()  # start the first reading now
    beta, avg, seen, best = 1.0 - smooth, 0.0, 0, math.inf
    i = 0
    while i < steps:
        if run.unfreezer is not None:
            run.unfreezer.catch_up(run, state.epoch)
        for window in windows_of(run.data.train.epoch(state.epoch), run.grad_accum_steps):
            runner.train_step(window)
            terms = meter.terms  # 0: a step skipped for a non-finite loss (trainer.on_nonfinite=skip)
            reading = meter.read()["train/loss"]  # the mean over every rank's share of the window
            loss = reading if terms else math.nan
            value: Optional[float] = None
            if math.isfinite(loss):
                seen += 1
                avg = beta * avg + (1.0 - beta) * loss
                value = avg / (1.0 - beta ** seen) if beta < 1.0 else loss
                best = min(best, value)
            result.lrs.append(lrs[i])
            result.losses.append(loss)
            result.smooth_losses.append(value)
            i += 1
            if on_step is not None:
                on_step(i, lrs[i - 1], value)
            if not math.isfinite(loss):
                result.stop_reason = "nonfinite"
            elif value is not None and value > diverge * best:
                result.stop_reason = "diverged"
            if result.stop_reason != "completed" or i >= steps:
                break
        else:
            state.epoch += 1
            continue
        break
    points = [(lr, s) for lr, s in zip(result.lrs, result.smooth_losses) if s is not None]
    result.suggestions = suggest([p[0] for p in points], [p[1] for p in points], skip_start, skip_end)
    return result


def plot(result: LRFindResult, path: Any) -> None:
    """The curve (raw and smoothed loss against a log lr axis) with both suggestions marked, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    raw = [(lr, v) for lr, v in zip(result.lrs, result.losses) if math.isfinite(v)]
    smooth = [(lr, v) for lr, v in zip(result.lrs, result.smooth_losses) if v is not None]
    if raw:
        ax.plot(*zip(*raw), color="0.7", linewidth=0.8, label="loss")
    if smooth:
        ax.plot(*zip(*smooth), color="C0", linewidth=1.8, label=f"smoothed loss ({result.smooth})")
        top = min(max(v for _, v in smooth), result.diverge * min(v for _, v in smooth))
        low = min(v for _, v in smooth + raw)
        ax.set_ylim(low - 0.05 * (top - low), top + 0.05 * (top - low) + 1e-12)
    marks = (("steepest", "C3", "o", "steepest descent"), ("min_over_10", "C2", "s", "minimum / 10"))
    for key, colour, marker, label in marks:
        lr = result.suggestions.get(key)
        if lr is None or not smooth:
            continue
        y = min(smooth, key=lambda p: abs(math.log(p[0] / lr)))[1] if key == "steepest" else None
        ax.axvline(lr, color=colour, linestyle="--", linewidth=1.0)
        if y is not None:
            ax.scatter([lr], [y], color=colour, marker=marker, s=60, zorder=3)
        ax.plot([], [], color=colour, linestyle="--", marker=marker, label=f"{label}: {lr:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (optimizer.lr)")
    ax.set_ylabel("training loss")
    ax.set_title(f"lr range test: {len(result.lrs)} steps, {result.stop_reason}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.savefig(str(path))
