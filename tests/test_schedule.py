"""Schedules against hand-computed tables; every scheduler builds and steps the optimizer's lr."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from trainctl import schedule as S
from trainctl.schedule import SCHEDULERS, Horizon, build_scheduler, lr_factor

H = Horizon(total_steps=100, steps_per_epoch=10)

# (spec, {step: expected factor of the peak lr}), computed by hand from each schedule's definition.
TABLES = [
    (S.ConstantSpec(warmup_steps=4), {0: 1 / 5, 1: 2 / 5, 3: 4 / 5, 4: 1.0, 99: 1.0}),
    (S.ConstantSpec(warmup_fraction=0.1), {0: 1 / 11, 9: 10 / 11, 10: 1.0}),
    (S.StepSpec(step_size=3, gamma=0.5), {0: 1.0, 29: 1.0, 30: 0.5, 59: 0.5, 60: 0.25, 99: 0.125}),
    (S.StepSpec(step_size=7, gamma=0.5, unit="step"), {6: 1.0, 7: 0.5, 14: 0.25}),
    (S.MultiStepSpec(milestones=[2, 5], gamma=0.1), {19: 1.0, 20: 0.1, 49: 0.1, 50: 0.01, 99: 0.01}),
    (S.ExponentialSpec(gamma=0.9), {0: 1.0, 9: 1.0, 10: 0.9, 25: 0.81}),
    (S.ExponentialSpec(gamma=0.99, unit="step"), {3: 0.99 ** 3}),
    (S.CosineSpec(min_lr_ratio=0.1), {0: 1.0, 50: 0.55, 100: 0.1}),
    (S.WarmupCosineSpec(warmup_fraction=0.0, warmup_steps=10), {0: 1 / 11, 9: 10 / 11, 10: 1.0, 55: 0.5}),
    (S.CosineRestartsSpec(cycle_steps=20, cycle_mult=2.0), {0: 1.0, 10: 0.5, 19: 0.5 * (1 + math.cos(math.pi * 19 / 20)),
                                                           20: 1.0, 40: 0.5, 60: 1.0}),
    (S.CosineRestartsSpec(cycle_steps=20, cycle_decay=0.5), {20: 0.5, 30: 0.25, 40: 0.25}),
    (S.LinearSpec(warmup_fraction=0.0, warmup_steps=10), {10: 1.0, 55: 0.5, 100: 0.0}),
    (S.LinearSpec(warmup_fraction=0.0, min_lr_ratio=0.2), {0: 1.0, 50: 0.6}),
    (S.InverseSqrtSpec(warmup_fraction=0.0, warmup_steps=4), {0: 0.2, 4: 1.0, 16: 0.5, 40: math.sqrt(4 / 40)}),
    (S.WSDSpec(warmup_fraction=0.0, warmup_steps=10, decay_steps=20), {10: 1.0, 79: 1.0, 80: 1.0, 81: 0.95,
                                                                         90: 0.5, 99: 0.05}),
    (S.WSDSpec(warmup_fraction=0.0, decay_fraction=0.5, decay_shape="sqrt"), {49: 1.0, 75: 1 - math.sqrt(0.5)}),
]


@pytest.mark.parametrize("spec,table", TABLES, ids=lambda v: getattr(v, "name", ""))
def test_factor_table(spec, table):
    spec.validate()
    for step, expected in table.items():
        assert lr_factor(spec, step, H) == pytest.approx(expected, abs=1e-12), f"{spec.name} at step {step}"


def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr},
                            {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr * 10}], lr=lr, momentum=0.9)


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_every_scheduler_drives_the_optimizer_lr(name):
    spec = SCHEDULERS.get(name).spec()  # each option's defaults
    horizon = Horizon(total_steps=400, steps_per_epoch=10)
    optimizer = _optimizer()
    schedule = build_scheduler(spec, optimizer, horizon)
    seen = []
    for step in range(horizon.total_steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        schedule.step()
        if step % 10 == 9:
            schedule.on_eval({"val/loss": 1.0, spec.__dict__.get("monitor", "val/loss"): 1.0})
    for lrs in seen:  # a per-group lr multiplier survives every schedule (plateau stops at its eps, 1e-8)
        if lrs[0] > 1e-6:
            assert lrs[1] == pytest.approx(10 * lrs[0])
    if SCHEDULERS.get(name).factor is not None:
        assert [lrs[0] for lrs in seen] == pytest.approx([0.1 * lr_factor(spec, s, horizon) for s in range(400)])
    if name != "constant":
        assert len({round(lrs[0], 12) for lrs in seen}) > 1, "the lr moves"


def _ours(spec, horizon: Horizon, peak: float = 0.1) -> list:
    """The lr each optimizer step of ``horizon`` uses under trainctl's schedule."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    schedule = build_scheduler(spec, optimizer, horizon)
    out = []
    for _ in range(horizon.total_steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


def test_onecycle_shape():
    lrs = _ours(S.OneCycleSpec(pct_start=0.3, div_factor=25, final_div_factor=1e4), H)
    assert lrs[0] == pytest.approx(0.1 / 25)
    assert max(lrs) == pytest.approx(0.1, rel=1e-3) and 28 <= lrs.index(max(lrs)) <= 30
    assert lrs[-1] == pytest.approx(0.1 / 25 / 1e4, rel=1e-2)


def test_onecycle_refuses_an_optimizer_without_momentum():
    from trainctl.errors import ConfigError

    optimizer = torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="cycle_momentum"):
        build_scheduler(S.OneCycleSpec(), optimizer, H)


