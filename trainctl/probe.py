"""What `trainctl probe` measures: the gradient noise scale and the largest per-device batch that fits.

Gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", Appendix A.1).
With |G_small|^2 and |G_big|^2 the squared norms of mean gradients over B_small and B_big samples,

    |G|^2     ~= (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~= (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

are unbiased estimates of the true gradient's squared norm and of the trace of the per-sample gradient
covariance; B_simple = tr(Sigma) / |G|^2 is the batch size at which the gradient noise equals the signal
(the critical batch size B_crit ~ B_simple). Each estimate of one step is very noisy, so B_simple is the
ratio of their averages over many steps (or of their moving averages). An accumulation window gives both
norms at once: each micro-batch is a small batch, the window's mean gradient the big one.

Largest batch: doubling, then bisection, over "does one training step at this batch fit?"; CUDA out of
memory, a CPU step above the memory limit (measured in a child process, so a big batch cannot kill the
probing process) or any error is a "no", never a crash.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Iterator, List, Optional, Sequence, Tuple

from trainctl.noise_scale import unbiased_estimates  # the formulas, shared with the in-run estimate

if TYPE_CHECKING:
    import torch

    from trainctl.batches import Batch, Batches
    from trainctl.build import Run
    from trainctl.spec import RunSpec

# --- the gradient noise scale --------------------------------------------------------------------------


def _ratio(trace: float, g2: float) -> float:
    return trace / g2 if g2 > 0 else math.inf


@dataclass
class NoiseScale:
    """B_simple from many steps' estimates: the ratio of the averages of tr(Sigma) and |G|^2 (unbiased
    for both, unlike an average of per-step ratios), and of their bias-corrected moving averages."""

    ema_decay: float = 0.95
    g2: List[float] = field(default_factory=list)
    trace: List[float] = field(default_factory=list)
    b_small: float = 0.0
    b_big: float = 0.0

    def add(self, small_sq: float, big_sq: float, b_small: float, b_big: float,
            population: Optional[int] = None) -> None:
        g2, trace = unbiased_estimates(small_sq, big_sq, b_small, b_big, population)
        self.g2.append(g2)
        self.trace.append(trace)
        self.b_small, self.b_big = b_small, b_big

    @property
    def steps(self) -> int:
        return len(self.g2)

    @property
    def b_simple(self) -> float:
        """tr(Sigma) / |G|^2 from the averages; inf while the averaged |G|^2 is not positive (the
        gradient is lost in the noise: measure more steps)."""
        if not self.g2:
            return math.nan
        return _ratio(sum(self.trace) / len(self.trace), sum(self.g2) / len(self.g2))

    @property
    def b_simple_ema(self) -> float:
        """The same ratio from moving averages (recent steps weigh more), bias-corrected as Adam's."""
        if not self.g2:
            return math.nan
        g2 = trace = 0.0
        for a, b in zip(self.g2, self.trace):
            g2 = self.ema_decay * g2 + (1 - self.ema_decay) * a
            trace = self.ema_decay * trace + (1 - self.ema_decay) * b
        return _ratio(trace, g2)  # the bias correction divides both by the same factor

    @property
    def stderr(self) -> float:
        """Jackknife standard error of :attr:`b_simple` (nan for fewer than 3 steps)."""
        n = len(self.g2)
        if n < 3:
            return math.nan
        g_sum, t_sum = sum(self.g2), sum(self.trace)
        leave_out = [_ratio((t_sum - t) / (n - 1), (g_sum - g) / (n - 1)) for g, t in zip(self.g2, self.trace)]
        if not all(math.isfinite(v) for v in leave_out):
            return math.inf
        mean = sum(leave_out) / n
        return math.sqrt((n - 1) / n * sum((v - mean) ** 2 for v in leave_out))

    def summary(self) -> dict:
        n = max(1, self.steps)  # averages of the per-step estimates
        return {"b_simple": self.b_simple, "b_simple_stderr": self.stderr, "b_simple_ema": self.b_simple_ema,
                "grad_sq_norm": sum(self.g2) / n, "trace_cov": sum(self.trace) / n, "steps": self.steps,
                "b_small": self.b_small, "b_big": self.b_big}


