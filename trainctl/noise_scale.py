"""`logging.gradient_noise_scale=true`: the gradient noise scale B_simple (McCandlish et al. 2018, "An
Empirical Model of Large-Batch Training") estimated during a normal run, from what an accumulation window
gives for free, logged as `train/gns` at each log step.

After the first micro-batch's backward pass of a window, ``p.grad`` holds that micro-batch's gradient
alone, scaled by (its loss terms / the window's terms) - under DDP still local to the process, whose
gradients are exchanged only after the window's last micro-batch. Rescaled, its squared norm is
|G_small|^2 over B_small = that micro-batch's samples. Before clipping and the optimizer step ``p.grad``
holds the window's gradient (averaged across the DDP ranks): |G_big|^2 over B_big = the window's samples x
processes. From the two, :func:`unbiased_estimates` gives per-step unbiased estimates of
|G|^2 and tr(Sigma), with the finite-population correction for batches drawn without replacement from the
training split within an epoch (:func:`unbiased_estimates`, which `trainctl probe` uses too); B_simple = tr(Sigma) / |G|^2 of their moving averages (per measured step,
decay :data:`EMA_DECAY`, bias-corrected as Adam's), as in the paper's own measurements: a ratio of
averages, not an average of the (very noisy) per-step ratios.

Cost: two squared-norm reductions over the gradients per measured step (foreach ops on the device, no
copy of the gradients, no host sync); the readings reach the host in one transfer at each log step. The
training is unchanged: the gradients are only read. Each process estimates from its own first
micro-batch (rank 0's estimate is logged). Refused without accumulation (nothing to compare: under DDP
the first micro-batch's gradient is then already averaged across ranks) and under FSDP (sharded
gradients).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from trainctl.callbacks import Callback
from trainctl.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from trainctl.build import Run
    from trainctl.state import RunState

EMA_DECAY = 0.99
"""Per measured step: the moving averages remember about the last 100 steps' estimates, which a single
step's estimate of |G|^2 (often negative where the noise dominates) needs."""


def unbiased_estimates(small_sq: float, big_sq: float, b_small: float, b_big: float,
                       population: Optional[int] = None) -> Tuple[float, float]:
    """(|G|^2, tr(Sigma)) from the squared gradient norms at two batch sizes (McCandlish et al., A.1).

    ``population``: batches drawn without replacement from N samples (an epoch's batches), where
    E|G_B|^2 = |G|^2 + tr(Sigma) (N - B) / (B (N - 1)) for the dataset's own gradient and covariance;
    None: independent samples, E|G_B|^2 = |G|^2 + tr(Sigma) / B (the paper's formulas). Without the
    correction B_simple comes out too large by a factor 1 / (1 - B_simple / (N - 1))."""
    if not b_big > b_small > 0 or (population is not None and population < max(2, b_big)):
        raise ValueError(f"need 0 < B_small < B_big <= N, got {b_small}, {b_big}, N={population}")

    def c(b: float) -> float:  # the weight of tr(Sigma) in E|G_B|^2
        return 1.0 / b if population is None else (population - b) / (b * (population - 1))
    trace = (small_sq - big_sq) / (c(b_small) - c(b_big))
    g2 = big_sq - c(b_big) * trace
    return g2, trace


def squared_norm(grads: List["torch.Tensor"]) -> "torch.Tensor":
    """The squared L2 norm of ``grads`` in float32, on their device (one foreach reduction, no sync)."""
    import torch

    if not grads:
        return torch.zeros(())
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()


