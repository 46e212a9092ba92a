"""Weight and gradient histograms (`logging.histograms_every_n_steps`): the on-device binning against
numpy's histogram, and a run's TensorBoard events read back with TensorBoard's EventAccumulator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose
from trainctl.errors import ConfigError
from trainctl.histograms import BINS, build_histograms, summarize

ARGS = ["data=synthetic", "data.n_samples=300", "data.batch_size=32", "model=mlp", "model.width=16",
        "trainer.max_epochs=2", "logging.log_every_n_steps=3", "logging.progress=none", "trainer.eval_every_n_epochs=2"]
"""8 optimizer steps per epoch, 16 in all."""


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"histograms": 0})
    events.Reload()
    return events


def test_binning_matches_numpy_and_leaves_non_finite_values_out():
    x = torch.randn(5000, dtype=torch.float64).float() * 3 + 1
    x[:7] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0, 0, 0, 0])
    stats, counts = summarize(x)
    finite = x[torch.isfinite(x)].double().numpy()
    lo, hi, total, squares = stats.tolist()
    assert (lo, hi) == (finite.min(), finite.max())
    assert total == pytest.approx(finite.sum(), rel=1e-5) and squares == pytest.approx((finite ** 2).sum(), rel=1e-5)
    expected, _ = np.histogram(finite, bins=BINS, range=(lo, hi))
    assert counts.sum() == len(finite) == 4997
    assert np.abs(counts.numpy() - expected).sum() <= 2  # at most a value on a bucket edge placed next door


def test_a_run_writes_weight_and_gradient_histograms_at_the_due_steps(tmp_path):
    from safetensors.torch import load_file

    from trainctl.job import train

    run_dir = tmp_path / "run"
    # lr 1e-30: the weights do not move (beyond 1e-29), so every weight histogram is of the saved final weights
    spec = compose([*ARGS, "logging.histograms_every_n_steps=5", "optimizer.lr=1e-30"], str(tmp_path))
    train(spec, run_dir, str(tmp_path))
    events = _events(run_dir)
    weights = load_file(str(run_dir / "model.safetensors"))
    tags = events.Tags()["histograms"]
    assert sorted(tags) == sorted([f"weights/{k}" for k in weights] + [f"grads/{k}" for k in weights])
    for name, tensor in weights.items():
        for kind in ("weights", "grads"):
            assert [e.step for e in events.Histograms(f"{kind}/{name}")] == [5, 10, 15]
        last = events.Histograms(f"weights/{name}")[-1].histogram_value
        values = tensor.double().numpy().ravel()
        assert last.num == values.size
        assert (last.min, last.max) == pytest.approx((values.min(), values.max()), rel=1e-6, abs=1e-20)
        assert last.sum == pytest.approx(values.sum(), rel=1e-4, abs=1e-5)
        grads = events.Histograms(f"grads/{name}")[-1].histogram_value
        assert grads.num == values.size and grads.sum_squares > 0  # a gradient, not the weights again
    assert events.Tags()["scalars"]  # the scalars are still there


def test_no_histograms_by_default(tmp_path):
    from trainctl.job import train

    spec = compose([*ARGS, "trainer.max_epochs=1"], str(tmp_path))
    assert spec.logging.histograms_every_n_steps is None and build_histograms(spec) is None
    train(spec, tmp_path / "run", str(tmp_path))
    events = _events(tmp_path / "run")
    assert events.Tags()["histograms"] == [] and events.Tags()["scalars"]


def test_histograms_need_tensorboard_and_refuse_fsdp():
    with pytest.raises(ConfigError) as error:
        compose(["data=synthetic", "logging.histograms_every_n_steps=10", "logging.tensorboard=false"])
    assert error.value.key == "logging.histograms_every_n_steps" and "logging.tensorboard=true" in str(error.value)
    with pytest.raises(ConfigError):
        compose(["data=synthetic", "logging.histograms_every_n_steps=0"])
    spec = compose(["data=synthetic", "logging.histograms_every_n_steps=10"])
    spec.parallelism.name = "fsdp"
    with pytest.raises(ConfigError) as error:
        build_histograms(spec)
    assert "histograms_every_n_steps=null" in str(error.value)
