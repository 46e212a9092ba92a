"""The precision group: every policy trains the default task, fp16's scaler skips overflowing steps and
its state survives a resume, and a policy the device cannot run is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from test_checkpoint import QUIET, fit
from trainctl.errors import ConfigError


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16", "bf16_true"])
def test_each_precision_trains_the_default_task(tmp_path, precision):
    summary = fit(tmp_path, [f"precision={precision}", "checkpoint=off"])
    assert summary["stop_reason"] == "completed"
    assert summary["best_metric"] >= 0.96, "within 0.015 of fp32 (0.972 best)"


def test_bf16_true_keeps_parameters_in_bfloat16(tmp_path):
    from conftest import build

    run = build(["precision=bf16_true"])
    assert {p.dtype for p in run.model.parameters()} == {torch.bfloat16}
    fit(tmp_path, ["precision=bf16_true", "trainer.max_steps=3", "checkpoint=off"])
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}


def test_fp16_skips_a_step_whose_gradients_overflow_and_continues(tmp_path, monkeypatch):
    from trainctl.runner import Runner

    original, calls = Runner.train_step, {"n": 0}

    def poisoned(self, window):
        calls["n"] += 1
        if calls["n"] == 5:  # one step's gradients overflow (the loss itself stays finite)
            weight = next(self.run.model.parameters())
            handle = weight.register_hook(lambda g: g * float("inf"))
            original(self, window)
            handle.remove()
        else:
            original(self, window)

    monkeypatch.setattr(Runner, "train_step", poisoned)
    summary = fit(tmp_path, ["precision=fp16", "trainer.max_steps=20", "logging.log_every_n_steps=1",
                             "trainer.eval_every_n_epochs=null"])
    assert summary["stop_reason"] == "completed" and summary["amp_skipped_steps"] == 1
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scales = [r["train/loss_scale"] for r in records]
    assert scales[3] == 65536.0 and scales[4] == 32768.0, "the overflow halved the loss scale"
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    from trainctl.checkpoint import read_checkpoint
    state = read_checkpoint(tmp_path / "run" / "checkpoints" / "last").state["precision"]
    assert state["scaler"]["scale"] == 32768.0 and state["overflow_skips"] == 1


def test_fp16_resume_is_exact(tmp_path, monkeypatch):
    from trainctl.runner import Runner

    args = ["precision=fp16", "trainer.max_epochs=3", "precision.init_scale=1e30"]  # overflows at first
    reference = fit(tmp_path, args, name="reference")
    assert reference["amp_skipped_steps"] > 0
    original = Runner.train_step

    def interrupted(self, window):
        original(self, window)
        if self.state.step == 30:
            self.state.request_stop("interrupted")

    monkeypatch.setattr(Runner, "train_step", interrupted)
    assert fit(tmp_path, args, name="run")["stop_reason"] == "interrupted"
    monkeypatch.setattr(Runner, "train_step", original)
    resumed = fit(tmp_path, [*args, "checkpoint.resume=auto"], name="run")
    assert resumed["amp_skipped_steps"] == reference["amp_skipped_steps"]
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("run", "reference"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tf32_is_refused_without_cuda():
    from conftest import build

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="tf32 is a CUDA feature"):
        build([*QUIET, "precision=tf32"])
