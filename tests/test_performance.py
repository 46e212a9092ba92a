"""The performance group and the throughput readings: activation checkpointing keeps the gradients,
torch.compile keeps the losses, channels_last keeps the math, FLOP counts match an independent count,
and the training loop reads the device only when it logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build, compose
from test_checkpoint import fit
from trainctl.errors import ConfigError
from trainctl.performance import clean_name

TINY_GPT = ["model=gpt", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "data=text", "data.seq_len=32",
            "data.batch_size=8"]


def _gpt(text_file: Path, *extra: str) -> list:
    return [*TINY_GPT, f"data.path={text_file}", "model.dropout=0.1", *extra]


def _gradients(run, batch) -> dict:
    """Loss and gradients of one training batch, with dropout masks drawn from a fixed seed."""
    model = run.model.train()
    x, y = batch
    torch.manual_seed(123)
    out = model(x)
    loss = run.loss(out, y) / run.loss.count(y)
    loss.backward()
    return {clean_name(n): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("switch", [
    ["performance=low_memory"],  # blocks
    ["performance.activation_checkpointing=modules", "performance.checkpoint_modules=[blocks.*]"],
    ["performance.activation_checkpointing=modules", "performance.checkpoint_modules=[Block,head]"],
])
def test_activation_checkpointing_gives_the_same_gradients(text_file, switch):
    plain = build(_gpt(text_file))
    checkpointed = build(_gpt(text_file, *switch))
    assert plain.checkpointed_modules == 0 and checkpointed.checkpointed_modules >= 2
    wrapped = [n for n, _ in checkpointed.model.named_modules() if n.endswith("_checkpoint_wrapped_module")]
    assert len(wrapped) == checkpointed.checkpointed_modules
    batch = plain.data.train.first()
    a, b = _gradients(plain, batch), _gradients(checkpointed, batch)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not all(torch.equal(a[n], torch.zeros_like(a[n])) for n in a)


def test_activation_checkpointing_of_a_pattern_that_matches_nothing_is_refused(text_file):
    with pytest.raises(ConfigError, match="matches no module") as info:
        build(_gpt(text_file, "performance.activation_checkpointing=modules", "performance.checkpoint_modules=[enc*]"))
    assert info.value.key == "performance.checkpoint_modules"
    with pytest.raises(ConfigError, match="needs at least one pattern"):
        compose(["performance.activation_checkpointing=modules"])


def test_activation_checkpointing_blocks_of_a_custom_model_without_module_lists_is_refused():
    with pytest.raises(ConfigError, match="ModuleLists"):
        build(["model=custom", "model._target_=torch.nn.Linear", "+model.in_features=64", "+model.out_features=10",
               "performance.activation_checkpointing=blocks"])


def test_activation_checkpointed_runs_save_plain_weights_and_resume_exactly(tmp_path, text_file, monkeypatch):
    from trainctl.runner import Runner

    args = _gpt(text_file, "trainer.max_steps=8", "trainer.max_epochs=null", "trainer.eval_every_n_steps=4",
                "trainer.eval_every_n_epochs=null", "checkpoint.every_n_steps=2", "checkpoint.every_n_epochs=null",
                "logging.log_every_n_steps=1")
    fit(tmp_path, args, name="plain")
    fit(tmp_path, [*args, "performance=low_memory"], name="reference")
    original = Runner.train_step

    def interrupted_at_5(self, window):
        original(self, window)
        if self.state.step == 5:
            self.state.request_stop("interrupted")

    monkeypatch.setattr(Runner, "train_step", interrupted_at_5)
    assert fit(tmp_path, [*args, "performance=low_memory"], name="run")["steps"] == 5
    monkeypatch.setattr(Runner, "train_step", original)
    assert fit(tmp_path, [*args, "performance=low_memory", "checkpoint.resume=auto"], name="run")["steps"] == 8

    weights = {n: load_file(str(tmp_path / n / "model.safetensors")) for n in ("plain", "reference", "run")}
    assert weights["plain"].keys() == weights["reference"].keys(), "no wrapper names in saved weights"
    assert not any("_checkpoint_wrapped_module" in k for k in weights["reference"])
    for key in weights["reference"]:
        assert torch.equal(weights["run"][key], weights["reference"][key]), f"{key} differs after resuming"
        torch.testing.assert_close(weights["reference"][key], weights["plain"][key], rtol=1e-4, atol=1e-6)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["activation_checkpointed_modules"] == 2


def _losses(run_dir: Path) -> list:
    return [r["train/loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compile_gives_the_losses_of_eager_with_accumulation_clipping_and_checkpoints(tmp_path, precision):
    # No dropout: compiled code draws its random masks differently from eager.
    args = [f"precision={precision}", "model.dropout=0", "trainer.max_steps=12", "trainer.max_epochs=null", "trainer.grad_accum_steps=2",
            "regularization.max_grad_norm=0.5", "logging.log_every_n_steps=1", "trainer.eval_every_n_steps=6",
            "trainer.eval_every_n_epochs=null", "checkpoint.every_n_steps=6", "checkpoint.every_n_epochs=null"]
    eager = fit(tmp_path, args, name="eager")
    compiled = fit(tmp_path, [*args, "performance=compiled"], name="compiled")
    tolerance = {"fp32": 1e-4, "bf16": 2e-2}[precision]
    torch.testing.assert_close(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager"), rtol=tolerance, atol=0)
    assert compiled["final"]["val/acc"] == pytest.approx(eager["final"]["val/acc"], abs=0.02)
    # checkpoints and weights carry the module's own parameter names
    a = load_file(str(tmp_path / "eager" / "model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert (tmp_path / "compiled" / "checkpoints" / "last").exists()
    # compilation is reported on its own and kept out of the throughput
    assert compiled["compile_seconds"] > 0 and "compile_seconds" not in eager
    accounted = sum(compiled[k] for k in ("train_seconds", "compile_seconds", "eval_seconds", "checkpoint_seconds"))
    assert accounted <= compiled["wall_seconds"] + 0.05, "compile time counted twice (also in train_seconds)"
    # throughput is measured over the training time alone (train_seconds is rounded to the millisecond)
    assert compiled["samples_seen"] / compiled["samples_per_second"] == pytest.approx(compiled["train_seconds"],
                                                                                      rel=0.01, abs=6e-4)


@pytest.mark.slow
def test_compile_gives_the_losses_of_eager_on_the_gpt_with_tied_weights(tmp_path, text_file):
    args = _gpt(text_file, "model.dropout=0", "trainer.max_steps=6", "trainer.max_epochs=null",
                "trainer.grad_accum_steps=2", "regularization.max_grad_norm=0.5", "logging.log_every_n_steps=1",
                "trainer.eval_every_n_steps=6", "trainer.eval_every_n_epochs=null", "checkpoint=off")
    eager = fit(tmp_path, args, name="eager")
    compiled = fit(tmp_path, [*args, "performance=compiled"], name="compiled")
    torch.testing.assert_close(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager"), rtol=1e-4, atol=0)
    assert compiled["final"]["val/loss"] == pytest.approx(eager["final"]["val/loss"], rel=1e-4)
    weights = load_file(str(tmp_path / "compiled" / "model.safetensors"))
    assert ("tok_embed.weight" in weights) != ("head.weight" in weights), "the tied weight is stored once"
    assert weights.keys() == load_file(str(tmp_path / "eager" / "model.safetensors")).keys()


def test_channels_last_keeps_the_math_and_its_memory_format(tmp_path):
    args = ["model=cnn", "trainer.max_steps=6", "trainer.max_epochs=null", "logging.log_every_n_steps=1",
            "trainer.eval_every_n_epochs=null", "checkpoint=off"]
    run = build([*args, "performance.channels_last=true"])
    convs = [m for m in run.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not convs[-1].weight.is_contiguous(), "a multi-channel layer really changed its layout"
    x, _ = next(iter(run.data.train.epoch(0)))
    assert x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    fit(tmp_path, args, name="eager")
    fit(tmp_path, [*args, "performance.channels_last=true"], name="cl")
    # channels-last convolutions run other kernels: equal up to float rounding
    torch.testing.assert_close(_losses(tmp_path / "cl"), _losses(tmp_path / "eager"), rtol=1e-4, atol=0)


def test_channels_last_is_refused_without_image_data():
    with pytest.raises(ConfigError, match="image batches") as info:
        compose(["data=synthetic", "performance.channels_last=true"])
    assert info.value.key == "performance.channels_last"


def test_flops_per_sample_matches_a_count_by_hand():
    run = build(["performance.peak_tflops=1.0"])
    linears = [m for m in run.model.modules() if isinstance(m, torch.nn.Linear)]
    forward = sum(2 * m.in_features * m.out_features for m in linears)
    # backward: a gradient for every weight, and for every layer's input except the first one's
    backward = sum(2 * m.in_features * m.out_features for m in linears) + forward - 2 * linears[0].in_features * \
        linears[0].out_features
    assert run.flops_per_sample == pytest.approx(forward + backward, rel=1e-6)
    assert build([]).flops_per_sample is None, "counted only when there is a peak to compare with"


def test_throughput_readings_reach_metrics_and_summary(tmp_path, text_file):
    summary = fit(tmp_path, _gpt(text_file, "trainer.max_steps=6", "trainer.max_epochs=null", "logging.log_every_n_steps=2",
                                 "performance.peak_tflops=0.5", "checkpoint=off"))
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert len(train) == 3
    for r in train:
        assert r["train/samples_per_second"] > 0 and r["train/step_seconds"] > 0 and 0 <= r["train/data_wait"] <= 1
        assert r["train/tokens_per_second"] == pytest.approx(r["train/samples_per_second"] * 32, rel=1e-6)
        assert r["train/peak_memory_mib"] > 50
        assert r["train/mfu"] == pytest.approx(r["train/tflops"] / 0.5, rel=1e-9) and 0 < r["train/mfu"] < 1
    assert summary["tokens_per_second"] == pytest.approx(summary["samples_per_second"] * 32, rel=1e-6)
    assert summary["mfu"] == pytest.approx(summary["tflops"] / 0.5) and summary["peak_memory_mib"] > 50
    assert summary["time_to_first_step_seconds"] > 0 and 0 <= summary["data_wait_share"] <= 1
    # train_seconds is rounded to the millisecond: at most 0.5 ms over 6 steps
    assert summary["step_seconds"] == pytest.approx(summary["train_seconds"] / 6, rel=0.01, abs=1e-4)


def test_the_loop_reads_the_device_only_when_it_logs(tmp_path, monkeypatch):
    """Host syncs by trainctl's code (`.item()`, `float(t)`, `bool(t)`, `int(t)`, `.tolist()`) grow with
    log readings, not with steps. (torch.optim's own reads of its CPU step counters are not syncs.)"""
    import collections
    import sys

    reads: collections.Counter = collections.Counter()
    for name in ("item", "__float__", "__bool__", "tolist", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original):
            caller = sys._getframe(1)
            if f"{Path('trainctl')}/" in caller.f_code.co_filename.replace("\\", "/").rsplit("site-packages", 1)[-1]:
                reads[f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"] += 1
            return _original(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)

    def syncs(steps: int) -> collections.Counter:
        reads.clear()
        fit(tmp_path, ["trainer.max_epochs=null", f"trainer.max_steps={steps}", "trainer.eval_every_n_epochs=null",
                       "logging.log_every_n_steps=20", "checkpoint=off"], name=f"steps-{steps}")
        return collections.Counter(reads)

    short, long = syncs(20), syncs(60)
    assert sum(short.values()) >= 1, f"the counter sees the log reading: {dict(short)}"
    extra = long - short
    assert sum(extra.values()) <= 2 * 2, f"host reads for 40 more steps (2 more log readings): {dict(extra)}"