class GradientNoiseScale(Callback):
    """Measures |G_small|^2 and |G_big|^2 on every ``every``-th optimizer step; ``population``: the number
    of training samples batches are drawn from without replacement (None: independent samples)."""

    name = "gradient_noise_scale"

    def __init__(self, every: int = 1, population: Optional[int] = None, decay: float = EMA_DECAY) -> None:
        self.every = every
        self.population = population
        self.decay = decay
        self.ema_g2 = self.ema_trace = 0.0
        self.steps = 0
        """Measured steps in the moving averages."""
        self.sum_g2 = self.sum_trace = 0.0
        """Sums of the per-step estimates over the whole run (:attr:`run_b_simple`)."""
        self.dropped = 0
        """Measured steps left out: a non-finite gradient (fp16 overflow, a skipped step)."""
        self._taken = -1  # the step whose first micro-batch was measured (a recompute does not measure again)
        self._small: Optional[Tuple["torch.Tensor", int, int]] = None
        self._pending: List["torch.Tensor"] = []
        self._sizes: List[Tuple[int, int]] = []

    def on_fit_start(self, run: "Run", state: "RunState") -> None:
        if self.population is None:  # an epoch draws its batches without replacement from the training split
            try:
                self.population = len(run.data.train.source)
            except TypeError:  # a source of unknown length: independent samples
                pass

    # --- the step: device work only ----------------------------------------------------------------

    def on_after_first_backward(self, run: "Run", state: "RunState", window: List[Any], terms: int) -> None:
        if self._taken == state.step or state.step % self.every:
            return
        self._taken = state.step
        x, y = window[0]
        # p.grad = this micro-batch's loss sum / the window's terms; its mean gradient is that x terms / its own
        factor = terms / run.loss.count(y)
        if run.precision.scales_loss:  # fp16: the loss scale of this step's backward passes
            factor /= run.precision.scale  # type: ignore[attr-defined]
        grads = [p.grad for p in run.clipper.params if p.grad is not None]
        window_samples = sum(len(xb) for xb, _ in window) * run.world_size
        self._small = (squared_norm(grads) * factor ** 2, len(x), window_samples)

    def on_before_optimizer_step(self, run: "Run", state: "RunState") -> None:
        if self._small is None:
            return
        small, b_small, b_big = self._small
        self._small = None
        if self._taken != state.step:
            return
        import torch

        big = squared_norm([p.grad for p in run.clipper.params if p.grad is not None])
        self._pending.append(torch.stack((small.to(big.device), big)))
        self._sizes.append((b_small, b_big))

    # --- log steps: the host side ------------------------------------------------------------------

    def _flush(self) -> None:
        """The pending readings to the host (one transfer), into the per-step estimates and averages."""
        if not self._pending:
            return
        import torch

        readings = torch.stack(self._pending).double().cpu().tolist()
        sizes, self._pending, self._sizes = self._sizes, [], []
        d = self.decay
        for (small, big), (b_small, b_big) in zip(readings, sizes):
            population = self.population if self.population is not None and self.population >= b_big else None
            if not (math.isfinite(small) and math.isfinite(big)) or b_big <= b_small:
                self.dropped += 1
                continue
            g2, trace = unbiased_estimates(small, big, b_small, b_big, population)
            self.ema_g2 = d * self.ema_g2 + (1 - d) * g2
            self.ema_trace = d * self.ema_trace + (1 - d) * trace
            self.sum_g2 += g2
            self.sum_trace += trace
            self.steps += 1

    @property
    def b_simple(self) -> float:
        """tr(Sigma) / |G|^2 from the moving averages (inf while the averaged |G|^2 is not positive)."""
        self._flush()
        if not self.steps:
            return math.nan
        return self.ema_trace / self.ema_g2 if self.ema_g2 > 0 else math.inf

    @property
    def run_b_simple(self) -> float:
        """tr(Sigma) / |G|^2 from the averages over every measured step of the run (fixed weights: the
        best estimate; during training it mixes the noise scales of the whole run)."""
        self._flush()
        if not self.steps:
            return math.nan
        return self.sum_trace / self.sum_g2 if self.sum_g2 > 0 else math.inf

    def on_log(self, run: "Run", state: "RunState") -> Dict[str, float]:
        b_simple = self.b_simple
        if not self.steps:
            return {}
        correction = 1 - self.decay ** self.steps  # Adam's bias correction (cancels in the ratio)
        return {"train/gns": b_simple, "train/gns_grad_sq": self.ema_g2 / correction,
                "train/gns_trace": self.ema_trace / correction}

    def state_dict(self) -> Dict[str, Any]:
        self._flush()
        return {"ema_g2": self.ema_g2, "ema_trace": self.ema_trace, "steps": self.steps, "sum_g2": self.sum_g2,
                "sum_trace": self.sum_trace, "dropped": self.dropped}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("ema_g2", "ema_trace", "steps", "sum_g2", "sum_trace", "dropped"):
            setattr(self, key, state[key])


def build_noise_scale(spec: Any, every: int = 1, population: Optional[int] = None) -> Optional[GradientNoiseScale]:
    """The callback of `logging.gradient_noise_scale` (None when off); refused where the gradients of one
    micro-batch are not there to read."""
    if not spec.logging.gradient_noise_scale:
        return None
    key = "logging.gradient_noise_scale"
    if spec.parallelism.name == "fsdp":
        raise ConfigError(key, "FSDP shards the gradients across the ranks, so no process holds a micro-batch's "
                          "whole gradient", "set logging.gradient_noise_scale=false, or use parallelism=ddp "
                          "(or `trainctl probe`)")
    if spec.trainer.grad_accum_steps < 2:
        raise ConfigError(key, "it compares one micro-batch's gradient with the accumulation window's, and "
                          "trainer.grad_accum_steps=1 gives a window of one micro-batch (under DDP, already "
                          "averaged across the ranks)", "set trainer.grad_accum_steps=2 or more (with a "
                          "smaller data.batch_size for the same effective batch), or measure it offline "
                          "with `trainctl probe`")
    return GradientNoiseScale(every, population)
