"""Weight and gradient histograms of every trainable parameter, written to TensorBoard every
`logging.histograms_every_n_steps` optimizer steps (off by default).

On a due step the callback looks at the parameters just before the optimizer step: the gradients of the
step (unscaled, before clipping) and the weights they were taken at, both written at that step's number
(`weights/<name>`, `grads/<name>`). Each tensor is binned where it lives - its minimum, maximum, sum, sum
of squares and the counts of :data:`BINS` equal-width buckets between minimum and maximum, non-finite
values left out - so nothing is copied to the host until the next record is written, and then in one
transfer for all of them. Other steps cost nothing beyond a modulo. Under DDP rank 0 writes (the
gradients are already averaged across ranks); FSDP, whose parameters are sharded, is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from trainctl.callbacks import Callback
from trainctl.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from trainctl.build import Run
    from trainctl.state import RunState

BINS = 64
"""Equal-width buckets per histogram (TensorBoard's own `add_histogram` uses 30 on a log scale)."""


class Histograms(Callback):
    name = "histograms"

    def __init__(self, every_n_steps: int) -> None:
        self.every = every_n_steps
        self.writer: Any = None
        """The run's :class:`trainctl.writer.MetricsWriter` (rank 0 only: the other ranks write nothing)."""

    def attach_writer(self, writer: Any) -> None:
        self.writer = writer

    def on_before_optimizer_step(self, run: "Run", state: "RunState") -> None:
        step = state.step + 1  # the number of the step being taken
        if self.writer is None or step % self.every:
            return
        from trainctl.performance import clean_name

        taken = self.writer.histograms
        for name, param in run.model.named_parameters():
            if not param.requires_grad:  # trainable ones only (peft, freezing; unfrozen ones join later)
                continue
            name = clean_name(name)
            taken.append((step, f"weights/{name}", summarize(param.detach())))
            if param.grad is not None:
                taken.append((step, f"grads/{name}", summarize(param.grad.detach())))


def summarize(tensor: "torch.Tensor", bins: int = BINS) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """(min, max, sum, sum of squares) and the counts of ``bins`` equal-width buckets over [min, max] of
    the finite values of ``tensor``, computed on its device without a host sync."""
    import torch

    x = tensor.float().flatten()
    finite = torch.isfinite(x)
    lo = torch.where(finite, x, torch.inf).amin()
    hi = torch.where(finite, x, -torch.inf).amax()
    width = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    index = ((x - lo) / width * bins).clamp(0, bins - 1)
    index = torch.where(finite, index, bins).long()  # non-finite values go to a bucket that is dropped
    counts = torch.bincount(index, minlength=bins + 1)[:bins]
    values = torch.where(finite, x, 0.0)
    return torch.stack((lo, hi, values.sum(), (values * values).sum())), counts


def write_histograms(tb: Any, pending: List[Tuple[int, str, Tuple["torch.Tensor", "torch.Tensor"]]]) -> None:
    """Write the histograms taken since the last record to TensorBoard's ``tb`` (a SummaryWriter)."""
    import torch

    stats = torch.stack([s for _, _, (s, _) in pending]).double().cpu().tolist()
    counts = torch.stack([c for _, _, (_, c) in pending]).cpu().tolist()
    for (step, tag, _), (lo, hi, total, squares), bucket_counts in zip(pending, stats, counts):
        num = sum(bucket_counts)
        if not num:  # no finite value
            continue
        bins = len(bucket_counts)
        limits = [lo + (hi - lo) * (i + 1) / bins for i in range(bins)]
        tb.add_histogram_raw(tag, min=lo, max=hi, num=num, sum=total, sum_squares=squares,
                             bucket_limits=limits, bucket_counts=bucket_counts, global_step=step)


def build_histograms(spec: Any) -> Optional[Histograms]:
    """The histogram callback of `logging.histograms_every_n_steps` (None when off)."""
    every = spec.logging.histograms_every_n_steps
    if every is None:
        return None
    if spec.parallelism.name == "fsdp":
        raise ConfigError("logging.histograms_every_n_steps", "FSDP shards every parameter across the ranks, "
                          "and histograms of the whole parameters would gather each one on rank 0",
                          "set logging.histograms_every_n_steps=null, or use parallelism=ddp to look at them")
    return Histograms(every)