def test_plateau_reduces_after_patience_on_the_monitored_metric():
    optimizer = _optimizer(lr=0.1)
    schedule = build_scheduler(S.PlateauSpec(monitor="val/acc", mode="max", patience=2, factor=0.1), optimizer, H)
    lrs = []
    for acc in [0.5, 0.6, 0.59, 0.58, 0.57, 0.9]:
        schedule.step()  # a per-step call must not move a plateau schedule
        schedule.on_eval({"val/acc": acc, "val/loss": 0.0})
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.01, 0.01])


# --- against independent references: torch's own schedulers, and the published formulas ---------------

from torch.optim import lr_scheduler as T  # noqa: E402


def _lrs(make, steps: int, peak: float = 0.1, epoch_len: int = 0) -> list:
    """The lr of each optimizer step under a torch scheduler (stepped every step, or every ``epoch_len``)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = make(optimizer)
    out = []
    for step in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if not epoch_len or (step + 1) % epoch_len == 0:
            scheduler.step()
    return out


def _warmup(w: int):
    """Step s of a w-step warmup at (s+1)/(w+1) of the peak, as torch's LinearLR expresses it."""
    return lambda o: T.LinearLR(o, start_factor=1 / (w + 1), end_factor=1.0, total_iters=w)


def _then(w: int, first, second):
    return lambda o: T.SequentialLR(o, [first(o), second(o)], milestones=[w])


H200 = Horizon(total_steps=200, steps_per_epoch=20)
TORCH_REFERENCES = [
    ("constant+warmup", S.ConstantSpec(warmup_steps=15), _then(15, _warmup(15), lambda o: T.ConstantLR(o, 1.0, 0)), 0),
    ("step/epochs", S.StepSpec(step_size=3, gamma=0.5), lambda o: T.StepLR(o, step_size=3, gamma=0.5), 20),
    ("step/steps", S.StepSpec(step_size=7, gamma=0.5, unit="step"), lambda o: T.StepLR(o, 7, 0.5), 0),
    ("multistep", S.MultiStepSpec(milestones=[2, 7], gamma=0.3), lambda o: T.MultiStepLR(o, [2, 7], 0.3), 20),
    ("exponential", S.ExponentialSpec(gamma=0.8), lambda o: T.ExponentialLR(o, 0.8), 20),
    ("exponential/steps", S.ExponentialSpec(gamma=0.99, unit="step"), lambda o: T.ExponentialLR(o, 0.99), 0),
    ("cosine", S.CosineSpec(min_lr_ratio=0.1), lambda o: T.CosineAnnealingLR(o, T_max=200, eta_min=0.01), 0),
    ("warmup_cosine", S.WarmupCosineSpec(warmup_fraction=0.1, min_lr_ratio=0.05),
     _then(20, _warmup(20), lambda o: T.CosineAnnealingLR(o, T_max=180, eta_min=0.005)), 0),
    ("cosine_restarts", S.CosineRestartsSpec(cycle_steps=20, cycle_mult=2.0),
     lambda o: T.CosineAnnealingWarmRestarts(o, T_0=20, T_mult=2), 0),
    ("linear", S.LinearSpec(warmup_fraction=0.0, warmup_steps=10, min_lr_ratio=0.2),
     _then(10, _warmup(10), lambda o: T.LinearLR(o, start_factor=1.0, end_factor=0.2, total_iters=190)), 0),
]


@pytest.mark.parametrize("name,spec,reference,epoch_len", TORCH_REFERENCES, ids=[r[0] for r in TORCH_REFERENCES])
def test_schedules_match_torchs_own_schedulers(name, spec, reference, epoch_len):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # SequentialLR's note about its first step
        expected = _lrs(reference, H200.total_steps, epoch_len=epoch_len)
    assert _ours(spec, H200) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_inverse_sqrt_matches_fairseqs_formula():
    # fairseq's inverse_sqrt: after `warmup_updates`, lr = peak * sqrt(warmup_updates) / sqrt(num_updates)
    ours = _ours(S.InverseSqrtSpec(warmup_fraction=0.0, warmup_steps=16), H200)
    assert ours[16:] == pytest.approx([0.1 * math.sqrt(16) / math.sqrt(n) for n in range(16, 200)], rel=1e-12)


@pytest.mark.parametrize("shape", ["linear", "sqrt", "cosine"])
def test_wsd_matches_the_published_cooldown(shape):
    # Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations":
    # constant until the cooldown starts at N - N_decay, then lr = peak * (1 - f((n - (N - N_decay)) / N_decay))
    f = {"linear": lambda x: x, "sqrt": math.sqrt, "cosine": lambda x: 0.5 * (1 - math.cos(math.pi * x))}[shape]
    ours = _ours(S.WSDSpec(warmup_fraction=0.0, decay_steps=40, decay_shape=shape), H200)
    expected = [0.1 if n < 160 else 0.1 * (1 - f((n - 160) / 40)) for n in range(200)]
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_restarts_with_a_decaying_peak_match_timms_formula():
    # timm's CosineLRScheduler (cycle_limit unbounded): in cycle i of length t_i, with lr_min = 0,
    # lr = 0.5 * peak * decay**i * (1 + cos(pi * t_cur / t_i))
    ours = _ours(S.CosineRestartsSpec(cycle_steps=30, cycle_decay=0.6), H200)
    expected = [0.5 * 0.1 * 0.6 ** (n // 30) * (1 + math.cos(math.pi * (n % 30) / 30)) for n in range(200)]
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)