def squared_norm(tensors: Sequence["torch.Tensor"]) -> float:
    """The squared L2 norm of a list of tensors (one foreach op, one sync)."""
    import torch

    norms = torch._foreach_norm(list(tensors))
    return float(torch.stack([n.float() for n in norms]).square().sum())


def measure_noise(model: "torch.nn.Module", loss: Callable[..., "torch.Tensor"], count: Callable[[Any], int],
                  windows: Iterable[List["Batch"]], steps: int,
                  autocast: Callable[[], ContextManager] = nullcontext,
                  transforms: Sequence[Callable[[Any, Any], "Batch"]] = (),
                  progress: Optional[Callable[[int, NoiseScale], None]] = None,
                  population: Optional[int] = None) -> NoiseScale:
    """B_simple over ``steps`` accumulation windows at the model's current weights (nothing is stepped):
    each micro-batch's mean gradient gives |G_small|^2 (averaged over the window), the window's mean
    gradient |G_big|^2. ``loss(outputs, y)`` is a loss sum over ``count(y)`` terms. Windows must hold
    at least two micro-batches of equal size; ``population``: see :func:`unbiased_estimates`."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    estimate = NoiseScale()
    for window in windows:
        if estimate.steps >= steps:
            break
        big: Optional[List[torch.Tensor]] = None
        small_sq = 0.0
        for x, y in window:
            for transform in transforms:
                x, y = transform(x, y)
            with autocast():
                loss_sum = loss(model(x), y)
            grads = list(torch.autograd.grad(loss_sum.float() / count(y), params, materialize_grads=True))
            small_sq += squared_norm(grads)
            if big is None:
                big = grads
            else:
                torch._foreach_add_(big, grads)
        assert big is not None
        torch._foreach_div_(big, len(window))
        b_small = len(window[0][0])
        estimate.add(small_sq / len(window), squared_norm(big), b_small, b_small * len(window), population)
        if progress is not None:
            progress(estimate.steps, estimate)
    return estimate


def full_windows(batches: "Batches", size: int) -> Iterator[List["Batch"]]:
    """Endless accumulation windows of ``size`` equal micro-batches, epoch after epoch (a shorter last
    batch of an epoch never enters one)."""
    from trainctl.batches import windows_of

    epoch = 0
    while True:
        for window in windows_of(batches.epoch(epoch), size):
            if len(window) == size and len({len(x) for x, _ in window}) == 1 and len(window[0][0]) == batches.batch_size:
                yield window
        epoch += 1


def run_noise_scale(run: "Run", steps: int, accum: int, warmup_steps: int = 0,
                    progress: Optional[Callable[[str], None]] = None) -> NoiseScale:
    """B_simple of a built run: ``warmup_steps`` real training steps first (the run's own loop, optimizer
    and schedule), then ``steps`` windows of ``accum`` micro-batches of `data.batch_size` at those fixed weights."""
    from trainctl.batches import windows_of
    from trainctl.errors import ConfigError
    from trainctl.runner import Runner

    train = run.data.train
    if len(train.source) < accum * train.batch_size:
        raise ConfigError("data.batch_size", f"the training split has {len(train.source)} samples, too few for "
                          f"one window of {accum} x {train.batch_size}",
                          f"set data.batch_size={max(1, len(train.source) // accum)} or less, or --accum 2")
    say = progress or (lambda text: None)
    if warmup_steps:
        runner = Runner(run)
        epoch = 0
        while runner.state.step < warmup_steps:
            for window in windows_of(train.epoch(epoch), run.grad_accum_steps):
                runner.train_step(window)
                if runner.state.step >= warmup_steps:
                    break
            epoch += 1
        say(f"trained {warmup_steps} steps first (train/loss {runner.meter.read().get('train/loss', math.nan):.4g})")
    run.model.train()
    train.shuffle = True  # random batches, drawn without replacement within an epoch (the population correction)

    def tick(done: int, estimate: NoiseScale) -> None:
        if done % max(1, steps // 5) == 0 or done == steps:
            say(f"  noise scale: {done}/{steps} windows, B_simple ~ {estimate.b_simple:.1f}")
    return measure_noise(run.train_model or run.model, run.loss, run.loss.count, full_windows(train, accum), steps,
                         run.precision.autocast, [t for t in run.transforms], tick, len(train.source))


def recommend(b_simple: float, max_batch: Optional[int], n_train: int, world: int = 1,
              current_batch: int = 1) -> Optional[Tuple[int, int]]:
    """(data.batch_size, trainer.grad_accum_steps) whose effective batch (batch x accumulation x
    processes) is about B_simple, with the per-device batch at most ``max_batch`` (None: not measured;
    the current batch size is kept as the largest known to fit). None when B_simple is not resolved."""
    if not math.isfinite(b_simple) or b_simple <= 0:
        return None
    target = min(max(1, round(b_simple)), n_train)
    largest = max_batch if max_batch is not None else max(current_batch, math.ceil(target / world))
    if largest < 1:
        return None
    accum = math.ceil(target / (largest * world))
    return max(1, math.ceil(target / (accum * world))), accum


# --- the largest batch that fits ------------------------------------------------------------------------


@dataclass
class Trial:
    batch: int
    fits: bool
    note: str = ""
    peak_mib: Optional[float] = None


@dataclass
class SearchResult:
    largest: int  # the largest batch seen to fit (0: not even one sample)
    trials: List[Trial]
    cap: int
    seconds: float = 0.0
    limit_mib: Optional[float] = None  # CPU: the memory limit the candidates were measured against

    @property
    def capped(self) -> bool:
        return self.largest >= self.cap


Measure = Callable[[int], Any]
"""batch -> bool, or (bool, note) or (bool, note, peak MiB): does one training step at this batch fit?"""


def _attempt(measure: Measure, batch: int) -> Trial:
    try:
        result = measure(batch)
    except Exception as exc:  # whatever goes wrong at a batch size means it does not fit; the search goes on
        return Trial(batch, False, f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
    ok, note, peak = (tuple(result) + ("", None))[:3] if isinstance(result, tuple) else (result, "", None)
    return Trial(batch, bool(ok), note, peak)


def extrapolate(limit_mib: float, margin: float = 0.9) -> Callable[[List[Trial]], Optional[int]]:
    """The batch at which the memory line through the last two fitting trials reaches ``margin`` x
    ``limit_mib`` (a step's memory is a fixed part plus a part per sample); None without two peaks."""
    def guess(trials: List[Trial]) -> Optional[int]:
        points = [(t.batch, t.peak_mib) for t in trials if t.fits and t.peak_mib is not None][-2:]
        if len(points) < 2:
            return None
        (b1, p1), (b2, p2) = points
        slope = (p2 - p1) / (b2 - b1)
        if slope <= 0:
            return 2**62
        return int(b2 + (margin * limit_mib - p2) / slope)
    return guess


def largest_batch(measure: Measure, start: int, cap: int, resolution: float = 0.0,
                  progress: Optional[Callable[[Trial], None]] = None,
                  guess: Optional[Callable[[List[Trial]], Optional[int]]] = None) -> SearchResult:
    """The largest batch in [1, cap] that ``measure`` accepts, assuming larger batches need more memory:
    doubling from ``start`` until one does not fit (or ``cap`` is reached), then bisection until the
    bracket is exact (``resolution=0``) or narrower than ``resolution`` x the batch known to fit.
    ``guess(trials)`` may propose a larger next batch than the doubling (e.g. :func:`extrapolate`)."""
    began = time.perf_counter()
    cap = max(1, cap)
    trials: List[Trial] = []

    def attempt(batch: int) -> bool:
        trial = _attempt(measure, batch)
        trials.append(trial)
        if progress is not None:
            progress(trial)
        return trial.fits

    good, bad = 0, cap + 1  # the largest batch known to fit, the smallest known not to
    batch = min(max(1, start), cap)
    while True:
        if not attempt(batch):
            bad = batch
            break
        good = batch
        if batch >= cap:
            break
        proposed = guess(trials) if guess is not None else None
        batch = min(max(2 * batch, proposed or 0), cap)
    while bad - good > 1 and not (good and bad - good <= resolution * good):
        middle = (good + bad) // 2
        if attempt(middle):
            good = middle
        else:
            bad = middle
    return SearchResult(good, trials, cap, time.perf_counter() - began)


def one_step(run: "Run", batch: int) -> None:
    """One training step (forward, backward, optimizer step) on the first ``batch`` training samples."""
    from trainctl.runner import Runner

    train = run.data.train
    train.batch_size = batch
    Runner(run).train_step([train.first()])


def cuda_measure(run: "Run") -> Measure:
    """A step at the candidate batch in this process; CUDA out of memory is a "no" (the cache is emptied)."""
    import gc

    import torch

    def measure(batch: int) -> Tuple[bool, str]:
        torch.cuda.reset_peak_memory_stats(run.device)
        try:
            one_step(run, batch)
            torch.cuda.synchronize(run.device)
            return True, f"peak {torch.cuda.max_memory_allocated(run.device) / 2**20:.0f} MiB"
        except torch.cuda.OutOfMemoryError:
            return False, "CUDA out of memory"
        finally:
            run.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
    return measure


def _proc_mib(path: str, key: str) -> Optional[float]:
    """A "key: N kB" line of a /proc file, in MiB (None where there is no such file or line)."""
    try:
        with open(path) as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith(key)), None)
    except OSError:
        return None


