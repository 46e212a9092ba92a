"""`logging.gradient_noise_scale=true`: the gradient noise scale estimated during a run from the first
micro-batch's gradient and the accumulation window's, against its exact value, without changing training."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build, compose, stop_then_resume
from test_probe import LINEAR, _exact_b_simple
from trainctl.errors import ConfigError
from trainctl.probe import unbiased_estimates
from trainctl.runner import Runner

QUIET = ["trainer.max_epochs=null", "logging.progress=none", "logging.tensorboard=false",
         "trainer.eval_every_n_epochs=null"]
GNS = ["logging.gradient_noise_scale=true"]


def _gns(run):
    return next(c for c in run.callbacks if c.name == "gradient_noise_scale")


def _fixed_weights_run(weights=None, steps=150):
    """The linear model at fixed weights (lr ~ 0), windows of 4 micro-batches of 32."""
    run = build(LINEAR + QUIET + GNS + ["optimizer=sgd", "optimizer.lr=1e-12", "trainer.grad_accum_steps=4",
                                        f"trainer.max_steps={steps}"])
    if weights is not None:
        run.model.load_state_dict(weights)
    return run


@pytest.mark.parametrize("warmup", [0, 70])
def test_in_run_estimate_of_a_linear_model_matches_the_exact_value(warmup):
    """y = w*.x + Gaussian noise, MSE: at the initial weights (B_simple ~ 23, signal-dominated) and after 70
    training steps (B_simple ~ 300, above the window's 128 samples) the in-run B_simple over 150 steps
    is within 25% of tr(Sigma) / |G|^2 computed exactly from per-sample gradients."""
    weights = None
    if warmup:
        trained = build(LINEAR + QUIET + ["optimizer=sgd", "optimizer.lr=0.01", f"trainer.max_steps={warmup}"])
        Runner(trained).fit()
        weights = trained.model.state_dict()
    run = _fixed_weights_run(weights)
    runner = Runner(run)
    runner.fit()
    gns, exact = _gns(run), _exact_b_simple(run)
    assert gns.steps == 150 and gns.dropped == 0
    assert (exact > 200) == bool(warmup)
    assert gns.run_b_simple == pytest.approx(exact, rel=0.25)
    assert runner.final["train/gns"] == pytest.approx(exact, rel=0.35)  # the moving average, logged
    assert runner.final["train/gns"] == pytest.approx(runner.final["train/gns_trace"] / runner.final["train/gns_grad_sq"])


def test_the_readings_are_the_squared_norms_of_the_two_mean_gradients():
    """|G_small|^2: the first micro-batch's mean gradient; |G_big|^2: the window's; each computed here
    independently with torch.autograd.grad on the same micro-batches."""
    run = _fixed_weights_run(steps=1)
    seen = []
    real_flush = type(_gns(run))._flush

    def capture(self):
        if not self._pending:
            return
        seen.extend(torch.stack(self._pending).tolist())
        seen.extend(self._sizes)
        real_flush(self)
    windows = []
    original = Runner.train_step

    def keep(self, window):
        windows.append(window)
        original(self, window)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(_gns(run)), "_flush", capture)
        mp.setattr(Runner, "train_step", keep)
        Runner(run).fit()
        assert _gns(run).b_simple > 0  # reading it moves the step's readings to the host
    (small, big), (b_small, b_big) = seen
    params = [p for p in run.model.parameters()]

    def mean_grad(batches):
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        out = run.model(x)
        return torch.autograd.grad(torch.nn.functional.mse_loss(out, y.reshape(out.shape)), params)
    window = windows[0]
    assert (b_small, b_big) == (32, 128)
    assert small == pytest.approx(sum(g.square().sum() for g in mean_grad(window[:1])).item(), rel=1e-4)
    assert big == pytest.approx(sum(g.square().sum() for g in mean_grad(window)).item(), rel=1e-4)
    g2, trace = unbiased_estimates(small, big, 32, 128, len(run.data.train.source))
    assert _gns(run).sum_g2 == pytest.approx(g2) and _gns(run).sum_trace == pytest.approx(trace)


def test_training_is_unchanged_bit_for_bit():
    args = LINEAR + QUIET + ["optimizer=adamw", "optimizer.lr=0.01", "trainer.grad_accum_steps=3",
                             "trainer.max_steps=25", "regularization.max_grad_norm=1.0"]
    off, on = build(args), build(args + GNS)
    runner_off = Runner(off)
    assert runner_off.hooks["on_after_first_backward"] == []  # off: the hook is never called
    runner_off.fit()
    Runner(on).fit()
    assert all(torch.equal(a, b) for a, b in zip(off.model.parameters(), on.model.parameters()))
    assert _gns(on).run_b_simple > 0 and _gns(on).steps == 25  # every step measured


def test_resume_continues_the_moving_averages_exactly(tmp_path, monkeypatch):
    """Interrupted between two log steps and resumed: the same `train/gns` records as an uninterrupted run."""
    from trainctl.job import train

    args = LINEAR + GNS + ["logging.progress=none", "logging.tensorboard=false", "trainer.eval_every_n_epochs=null",
                           "trainer.max_epochs=null", "optimizer=sgd", "optimizer.lr=0.01", "trainer.grad_accum_steps=2",
                           "trainer.max_steps=20", "logging.log_every_n_steps=5"]
    train(compose(args), tmp_path / "reference", str(tmp_path))
    stop_then_resume(monkeypatch, args, tmp_path / "run", str(tmp_path), 7)

    def gns(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["train/gns"], r["train/gns_grad_sq"]) for r in map(json.loads, lines) if "train/gns" in r]
    reference = gns("reference")
    assert [s for s, _, _ in reference] == [5, 10, 15, 20]
    assert gns("run") == reference


def test_refused_where_there_is_nothing_to_compare():
    with pytest.raises(ConfigError, match="grad_accum_steps") as error:
        build(LINEAR + GNS)
    assert error.value.key == "logging.gradient_noise_scale"
    from trainctl.noise_scale import build_noise_scale

    spec = compose(LINEAR + GNS + ["trainer.grad_accum_steps=2"])
    assert build_noise_scale(spec) is not None
    fsdp = type("Spec", (), {"logging": spec.logging, "trainer": spec.trainer,
                             "parallelism": type("P", (), {"name": "fsdp"})()})()
    with pytest.raises(ConfigError, match="FSDP"):
        build_noise_scale(fsdp)


def test_fp16_readings_are_unscaled():
    """Under fp16 the first micro-batch's gradient still carries the loss scale (2^16 here): the readings
    match fp32's (up to fp16 rounding)."""
    runs = [_fixed_weights_run(steps=4) for _ in range(2)]
    runs[1] = build(LINEAR + QUIET + GNS + ["optimizer=sgd", "optimizer.lr=1e-12", "trainer.grad_accum_steps=4",
                                            "trainer.max_steps=4", "precision=fp16"])
    for run in runs:
        Runner(run).fit()
    a, b = (_gns(run) for run in runs)
    assert b.run_b_simple == pytest.approx(a.run_b_simple, rel=0.05)
    assert b.sum_trace == pytest.approx(a.sum_trace, rel=0.05)
