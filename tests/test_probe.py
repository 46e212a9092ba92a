"""`trainctl probe`: the gradient noise scale against its exact value, and the largest-batch search."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import build, trainctl
from trainctl import probe

LINEAR = ["data=synthetic", "data.task=regression", "data.n_samples=4000", "data.noise=40", "loss=mse",
          "model.depth=0", "model.dropout=0", "data.batch_size=32", "trainer.device=cpu"]


def test_estimates_recover_norm_and_trace_from_expected_norms():
    """Fed the expected squared norms E|G_B|^2 = |G|^2 + tr/B (independent samples) or with the finite
    population factor (N - B) / (N - 1), the estimates give |G|^2 and tr(Sigma) back exactly."""
    g2, tr = 2.5, 300.0
    got = probe.unbiased_estimates(g2 + tr / 8, g2 + tr / 32, 8, 32)
    assert got == pytest.approx((g2, tr), rel=1e-12)
    n = 100
    expected = [g2 + tr / b * (n - b) / (n - 1) for b in (8, 32)]
    assert probe.unbiased_estimates(*expected, 8, 32, population=n) == pytest.approx((g2, tr), rel=1e-12)
    with pytest.raises(ValueError):
        probe.unbiased_estimates(1.0, 1.0, 8, 8)


def test_b_simple_is_the_ratio_of_the_averages():
    est = probe.NoiseScale(ema_decay=0.5)
    steps = [(3.0, 1.0), (5.0, 2.0), (1.0, 0.5)]  # (|G_small|^2, |G_big|^2) at B = 2 and 8
    pairs = [probe.unbiased_estimates(s, b, 2, 8) for s, b in steps]
    for s, b in steps:
        est.add(s, b, 2, 8)
    mean_g2, mean_tr = (sum(p[i] for p in pairs) / 3 for i in (0, 1))
    assert est.b_simple == pytest.approx(mean_tr / mean_g2)
    assert est.b_simple != pytest.approx(sum(t / g for g, t in pairs) / 3)  # not the mean of the ratios
    ema_g = ema_t = 0.0
    for g, t in pairs:
        ema_g, ema_t = 0.5 * ema_g + 0.5 * g, 0.5 * ema_t + 0.5 * t
    assert est.b_simple_ema == pytest.approx(ema_t / ema_g)
    loo = [(mean_tr * 3 - t) / (mean_g2 * 3 - g) for g, t in pairs]  # jackknife by hand
    mean = sum(loo) / 3
    assert est.stderr == pytest.approx(math.sqrt(2 / 3 * sum((v - mean) ** 2 for v in loo)))


def _exact_b_simple(run) -> float:
    """tr(Sigma) / |G|^2 over the whole training split from per-sample gradients written out by hand:
    for f(x) = w.x + b and the loss (f(x) - y)^2, the gradient is 2 (f(x) - y) (x, 1)."""
    with torch.no_grad():
        return _exact(run)


def _exact(run) -> float:
    x, y = run.data.train.source.x.double(), run.data.train.source.y.double().reshape(-1)
    head = run.model.head
    residual = x @ head.weight.double()[0] + head.bias.double()[0] - y
    grads = 2 * residual[:, None] * torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    mean = grads.mean(0)
    trace = (grads - mean).square().sum(1).mean()
    return float(trace / mean.square().sum())


@pytest.mark.parametrize("warmup", [0, 200])
def test_noise_scale_of_a_linear_model_matches_the_exact_value(warmup):
    """y = w*.x + Gaussian noise, MSE, a linear model: at the initial weights (signal-dominated) and after
    200 training steps (noise-dominated), the estimate is within 25% (in practice a few %) of the exact value."""
    run = build(LINEAR + ["optimizer=sgd", "optimizer.lr=0.01"])
    estimate = probe.run_noise_scale(run, steps=150, accum=4, warmup_steps=warmup)
    exact = _exact_b_simple(run)
    assert estimate.b_small == 32 and estimate.b_big == 128
    assert estimate.b_simple == pytest.approx(exact, rel=0.25)
    if warmup:
        assert exact > 200  # the weights moved to where the noise dominates


def test_noise_is_measured_without_changing_the_weights():
    run = build(LINEAR)
    before = [p.detach().clone() for p in run.model.parameters()]
    probe.run_noise_scale(run, steps=3, accum=2)
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
    assert all(p.grad is None for p in run.model.parameters())


@pytest.mark.parametrize("start,cap", [(1, 5000), (64, 5000), (3000, 5000), (64, 200), (7, 777)])
@pytest.mark.parametrize("threshold", [1, 2, 63, 64, 65, 500, 777, 1000])
def test_search_finds_the_threshold_exactly(start, cap, threshold):
    seen = []

    def fits(batch):
        seen.append(batch)
        return batch <= threshold
    result = probe.largest_batch(fits, start, cap)
    assert result.largest == min(threshold, cap)
    assert result.capped == (threshold >= cap)
    assert len(seen) <= 2 * math.log2(cap) + 2 and len(set(seen)) == len(seen)


@pytest.mark.parametrize("threshold", [1, 40, 333, 1000])
def test_search_with_a_fake_memory_function_never_raises(threshold):
    """A fake step needing 100 + 3 x batch MiB against a limit: the batch search, with the extrapolation
    the CPU probe uses, finds the exact threshold; above it the measurement raises, and is caught."""
    limit = 100 + 3 * threshold

    def measure(batch):
        peak = 100 + 3 * batch
        if peak > limit:
            raise MemoryError(f"a step of {batch} needs {peak} MiB")
        return True, f"peak {peak} MiB", float(peak)
    result = probe.largest_batch(measure, 16, 100_000, 0.0, guess=probe.extrapolate(limit))
    assert result.largest == threshold
    assert any("MemoryError" in t.note for t in result.trials if not t.fits)

    def broken(batch):
        raise RuntimeError("nothing fits")
    assert probe.largest_batch(broken, 16, 1000).largest == 0


def test_a_resolution_stops_the_bisection_early():
    result = probe.largest_batch(lambda b: b <= 1000, 64, 100_000, resolution=0.125)
    assert 1000 * (1 - 0.125) <= result.largest <= 1000
    assert len(result.trials) < len(probe.largest_batch(lambda b: b <= 1000, 64, 100_000).trials)


def test_recommendation_reaches_b_simple_within_the_largest_batch():
    assert probe.recommend(600.4, 256, 10_000) == (200, 3)  # 3 windows of 200 (256 would overshoot)
    assert probe.recommend(100, 256, 10_000) == (100, 1)
    assert probe.recommend(5000, 1000, 3000) == (1000, 3)  # capped by the training split
    assert probe.recommend(1000, 100, 10_000, world=4) == (84, 3)  # 84 x 3 x 4 = 1008
    assert probe.recommend(math.inf, 256, 10_000) is None
    assert probe.recommend(100, 0, 10_000) is None


def test_cpu_measure_runs_a_step_in_a_child_and_reads_its_peak(tmp_path):
    """A real child process: the digits MLP fits a generous limit and does not fit 1 MiB."""
    from conftest import compose

    spec = compose(["trainer.device=cpu"])
    ok, note, peak = probe.cpu_measure(spec, str(tmp_path), 100_000)(32)
    assert ok and 50 < peak < 100_000, note
    ok, note, peak = probe.cpu_measure(spec, str(tmp_path), 1)(32)
    assert not ok and "above the limit" in note


@pytest.mark.slow
def test_probe_cli_on_digits_prints_a_recommendation(tmp_path):
    out = trainctl(["probe", "data.batch_size=256", "--steps", "10", "--accum", "2"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "largest batch: 1437 (all of the training split)" in out.stdout
    assert "B_simple = " in out.stdout and "recommended: data.batch_size=" in out.stdout
    assert not any(tmp_path.iterdir())  # nothing written
    bad = trainctl(["probe", "--accum", "1"], tmp_path)
    assert bad.returncode == 2 and "--accum" in bad.stderr and "Traceback" not in bad.stderr
