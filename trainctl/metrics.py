"""The `logging` config group and the metrics: their names and the training-loss meter (the
metrics.jsonl/TensorBoard/MLflow writer is :mod:`trainctl.writer`, evaluation :mod:`trainctl.evaluation`).

The meter keeps the running training loss - and the task's training metrics, from the outputs of the
same forward passes - on the device and reads them only every `logging.log_every_n_steps` optimizer
steps, so the training loop never waits on the device.
Importing this module does not import torch (the CLI reads the metric names below).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

from trainctl.errors import check, check_choice
from trainctl.writer import MetricsWriter, _quiet_tensorboard_threads, read_metrics, truncate_metrics  # noqa: F401

if TYPE_CHECKING:
    import torch


VAL_METRICS = {
    "classification": ("val/acc", "val/f1", "val/loss"),
    "regression": ("val/loss", "val/mse", "val/mae"),
    "lm": ("val/loss", "val/ppl"),
}
"""Validation metrics reported for each task (accuracy/macro-F1, MSE/MAE in target units, perplexity)."""
TRAIN_METRICS = {
    "classification": ("train/acc",),
    "regression": ("train/mse", "train/mae"),
    "lm": ("train/acc", "train/ppl"),
}
"""Training metrics logged next to `train/loss` (`logging.train_metrics`): each `train/X` is measured like
`val/X` but on the training batches, in training mode. LM `train/acc` is token accuracy (no `val/acc`);
`train/ppl` = exp(train/loss), logged only when the training criterion is plain cross-entropy."""
MODE_OF = {"acc": "max", "f1": "max", "loss": "min", "mse": "min", "mae": "min", "ppl": "min"}


@dataclass
class LoggingSpec:
    """What is reported, where, and how often."""

    log_every_n_steps: int = 10
    """Optimizer steps between training-loss readings (each reading is one host sync)."""
    progress: str = "auto"
    """auto (a live bar on a terminal, plain lines otherwise), bar, plain or none."""
    tensorboard: bool = True
    """Write TensorBoard event files under `tb/` in the run directory."""
    train_metrics: bool = True
    """Log the task's metrics on the training batches (`train/acc`; `train/mse`, `train/mae`), summed on
    the device from the training forward passes and read with the loss, next to their `val/` twins."""

    histograms_every_n_steps: Optional[int] = None
    """Write weight and gradient histograms of every trainable parameter to TensorBoard every N optimizer
    steps (:mod:`trainctl.histograms`); null: never."""
    mlflow: bool = False
    """Also log to MLflow (:mod:`trainctl.mlflow_log`): the flattened spec as params, every record as
    metrics, the summary and the final weights as artifacts. Needs `pip install 'trainctl[mlflow]'`."""
    mlflow_tracking_uri: Optional[str] = None
    """Any MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` where trainctl starts."""
    mlflow_experiment: str = "trainctl"
    """The MLflow experiment the run is logged under (created when missing)."""
    gradient_noise_scale: bool = False
    """Log the gradient noise scale B_simple as `train/gns` (:mod:`trainctl.noise_scale`), from the first
    micro-batch's gradient against the accumulation window's; needs trainer.grad_accum_steps >= 2."""

    def validate(self, key: str = "logging") -> None:
        check(self.log_every_n_steps >= 1, f"{key}.log_every_n_steps", "must be >= 1",
              f"set {key}.log_every_n_steps=10")
        every = self.histograms_every_n_steps
        check(every is None or every >= 1, f"{key}.histograms_every_n_steps", f"must be >= 1 or null (got {every})",
              f"set {key}.histograms_every_n_steps=100")
        check(every is None or self.tensorboard, f"{key}.histograms_every_n_steps", "histograms are written to "
              "TensorBoard, which is off", f"set {key}.tensorboard=true (or {key}.histograms_every_n_steps=null)")
        check(bool(self.mlflow_experiment), f"{key}.mlflow_experiment", "must not be empty",
              f"set {key}.mlflow_experiment=trainctl")
        check(self.mlflow_tracking_uri is None or bool(self.mlflow_tracking_uri.strip()), f"{key}.mlflow_tracking_uri",
              "must not be empty", f"set {key}.mlflow_tracking_uri=null (sqlite:///mlflow.db)")
        check_choice(self.progress, ("auto", "bar", "plain", "none"), f"{key}.progress")


def default_monitor(task: str) -> Tuple[str, str]:
    return ("val/acc", "max") if task == "classification" else ("val/loss", "min")


TIMING_KEYS = ("train/samples_per_second", "train/tokens_per_second", "train/step_seconds", "train/data_wait",
               "train/peak_memory_mib", "train/tflops", "train/mfu")
"""Readings that measure the machine rather than the math (they differ between identical runs)."""


def speed(seconds: float, samples: int, steps: int, data_seconds: float, tokens: Optional[int] = None,
          memory_mib: Optional[float] = None, flops_per_sample: Optional[float] = None,
          peak_tflops: Optional[float] = None) -> Dict[str, float]:
    """Throughput and memory over ``seconds`` of training: per log interval and for the summary."""
    values = {"samples_per_second": samples / seconds}
    if tokens is not None:
        values["tokens_per_second"] = tokens / seconds
    values["step_seconds"] = seconds / max(1, steps)
    values["data_wait"] = min(1.0, data_seconds / seconds)
    if memory_mib is not None:
        values["peak_memory_mib"] = memory_mib
    if flops_per_sample:
        values["tflops"] = flops_per_sample * values["samples_per_second"] / 1e12
        if peak_tflops:
            values["mfu"] = values["tflops"] / peak_tflops
    return values


class TrainMetrics:
    """The task's metrics on the training batches (:data:`TRAIN_METRICS`), summed on the device from the
    outputs of the training forward passes: no extra forward pass and no host sync per step.

    Classification: top-1 accuracy (with soft targets, such as mixup's, against the class of largest
    weight; one logit: the positive class when it is > 0, as in evaluation). Language modelling: token
    accuracy. Regression: squared and absolute error in the targets' own units, averaged over targets
    and rows as `val/mse` and `val/mae` are.

    A window's sums are kept apart until the step is counted (:meth:`commit`): a step whose loss the meter
    does not count (skipped as non-finite) does not count here either.
    """

    def __init__(self, task: str, device: "torch.device", target_std: Optional[Tuple[float, ...]] = None,
                 ppl: bool = False) -> None:
        import torch

        self.task = task
        self.ppl = ppl and task == "lm"
        regression = task == "regression"
        self.sums = torch.zeros(2 if regression else 1, dtype=torch.float32 if regression else torch.long,
                                device=device)
        """Error sums (squared, absolute) or the count of correct predictions: exact integers for counts."""
        self.count = 0
        """Rows (samples or tokens) for accuracy, target values for regression errors."""
        self.std = torch.tensor(target_std, device=device) if regression and target_std is not None else None
        self.pending: Optional["torch.Tensor"] = None  # the open window's sums and count
        self.pending_count = 0

    def observe(self, outputs: "torch.Tensor", targets: "torch.Tensor") -> None:
        """Add one micro-batch's (detached) outputs against its targets to the open window."""
        import torch

        if self.task == "regression":
            error = outputs.float().reshape(len(outputs), -1) - targets.reshape(len(targets), -1)
            if self.std is not None:  # the data's own units (the mean cancels in a difference)
                error = error * self.std
            stats = torch.stack(((error * error).sum(), error.abs().sum()))
            count = error.numel()
        else:
            logits = outputs.reshape(-1, outputs.shape[-1])
            soft = targets.is_floating_point()  # class weights per row: the largest one's class
            labels = targets.reshape(-1, targets.shape[-1]).argmax(-1) if soft else targets.reshape(-1)
            preds = (logits[:, 0] > 0).long() if logits.shape[-1] == 1 else logits.argmax(-1)
            stats = (preds == labels).sum().reshape(1)
            count = labels.numel()
        self.pending = stats if self.pending is None else self.pending + stats
        self.pending_count += count

    def commit(self) -> None:
        if self.pending is not None:
            self.sums += self.pending
            self.count += self.pending_count
        self.discard()

    def discard(self) -> None:
        self.pending, self.pending_count = None, 0

    def read(self, dist: Any, train_loss: float) -> Dict[str, float]:
        """The metrics since the last reading (every rank's equal share included), then start over."""
        values: Dict[str, float] = {}
        if self.ppl:
            values["train/ppl"] = math.inf if train_loss > 709 else math.exp(train_loss)
        count = self.count * (dist.world_size if dist is not None else 1)
        if count:
            sums = (self.sums if dist is None else dist.sum(self.sums.clone())).tolist()
            if self.task == "regression":
                values.update({"train/mse": sums[0] / count, "train/mae": sums[1] / count})
            else:
                values["train/acc"] = sums[0] / count
        self.sums.zero_()
        self.count = 0
        return values

    def state_dict(self) -> Dict[str, Any]:
        return {"metric_sums": self.sums.cpu(), "metric_count": self.count}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        sums = state.get("metric_sums")
        if sums is not None and tuple(sums.shape) == tuple(self.sums.shape):  # else: a run saved without them
            self.sums.copy_(sums)
            self.count = state["metric_count"]


class TrainMeter:
    """Running training loss, gradient norm and throughput between two log readings, accumulated on the
    device. A non-finite value anywhere in the interval makes the sums non-finite, so one check at
    reading (or checkpoint) time covers every step since the last one.

    Throughput readings: samples/s (tokens/s with ``tokens``), seconds per optimizer step, the share of
    time spent waiting for batches, peak memory from ``memory``, and with ``flops_per_sample`` the
    achieved TFLOP/s (and MFU against ``peak_tflops``). With ``info`` (`logging.train_metrics`), the
    task's training metrics too (:class:`TrainMetrics`; ``ppl``: the training criterion is plain
    cross-entropy, so exp(train/loss) is the perplexity).
    """

    def __init__(self, every_n_steps: int, device: "torch.device", tokens: bool = False,
                 memory: Optional[Callable[[], Optional[float]]] = None,
                 flops_per_sample: Optional[float] = None, peak_tflops: Optional[float] = None,
                 dist: Any = None, info: Any = None, ppl: bool = False) -> None:
        import torch

        self.metrics = TrainMetrics(info.task, device, info.target_std, ppl) if info is not None else None
        self._tallied = False

        self.dist = dist
        """Under DDP, readings cover every rank: samples and terms are counted for all ranks (their
        shares are equal) and loss sums are added across ranks when read."""
        self.every = every_n_steps
        self.tokens = tokens
        self.memory = memory
        self.flops_per_sample = flops_per_sample
        self.peak_tflops = peak_tflops
        self.loss_sum = torch.zeros((), device=device)
        self.norm_sum = torch.zeros((), device=device)
        self.terms = 0
        self.samples = 0
        self.norms = 0
        self.steps = 0
        self.data_seconds = 0.0
        self.session_data_seconds = 0.0
        self.excluded = 0.0
        self.since = time.perf_counter()

    def tally(self) -> Optional[Callable[["torch.Tensor", "torch.Tensor"], None]]:
        """Where the step's forward passes add their outputs for the training metrics: ``fn(outputs,
        targets)`` for the first pass of a step, None for a recomputation within it (a step wrapper's
        second pass) and when the metrics are off."""
        if self.metrics is None or self._tallied:
            return None
        self._tallied = True
        return self.metrics.observe

    def add(self, loss_sum: "torch.Tensor") -> None:
        """Add a detached loss sum, and the step's training metrics (no host sync)."""
        self.loss_sum += loss_sum
        if self.metrics is not None:
            self.metrics.commit()

    def step_done(self, samples: int, terms: int, grad_norm: Optional["torch.Tensor"]) -> None:
        if self.metrics is not None:  # a step counted without its loss (skipped) drops its metrics too
            self.metrics.discard()
            self._tallied = False
        self.samples += samples
        self.terms += terms
        self.steps += 1
        if grad_norm is not None:
            self.norm_sum += grad_norm.detach()
            self.norms += 1

    def timed(self, batches: Iterable[Any]) -> Iterator[Any]:
        """``batches``, adding the time spent waiting for each one to the data-wait reading."""
        iterator = iter(batches)
        while True:
            tic = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            waited = time.perf_counter() - tic
            self.data_seconds += waited
            self.session_data_seconds += waited
            yield batch

    def exclude(self, seconds: float) -> None:
        """Time spent outside training (evaluation, checkpoints, compilation) that throughput should not count."""
        self.excluded += seconds

    def should_log(self, step: int) -> bool:
        return step % self.every == 0

    def finite(self) -> bool:
        """Whether every loss and gradient norm since the last reading was finite (one host sync)."""
        import torch

        finite = bool(torch.isfinite(self.loss_sum + self.norm_sum))
        return finite if self.dist is None else not self.dist.any(not finite)

    def read(self) -> Dict[str, float]:
        """The readings since the last call (one host sync), then start over."""
        loss_sum = self.loss_sum if self.dist is None else self.dist.sum(self.loss_sum.clone())
        values = {"train/loss": float(loss_sum) / max(1, self.terms)}  # waits for the device first
        if self.metrics is not None:
            values.update(self.metrics.read(self.dist, values["train/loss"]))
        now = time.perf_counter()
        seconds = max(1e-9, now - self.since - self.excluded)
        if self.norms:
            values["train/grad_norm"] = float(self.norm_sum) / self.norms
        values.update(self.throughput(seconds))
        self.loss_sum.zero_()
        self.norm_sum.zero_()
        self.terms = self.samples = self.norms = self.steps = 0
        self.excluded = self.data_seconds = 0.0
        self.since = now
        return values

    def throughput(self, seconds: float) -> Dict[str, float]:
        values = speed(seconds, self.samples, self.steps, self.data_seconds, self.terms if self.tokens else None,
                       self.memory() if self.memory else None, self.flops_per_sample, self.peak_tflops)
        return {f"train/{key}": value for key, value in values.items()}

    def state_dict(self) -> Dict[str, Any]:
        return {"loss_sum": self.loss_sum.cpu(), "norm_sum": self.norm_sum.cpu(), "terms": self.terms,
                "samples": self.samples, "norms": self.norms,
                **(self.metrics.state_dict() if self.metrics is not None else {})}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.loss_sum.copy_(state["loss_sum"])
        self.norm_sum.copy_(state["norm_sum"])
        self.terms, self.samples, self.norms = state["terms"], state["samples"], state["norms"]
        if self.metrics is not None:
            self.metrics.load_state_dict(state)

