"""`trainctl lr-find`: the exponential ramp (every group, lr_multipliers kept), the bias-corrected
smoothing, the early stop on divergence, the suggestions, the real first loss, and that it leaves
nothing behind but the plot and the curve."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from conftest import build, trainctl


def _ramped(monkeypatch, overrides, **kwargs):
    """Run the range test in-process, recording every group's lr at each training step."""
    from trainctl.lr_find import range_test
    from trainctl.runner import Runner

    seen = []
    step = Runner.train_step

    def recording(self, window):
        seen.append([g["lr"] for g in self.run.optimizer.param_groups])
        step(self, window)
    monkeypatch.setattr(Runner, "train_step", recording)
    run = build(overrides)
    return run, range_test(run, **kwargs), seen


def test_ramp_every_group_keeps_its_multiplier(monkeypatch):
    start, end, n = 1e-5, 1e-1, 6
    run, result, seen = _ramped(monkeypatch, ["+optimizer.lr_multipliers={head.*: 0.1}"],
                                start_lr=start, end_lr=end, steps=n, diverge=1e9)
    assert result.stop_reason == "completed" and len(seen) == n
    expected = [start * (end / start) ** (i / (n - 1)) for i in range(n)]
    assert result.lrs == pytest.approx(expected, rel=1e-12)
    groups = run.optimizer.param_groups
    head = {id(p) for p in run.model.head.parameters()}
    heads = [all(id(p) in head for p in g["params"]) for g in groups]
    assert any(heads) and not all(heads)
    for lrs, want in zip(seen, expected):  # what the optimizer actually used at each step
        assert lrs == pytest.approx([want * (0.1 if head else 1.0) for head in heads], rel=1e-12)


def test_losses_are_the_steps_losses_and_smoothing_is_bias_corrected(monkeypatch):
    import torch.nn.functional as F

    fresh = build([])  # same seed: the same initial weights and the same first batch
    x, y = next(iter(fresh.data.train.epoch(0)))
    with __import__("torch").no_grad():
        first = float(F.cross_entropy(fresh.model(x), y))
    _, result, _ = _ramped(monkeypatch, [], start_lr=1e-4, end_lr=1e-1, steps=8, smooth=0.3, diverge=1e9)
    assert result.losses[0] == pytest.approx(first, rel=1e-5)
    beta, avg, want = 0.7, 0.0, []
    for i, loss in enumerate(result.losses):  # fastai's smoothing, by hand
        avg = beta * avg + 0.3 * loss
        want.append(avg / (1 - beta ** (i + 1)))
    assert result.smooth_losses == pytest.approx(want, rel=1e-12)
    assert result.smooth_losses[0] == pytest.approx(result.losses[0])


def test_stops_once_the_smoothed_loss_diverges(monkeypatch):
    _, result, seen = _ramped(monkeypatch, ["optimizer=sgd"], start_lr=1e-2, end_lr=1e4, steps=60,
                              smooth=0.3, diverge=2.0)
    n = len(result.lrs)
    assert result.stop_reason in ("diverged", "nonfinite") and 5 < n < 60 and len(seen) == n
    values = [v for v in result.smooth_losses if v is not None]
    best = [min(values[:i + 1]) for i in range(len(values))]
    if result.stop_reason == "diverged":
        assert values[-1] > 2.0 * best[-1]
    assert all(v <= 2.0 * b for v, b in zip(values[:-1], best[:-1]))  # not a step earlier


def test_suggestions_on_a_known_curve():
    from trainctl.lr_find import ramp, suggest

    lrs = ramp(1e-6, 1.0, 61)
    x = np.log10(lrs)  # a loss falling fastest at lr 1e-3 (a logistic step), rising after 1e-1
    loss = list(2.0 - 1.5 / (1 + np.exp(-3 * (x + 3))) + np.where(x > -1, 5 * (x + 1) ** 2, 0))
    found = suggest(lrs, loss, skip_start=10, skip_end=5)
    assert found["steepest"] == pytest.approx(1e-3, rel=0.13)  # the nearest point of the grid
    assert found["minimum"] == lrs[int(np.argmin(loss))]
    assert found["min_over_10"] == pytest.approx(found["minimum"] / 10)
    early = suggest(lrs[:12], loss[:12], skip_start=10, skip_end=5)  # a short test: fewer points skipped
    assert early["steepest"] is not None


def test_leaves_only_the_plot_and_the_curve(tmp_path, monkeypatch, capsys):
    from trainctl.commands import lr_find

    monkeypatch.chdir(tmp_path)
    lr_find.main(["--steps", "12", "--end-lr", "1", "trainer.max_epochs=1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr_find.json", "lr_find.png"]
    lr_find.main(["-o", "out", "--steps", "12", "--end-lr", "1"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lr_find.json", "lr_find.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr_find.json", "lr_find.png", "out"]
    curve = json.loads((tmp_path / "out" / "lr_find.json").read_text())
    assert len(curve["lrs"]) == len(curve["losses"]) == 12
    assert "optimizer.lr=" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    done = trainctl(["lr-find", "--steps", "40", "optimizer=sgd"], tmp_path)
    assert done.returncode == 0, done.stderr
    pasted = re.findall(r"^  optimizer\.lr=(\S+)", done.stdout, re.M)
    assert len(pasted) == 2 and all(math.isfinite(float(v)) and float(v) > 0 for v in pasted)
    assert f"trainctl run optimizer=sgd optimizer.lr={pasted[0]}" in done.stdout
    assert (tmp_path / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr_find.json", "lr_find.png"]
    bad = trainctl(["lr-find", "optimizer.lrr=1"], tmp_path)
    assert bad.returncode == 2 and "optimizer.lrr" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_under_torchrun_every_rank_takes_part_and_the_curve_is_the_whole_batchs(tmp_path):
    """2 ranks with 32 samples each record the same losses as one process with the 64 together; rank 0
    alone prints and writes."""
    import os
    import subprocess
    import sys

    common = ["--steps", "20", "model.dropout=0", "logging.progress=none"]
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    single_dir.mkdir()
    ddp_dir.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    single = subprocess.run([sys.executable, "-m", "trainctl", "lr-find", *common, "data.batch_size=64"],
                            cwd=single_dir, capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29671",
                          "-m", "trainctl", "lr-find", *common, "data.batch_size=32", "parallelism=ddp"],
                         cwd=ddp_dir, capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = (json.loads((d / "lr_find.json").read_text()) for d in (single_dir, ddp_dir))
    assert two["lrs"] == one["lrs"]
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    assert sorted(p.name for p in ddp_dir.iterdir()) == ["lr_find.json", "lr_find.png"]
    assert len(re.findall(r"^  optimizer\.lr=", ddp.stdout, re.M)) == 2, "printed once, by rank 0"
