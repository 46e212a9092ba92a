"""FSDP (FSDP2 ``fully_shard``) under torchrun on CPU (gloo, 2 processes): the same math as DDP in every
sharding mode, sharded checkpoints that resume exactly and export weights one process can load, about
half the training state per rank, and clear errors for settings that do not fit."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import trainctl

# 359 validation samples in batches of 179: rank 0's share (180) takes 2 batches, rank 1's (179) one,
# so the evaluation must even out the forward calls that gather FSDP's parameters.
COMMON = ["model.dropout=0", "trainer.max_epochs=null", "logging.progress=none", "logging.tensorboard=false",
          "trainer.eval_every_n_steps=4", "trainer.eval_every_n_epochs=null", "checkpoint.every_n_steps=4",
          "checkpoint.every_n_epochs=null", "logging.log_every_n_steps=2", "data.batch_size=32",
          "data.val_fraction=0.1997", "data.eval_batch_size=179", "parallelism.nproc_per_node=2",
          "parallelism.timeout_minutes=1"]
ENV = {"OMP_NUM_THREADS": "1"}


def _records(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _assert_same_training(run: Path, reference: Path, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    a, b = load_file(str(run / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # the same samples per step; only the order of floating-point sums differs
        assert a[key].dtype == torch.float32
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=f"{run.name}: {key}")
    mine, theirs = _records(run), _records(reference)
    assert [r["step"] for r in mine] == [r["step"] for r in theirs]
    for r, s in zip(mine, theirs):
        for key in ("train/loss", "train/grad_norm", "val/loss", "val/acc", "lr"):
            if key in s:
                assert r[key] == pytest.approx(s[key], rel=rtol, abs=atol), (run.name, r["step"], key)


@pytest.mark.slow
def test_every_sharding_mode_trains_like_ddp_and_holds_half_the_state_per_rank(tmp_path):
    args = [*COMMON, "trainer.max_steps=6", "trainer.grad_accum_steps=2", "regularization.max_grad_norm=0.5"]
    ddp = trainctl(["run", *args, "parallelism=ddp", "parallelism.rdzv_endpoint=localhost:29711",
                    f"hydra.run.dir={tmp_path / 'ddp'}"], cwd=tmp_path, env=ENV)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    sweep = trainctl(["run", "-m", *args, "parallelism=fsdp", "parallelism.rdzv_endpoint=localhost:29712",
                      "parallelism.sharding=full_shard,shard_grad_op,no_shard,hybrid",
                      f"hydra.sweep.dir={tmp_path / 'fsdp'}", "hydra.sweep.subdir=${parallelism.sharding}"],
                     cwd=tmp_path, env=ENV, timeout=600)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    offload = trainctl(["run", *args, "parallelism=fsdp", "parallelism.cpu_offload=true",
                        "parallelism.rdzv_endpoint=localhost:29713", f"hydra.run.dir={tmp_path / 'fsdp' / 'offload'}"],
                       cwd=tmp_path, env=ENV)
    assert offload.returncode == 0, offload.stderr[-3000:]
    # hybrid with a real replicate dimension: 4 processes as 2 replicas x 2 shards, the same global batch
    hybrid = trainctl(["run", *args, "parallelism=fsdp", "parallelism.sharding=hybrid", "parallelism.hybrid_shard_size=2",
                       "parallelism.nproc_per_node=4", "data.batch_size=16", "parallelism.rdzv_endpoint=localhost:29714",
                       f"hydra.run.dir={tmp_path / 'fsdp' / 'hybrid_2x2'}"], cwd=tmp_path, env=ENV)
    assert hybrid.returncode == 0, hybrid.stderr[-3000:]
    assert _summary(tmp_path / "fsdp" / "hybrid_2x2")["world_size"] == 4
    for mode in ("full_shard", "shard_grad_op", "no_shard", "hybrid", "offload", "hybrid_2x2"):
        # 4 processes add their gradients in another order: AdamW's normalised step turns that rounding
        # into up to ~1e-6 on weights whose gradients are near zero
        _assert_same_training(tmp_path / "fsdp" / mode, tmp_path / "ddp", atol=1e-5 if mode == "hybrid_2x2" else 1e-6)
        assert _summary(tmp_path / "fsdp" / mode)["stop_reason"] == "completed"
    log = (tmp_path / "fsdp" / "full_shard" / "trainctl.log").read_text()
    assert "fsdp (gloo, full_shard, 2 units + root)" in log
    assert "CPU offload" in (tmp_path / "fsdp" / "offload" / "trainctl.log").read_text()

    # parameters + gradients + optimizer state on rank 0: halved by sharding, whole without it
    whole = _summary(tmp_path / "ddp")["training_state_mib"]
    # hybrid_2x2: sharded over 2 of the 4 processes (over all 4 it would hold a quarter)
    for mode, share in (("full_shard", 0.5), ("shard_grad_op", 0.5), ("hybrid", 0.5), ("no_shard", 1.0),
                        ("hybrid_2x2", 0.5)):
        held = _summary(tmp_path / "fsdp" / mode)["training_state_mib"]
        for part in ("parameters", "gradients", "optimizer", "total"):
            assert held[part] / whole[part] == pytest.approx(share, rel=0.02), (mode, part, held, whole)
    assert whole["optimizer"] == pytest.approx(2 * whole["parameters"], rel=0.01)  # AdamW: two moments


@pytest.mark.slow
def test_the_gpt_with_tied_weights_trains_like_ddp(tmp_path, text_file):
    args = [*COMMON, "model=gpt", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "data=text",
            f"data.path={text_file}", "data.seq_len=32", "data.batch_size=8", "data.eval_batch_size=null",
            "data.val_fraction=0.1", "trainer.max_steps=6", "trainer.grad_accum_steps=2",
            "regularization.max_grad_norm=0.5"]
    for name, port in (("ddp", 29741), ("fsdp", 29742)):
        out = trainctl(["run", *args, f"parallelism={name}", f"parallelism.rdzv_endpoint=localhost:{port}",
                        f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path, env=ENV)
        assert out.returncode == 0, out.stderr[-3000:]
    _assert_same_training(tmp_path / "fsdp", tmp_path / "ddp")
    weights = load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    assert ("tok_embed.weight" in weights) != ("head.weight" in weights), "the tied weight is exported once"


@pytest.mark.slow
def test_agc_and_the_penalties_act_on_sharded_parameters_as_on_whole_ones(tmp_path):
    """AGC's units are rows along dim 0, which FSDP2 shards whole; the penalties' norms are global."""
    args = [*COMMON, "trainer.max_steps=6", "regularization.agc_clipping=0.002", "regularization.l1=1e-4",
            "regularization.l2=1e-3", "regularization.weight_decay=0"]
    for name, port in (("ddp", 29721), ("fsdp", 29722)):
        out = trainctl(["run", *args, f"parallelism={name}", f"parallelism.rdzv_endpoint=localhost:{port}",
                        f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path, env=ENV)
        assert out.returncode == 0, out.stderr[-3000:]
    _assert_same_training(tmp_path / "fsdp", tmp_path / "ddp")
    penalties = [(r["train/penalty"], s["train/penalty"]) for r, s in zip(_records(tmp_path / "fsdp"),
                                                                          _records(tmp_path / "ddp")) if "train/penalty" in s]
    assert penalties and all(a == pytest.approx(b, rel=1e-5) for a, b in penalties)
    plain = trainctl(["run", *COMMON, "trainer.max_steps=6", "regularization.weight_decay=0", "parallelism=fsdp",
                      "parallelism.rdzv_endpoint=localhost:29723", f"hydra.run.dir={tmp_path / 'plain'}"],
                     cwd=tmp_path, env=ENV)
    assert plain.returncode == 0, plain.stderr[-3000:]
    a, b = load_file(str(tmp_path / "fsdp" / "model.safetensors")), load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert any((a[k] - b[k]).abs().max() > 1e-4 for k in a), "AGC and the penalties changed the training"


@pytest.mark.slow
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_perturbs_and_restores_sharded_parameters_as_whole_ones(tmp_path, adaptive):
    """The perturbation's norm is global; the second pass gathers the perturbed shards; the shards are
    restored exactly; with accumulation 2 the gradient exchange happens once per pass."""
    args = [*COMMON, "trainer.max_steps=6", "trainer.grad_accum_steps=2", "regularization.max_grad_norm=0.5",
            "regularization.sam_rho=0.05", f"regularization.sam_adaptive={str(adaptive).lower()}"]
    for name, port in (("ddp", 29731 + 2 * adaptive), ("fsdp", 29732 + 2 * adaptive)):
        out = trainctl(["run", *args, f"parallelism={name}", f"parallelism.rdzv_endpoint=localhost:{port}",
                        f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path, env=ENV)
        assert out.returncode == 0, out.stderr[-3000:]
    # measured: all weights within 5e-8 but one near-zero-gradient weight (3e-6, AdamW's normalised step)
    _assert_same_training(tmp_path / "fsdp", tmp_path / "ddp", atol=1e-5)


@pytest.mark.slow
def test_sharded_checkpoints_resume_exactly_and_one_process_can_evaluate_them(tmp_path):
    from conftest import assert_resumed_exactly, run_then_signal

    args = [*COMMON, "trainer.max_steps=40", "parallelism=fsdp",
            "model.dropout=0.2"]  # dropout: every rank's own random stream must survive the restart
    reference = trainctl(["run", *args, "parallelism.rdzv_endpoint=localhost:29721",
                          f"hydra.run.dir={tmp_path / 'reference'}"], cwd=tmp_path, env=ENV)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "run"
    proc = run_then_signal([*args, "parallelism.rdzv_endpoint=localhost:29722"], run_dir, tmp_path, signal.SIGTERM,
                           after_lines=6)
    summary = _summary(run_dir)
    assert summary["stop_reason"] == "interrupted" and 0 < summary["steps"] < 40, proc.stderr_text[-3000:]

    last = (run_dir / "checkpoints" / "last").resolve()
    listed = json.loads((last / "COMMITTED").read_text())["files"]
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt", "meta.json", "spec.yaml"} <= set(listed)
    assert "model.safetensors" not in listed and json.loads((last / "meta.json").read_text())["sharded"] is True

    # a whole-model run cannot continue from sharded state
    refused = trainctl(["run", *COMMON, "trainer.max_steps=40", "model.dropout=0.2", "parallelism=ddp",
                        "parallelism.rdzv_endpoint=localhost:29723", "checkpoint.resume=auto",
                        f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=ENV)
    assert refused.returncode == 2 and "checkpoint format: sharded (parallelism=fsdp)" in refused.stderr

    resumed = trainctl(["run", *args, "parallelism.rdzv_endpoint=localhost:29724", "checkpoint.resume=auto",
                        f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_exactly(run_dir, tmp_path / "reference", list(range(2, 41, 2)))

    # one process evaluates the sharded checkpoint and the exported weights, matching the ranks' evaluation
    logged = {r["step"]: r for r in _records(run_dir) if "val/acc" in r}
    for target, step in ((run_dir / "checkpoints" / "step-00000036", 36), (run_dir, 40)):
        out = trainctl(["eval", str(target), "--json"], cwd=tmp_path, timeout=120)
        assert out.returncode == 0, out.stderr
        metrics = json.loads(out.stdout)["metrics"]
        assert metrics["val/acc"] == pytest.approx(logged[step]["val/acc"], abs=1e-6)
        assert metrics["val/loss"] == pytest.approx(logged[step]["val/loss"], rel=1e-5)


@pytest.mark.slow
def test_mixed_precision_comes_from_the_precision_group(tmp_path):
    args = [*COMMON, "trainer.max_steps=24", "parallelism=fsdp", "parallelism.rdzv_endpoint=localhost:29731",
            "optimizer.lr=3e-3"]
    sweep = trainctl(["run", "-m", *args, "precision=fp32,bf16,fp16", f"hydra.sweep.dir={tmp_path}",
                      "hydra.sweep.subdir=${precision.name}"], cwd=tmp_path, env=ENV, timeout=600)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    def final(name: str, key: str) -> dict:
        return [r for r in _records(tmp_path / name) if key in r][-1]

    assert "FSDP parameters in bf16, gradients reduced in fp32" in (tmp_path / "bf16" / "trainctl.log").read_text()
    assert "precision                  fp32\n" in (tmp_path / "fp32" / "trainctl.log").read_text()
    for name in ("bf16", "fp16"):
        assert final(name, "train/loss")["train/loss"] == pytest.approx(final("fp32", "train/loss")["train/loss"],
                                                                         rel=0.05), name
        assert final(name, "val/acc")["val/acc"] == pytest.approx(final("fp32", "val/acc")["val/acc"], abs=0.03), name
        assert final(name, "train/loss")["train/loss"] != final("fp32", "train/loss")["train/loss"], "really cast"
        weights = load_file(str(tmp_path / name / "model.safetensors"))
        assert all(t.dtype == torch.float32 for t in weights.values()), "sharded weights stay fp32"
    assert final("fp16", "train/loss")["train/loss_scale"] > 0, "fp16 keeps its loss scaler"


# --- fast checks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key, text", [
    (["parallelism=ddp", "parallelism.sharding=hybrid"], "parallelism.sharding", "no such key"),
    (["parallelism=fsdp", "parallelism.sharding=zero3"], "parallelism.sharding", "full_shard"),
    (["parallelism=fsdp", "parallelism.hybrid_shard_size=2"], "parallelism.hybrid_shard_size",
     "only applies to sharding=hybrid"),
    (["parallelism=fsdp", "early_stopping.patience=3", "early_stopping.restore_best_weights=true"],
     "early_stopping.restore_best_weights", "checkpoints/best"),
])
def test_fsdp_settings_that_cannot_work_are_refused(tmp_path, overrides, key, text):
    out = trainctl(["show", *overrides, "parallelism.nproc_per_node=2"], cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and key in out.stderr and text in out.stderr, out.stderr


def test_show_states_the_fsdp_plan(tmp_path):
    out = trainctl(["show", "parallelism=fsdp", "parallelism.nproc_per_node=2", "parallelism.sharding=hybrid"],
                   cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "sharding: hybrid" in out.stdout and "cpu_offload: false" in out.stdout
    assert "effective batch size" in out.stdout and "128" in out.stdout


def test_a_shorter_validation_share_is_padded_to_the_longest():
    from trainctl.batches import Batches, TensorSource

    source = TensorSource(torch.zeros(359, 2), torch.zeros(359))
    shares = [Batches(source, 179, False, False, 0, rank=r, world_size=2) for r in range(2)]
    assert [len(b) for b in shares] == [2, 1]
    assert [b.shortfall() for b in shares] == [0, 1]
    even = [Batches(source, 60, False, False, 0, rank=r, world_size=2) for r in range(2)]
    assert [b.shortfall() for b in even] == [0, 0]
    assert Batches(source, 60, True, False, 0, rank=1, world_size=2).shortfall() == 0  # training batches are equal