def available_mib() -> float:
    """Memory available to a new process (MemAvailable), else the physical memory."""
    found = _proc_mib("/proc/meminfo", "MemAvailable:")
    return found if found is not None else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_measure(spec: "RunSpec", base_dir: str, limit_mib: float, timeout: float = 600.0) -> Measure:
    """A step at the candidate batch in a child process: it fits when the child's peak resident memory
    stays within ``limit_mib``. A child that grows past the limit is stopped at once."""
    import dataclasses
    import pickle
    import signal
    import subprocess
    import tempfile

    def measure(batch: int) -> Tuple[Any, ...]:
        child_spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, batch_size=batch))
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([sys.executable, "-m", "trainctl.probe", base_dir], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=err)
            assert proc.stdin is not None
            with suppress(BrokenPipeError):  # a child that failed at once is reported below
                proc.stdin.write(pickle.dumps(child_spec))
                proc.stdin.close()
            deadline, stopped = time.monotonic() + timeout, ""
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                late, rss = time.monotonic() > deadline, _proc_mib(f"/proc/{proc.pid}/status", "VmRSS:") or 0.0
                if not stopped and (rss > limit_mib or late):
                    stopped = f"no answer in {timeout:.0f} s" if late else "above the limit"
                    os.kill(proc.pid, signal.SIGKILL)
                time.sleep(0.02)
            proc.returncode = os.waitstatus_to_exitcode(status)
            peak = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2**20
            if stopped:
                return False, f"stopped {stopped} (at {peak:.0f} MiB)", peak
            if proc.returncode:
                err.seek(0)
                lines = [s for s in err.read().decode(errors="replace").splitlines() if s.strip()]
                return False, f"the step failed (exit {proc.returncode}): {lines[-1][:200] if lines else ''}"
        return peak <= limit_mib, f"peak {peak:.0f} MiB", peak
    return measure


def _child() -> None:
    """`python -m trainctl.probe BASE_DIR` with a pickled spec on stdin: one training step, then exit."""
    import pickle

    from trainctl.build import build_run

    spec = pickle.loads(sys.stdin.buffer.read())
    run = build_run(spec, base_dir=sys.argv[1])
    one_step(run, spec.data.batch_size)


if __name__ == "__main__":
    _child()
