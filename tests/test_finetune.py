"""Fine-tuning on the built-in models: `model.init_from`, `peft=freeze` (with gradual unfreezing),
`peft=lora|dora|qlora`, what their checkpoints hold, exact resume, `trainctl export` and evaluation of
exports - checked against independent computations (the saved base weights, Hugging Face peft loading
the exported adapter in another process, base + adapter vs merged weights)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, compose, trainctl
from trainctl.errors import ConfigError

QUIET = ["logging.progress=none", "logging.tensorboard=false"]
FAULTS = str(REPO / "tests" / "faults.py")


def fit(run_dir: Path, overrides: List[str], cwd: Path) -> dict:
    from trainctl.job import train

    return train(compose([*QUIET, *overrides], str(cwd)), run_dir, str(cwd))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """An MLP trained for 3 epochs on digits: the "pretrained" weights of this module's tests."""
    root = tmp_path_factory.mktemp("base")
    fit(root / "run", ["trainer.max_epochs=3"], root)
    return root / "run"


def _weights(path: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(path))


# --- init_from ----------------------------------------------------------------------------------------


def test_init_from_loads_every_tensor_of_a_run_a_checkpoint_or_a_file(base, tmp_path):
    from trainctl.build import build_run

    saved = _weights(base / "model.safetensors")
    for source in (base, base / "checkpoints" / "last", base / "model.safetensors"):
        run = build_run(compose([*QUIET, f"model.init_from={source}"], str(tmp_path)))
        state = run.model.state_dict()
        assert state.keys() == saved.keys()
        ckpt = _weights(source / "model.safetensors") if source.is_dir() else saved
        for key, value in ckpt.items():
            assert torch.equal(state[key], value), f"{key} was not loaded from {source}"


def test_init_from_with_a_new_head_fails_strict_with_the_key_list_and_trains_non_strict(base, tmp_path, caplog):
    # 64 synthetic features like the 64 digit pixels, but 3 classes instead of 10: only the head differs
    data = ["data=synthetic", "data.n_features=64", "data.n_informative=8", "data.n_classes=3"]
    out = trainctl(["run", *QUIET, *data, f"model.init_from={base}", "trainer.max_epochs=1",
                    f"hydra.run.dir={tmp_path / 'strict'}"], cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "model.init_strict" in out.stderr and "head.weight (3, 256) vs" not in out.stderr
    assert "head.weight (10, 256) vs (3, 256) in the model" in out.stderr
    assert "head.bias (10,) vs (3,) in the model" in out.stderr and "missing" not in out.stderr
    assert not (tmp_path / "strict" / "model.safetensors").exists()

    with caplog.at_level("INFO", logger="trainctl"):
        summary = fit(tmp_path / "loose", [*data, f"model.init_from={base}", "model.init_strict=false",
                                           "trainer.max_epochs=1"], tmp_path)
    assert summary["stop_reason"] == "completed"
    assert "loaded 4 of 6 tensors" in caplog.text and "blocks.0.0.bias, blocks.0.0.weight, blocks.1.0.bias" in caplog.text
    assert "mismatched: head.bias" in caplog.text


def test_init_from_refuses_what_is_not_whole_weights(base, tmp_path):
    missing = trainctl(["show", f"model.init_from={tmp_path / 'nowhere'}"], cwd=tmp_path)
    assert missing.returncode == 2 and "model.init_from" in missing.stderr and "does not exist" in missing.stderr
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    bad = trainctl(["show", f"model.init_from={junk}"], cwd=tmp_path)
    assert bad.returncode == 2 and "not a readable safetensors file" in bad.stderr and "Traceback" not in bad.stderr


# --- freeze -------------------------------------------------------------------------------------------


def test_freeze_trains_only_the_head_and_the_optimizer_holds_only_it(base, tmp_path):
    from trainctl.build import build_run

    run = build_run(compose([*QUIET, "peft=freeze", f"model.init_from={base}"], str(tmp_path)))
    held = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for n, p in run.model.named_parameters() if n.startswith("head.")}
    assert held == trainable

    fit(tmp_path / "probe", ["peft=freeze", f"model.init_from={base}", "trainer.max_epochs=2"], tmp_path)
    before, after = _weights(base / "model.safetensors"), _weights(tmp_path / "probe" / "model.safetensors")
    assert sorted(after) == ["head.bias", "head.weight"], "only the trained tensors are saved"
    assert not torch.equal(after["head.weight"], before["head.weight"]), "the head trained"
    # the rest of the model is exactly the base: rebuild it from the run and compare
    from trainctl.job import load_saved_run

    trained, *_ = load_saved_run(tmp_path / "probe", [], str(tmp_path))
    for key, value in trained.model.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, before[key]), f"{key} moved although frozen"


UNFREEZE = [*QUIET, "peft=freeze", "trainer.max_epochs=4", "regularization.dropout=0.2",
            "peft.unfreeze_at=[{epoch:1,modules:[blocks.1.*]},{epoch:2,modules:[blocks.0.*]}]",
            "+optimizer.lr_multipliers={blocks.0.*: 0.1}", "checkpoint.every_n_steps=10",
            "checkpoint.every_n_epochs=null"]


def test_unfreezing_adds_parameter_groups_at_their_epochs_with_their_lr_multipliers(base, tmp_path):
    from trainctl.build import build_run
    from trainctl.state import RunState

    run = build_run(compose([*UNFREEZE, f"model.init_from={base}"], str(tmp_path)))
    assert len(run.optimizer.param_groups) == 2  # the head: decayed weight, undecayed bias
    run.unfreezer.catch_up(run, 1)
    assert len(run.optimizer.param_groups) == 4
    run.unfreezer.catch_up(run, 1)
    assert len(run.optimizer.param_groups) == 4, "applied once"
    run.unfreezer.catch_up(run, 3)
    groups = run.optimizer.param_groups
    assert len(groups) == 6 and [g["lr"] for g in groups[4:]] == pytest.approx(
        [0.1 * groups[0]["initial_lr"] * run.scheduler.scheduler.lr_lambdas[0](0)] * 2)
    assert all(p.requires_grad for p in run.model.parameters())
    assert len(run.clipper.params) == len(list(run.model.parameters()))
    del RunState


@pytest.mark.slow
def test_resume_across_an_unfreeze_is_bitwise_exact(base, tmp_path):
    # 23 steps per epoch: killed at step 53, in epoch 2 (after both unfreezes), resumed from step 50
    resumed = _kill_and_resume([*UNFREEZE, f"model.init_from={base}"], 53, 50, tmp_path)
    assert len(resumed) == 6, "every layer trains by then"


def _kill_and_resume(args: List[str], kill_at: int, resumes_from: int, tmp_path: Path) -> Dict[str, torch.Tensor]:
    """SIGKILL a run right after step ``kill_at``, resume it, and check that it ends with the weights of the
    same run done without interruption, bit for bit. Returns those weights."""
    reference = tmp_path / "reference"
    out = trainctl(["run", *args, f"hydra.run.dir={reference}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, FAULTS, "kill-after-step", str(kill_at), "--", "run", *args,
                             f"hydra.run.dir={run_dir}"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / "last").resolve().name == f"step-{resumes_from:08d}"
    out = trainctl(["resume", str(run_dir)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    a, b = _weights(run_dir / "model.safetensors"), _weights(reference / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resuming"
    return a


def test_unfreezing_is_refused_where_it_cannot_work(tmp_path):
    steps = "peft.unfreeze_at=[{epoch:1,modules:[blocks.1.*]}]"
    with pytest.raises(ConfigError, match="onecycle"):
        compose(["peft=freeze", steps, "scheduler=onecycle"])
    with pytest.raises(ConfigError, match="DDP fixes the trained parameters"):
        compose(["peft=freeze", steps, "parallelism=ddp"])
    with pytest.raises(ConfigError, match="peft.unfreeze_at\\[0\\].epoch"):
        compose(["peft=freeze", "peft.unfreeze_at=[{epoch:0,modules:[blocks.1.*]}]"])
    out = trainctl(["show", "peft=freeze", "peft.trainable=[hed]"], cwd=tmp_path)
    assert out.returncode == 2 and "pattern 'hed' matches no module" in out.stderr and "blocks.0.0" in out.stderr


# --- LoRA ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    fit(root / "run", ["peft=lora", f"model.init_from={base}", "trainer.max_epochs=2", "peft.r=4"], root)
    return root / "run"


def test_lora_trains_adapters_and_the_head_and_saves_only_them(base, lora_run):
    saved = _weights(lora_run / "model.safetensors")
    ckpt = _weights(lora_run / "checkpoints" / "last" / "model.safetensors")
    assert saved.keys() == ckpt.keys()
    assert all("lora_" in k or ".modules_to_save." in k for k in saved), sorted(saved)
    assert {k for k in saved if "lora_A" in k} == {f"base_model.model.blocks.{i}.0.lora_A.default.weight"
                                                    for i in range(2)}
    assert saved["base_model.model.blocks.0.0.lora_A.default.weight"].shape == (4, 64)
    full = (base / "model.safetensors").stat().st_size
    assert (lora_run / "model.safetensors").stat().st_size < 0.15 * full
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["stop_reason"] == "completed"
    from trainctl.adapters import describe, parameter_counts
    from trainctl.job import load_saved_run

    run, *_ = load_saved_run(lora_run, [], str(lora_run.parent))
    # adapters 4 x (64 + 256) + 4 x (256 + 256), the head 10 x 256 + 10 trained in full
    assert describe(parameter_counts(run.model)) == "5,898 trainable of 90,900 parameters (6.49%)"


@pytest.mark.slow
def test_exported_adapter_loads_in_peft_and_the_merge_equals_base_plus_adapter(lora_run, base, tmp_path):
    from trainctl.job import load_saved_run

    out = trainctl(["export", str(lora_run), "-o", str(tmp_path / "adapter")], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    out = trainctl(["export", str(lora_run), "--merge", "-o", str(tmp_path / "merged")], cwd=tmp_path)
    assert out.returncode == 0, out.stderr

    run, *_ = load_saved_run(lora_run, [], str(tmp_path))
    run.model.eval()
    x = torch.from_numpy(run.data.val.source.x[:16].numpy() if hasattr(run.data.val.source.x, "numpy")
                         else run.data.val.source.x[:16])
    with torch.no_grad():
        ours = run.model(x)
    torch.save(x, tmp_path / "x.pt")
    # Hugging Face peft, in a process of its own: the base MLP with the base run's weights + the adapter
    script = f"""
import torch
from safetensors.torch import load_file
from peft import PeftModel
from trainctl.models.mlp import MLP
model = MLP((1, 8, 8), 10, 2, 256, "relu", 0.1, "none")
model.load_state_dict(load_file({str(base / 'model.safetensors')!r}))
model = PeftModel.from_pretrained(model, {str(tmp_path / 'adapter')!r}).eval()
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'peft.pt')!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert torch.allclose(torch.load(tmp_path / "peft.pt"), ours, atol=1e-6)

    merged = _weights(tmp_path / "merged" / "model.safetensors")
    assert sorted(merged) == sorted(_weights(base / "model.safetensors")), "plain MLP weights"
    from trainctl.models.mlp import MLP

    plain = MLP((1, 8, 8), 10, 2, 256, "relu", 0.1, "none").eval()
    plain.load_state_dict(merged)
    with torch.no_grad():
        assert torch.allclose(plain(x), ours, atol=1e-5)

    # `trainctl eval` of the run, the adapter export and the merged export agree
    results = [json.loads(trainctl(["eval", str(p), "--json", "-o", str(tmp_path / f"e{i}.json")],
                                   cwd=tmp_path).stdout)["metrics"]
               for i, p in enumerate((lora_run, tmp_path / "adapter", tmp_path / "merged"))]
    assert results[0] == results[1]
    assert results[2]["val/acc"] == results[0]["val/acc"]
    assert results[2]["val/loss"] == pytest.approx(results[0]["val/loss"], abs=1e-5)


def test_export_refuses_an_existing_directory_and_leaves_it_alone(lora_run, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    out = trainctl(["export", str(lora_run), "-o", str(target)], cwd=tmp_path)
    assert out.returncode == 2 and "already exists" in out.stderr
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_sigkill_then_resume_of_a_lora_run_is_bitwise_exact(base, tmp_path):
    args = [*QUIET, "peft=lora", f"model.init_from={base}", "trainer.max_epochs=3", "peft.dropout=0.1",
            "regularization.dropout=0.2", "checkpoint.every_n_steps=10", "checkpoint.every_n_epochs=null"]
    saved = _kill_and_resume(args, 35, 30, tmp_path)
    assert all("lora_" in k or "modules_to_save" in k for k in saved)


@pytest.mark.parametrize("peft", ["dora", "lora"])
def test_adapters_leave_the_base_weights_untouched(base, tmp_path, peft):
    from trainctl.job import load_saved_run

    fit(tmp_path / "run", [f"peft={peft}", f"model.init_from={base}", "trainer.max_steps=15",
                           "trainer.max_epochs=null"], tmp_path)
    run, *_ = load_saved_run(tmp_path / "run", [], str(tmp_path))
    state = run.model.state_dict()
    for key, value in _weights(base / "model.safetensors").items():
        layer, _, leaf = key.rpartition(".")
        wrapped = (f"base_model.model.{layer}.base_layer.{leaf}" if not key.startswith("head.")
                   else f"base_model.model.{layer}.original_module.{leaf}")
        assert torch.equal(state[wrapped], value), f"{key} moved"
    if peft == "dora":
        assert any("lora_magnitude_vector" in k for k in _weights(tmp_path / "run" / "model.safetensors"))


def test_adapters_on_the_cnn_and_the_gpt_use_their_default_layers(tmp_path, text_file):
    from trainctl.build import build_run

    cnn = build_run(compose([*QUIET, "model=cnn", "peft=lora"], str(tmp_path))).model
    adapted = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in cnn.named_parameters() if ".lora_A." in n})
    assert adapted == [f"base_model.model.blocks.{i}.{j}" for i in range(2) for j in (0, 3)]
    gpt = build_run(compose([*QUIET, "model=gpt", "data=text", f"data.path={text_file}", "data.seq_len=32",
                             "model.n_layer=1", "peft=lora"], str(tmp_path))).model
    adapted = sorted({n.rsplit(".lora_A", 1)[0].split("blocks.0.")[1] for n, _ in gpt.named_parameters()
                      if ".lora_A." in n})
    assert adapted == ["attn.proj", "attn.qkv", "mlp.0", "mlp.2"]


def test_custom_models_need_their_target_modules_named(tmp_path):
    out = trainctl(["show", "model=custom", "model._target_=torch.nn.Linear", "+model.in_features=64",
                    "+model.out_features=10", "peft=lora"], cwd=tmp_path)
    assert out.returncode == 2 and "peft.target_modules" in out.stderr and "Traceback" not in out.stderr
    out = trainctl(["show", "peft=lora", "peft.target_modules=[nothing_here]"], cwd=tmp_path)
    assert out.returncode == 2 and "peft.target_modules" in out.stderr and "blocks.0.0" in out.stderr


# --- QLoRA --------------------------------------------------------------------------------------------


def test_qlora_stores_the_base_in_4_bits_and_training_lowers_the_loss(base, tmp_path):
    import bitsandbytes as bnb

    from trainctl.build import build_run

    run = build_run(compose([*QUIET, "peft=qlora", "model.width=512"], str(tmp_path)))
    quantised = [m for m in run.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 2
    stored = sum(m.weight.numel() * m.weight.element_size() for m in quantised)
    stored += sum(t.numel() * t.element_size() for m in quantised
                  for t in (m.weight.quant_state.absmax, getattr(m.weight.quant_state.state2, "absmax", None))
                  if t is not None)
    fp32 = sum(m.in_features * m.out_features * 4 for m in quantised)
    assert stored <= 0.3 * fp32, f"{stored} bytes for {fp32} bytes of fp32 weights"

    summary = fit(tmp_path / "run", ["peft=qlora", f"model.init_from={base}", "trainer.max_epochs=2",
                                     "optimizer.lr=0.003"], tmp_path)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < losses[0]
    assert summary["stop_reason"] == "completed"
    saved = _weights(tmp_path / "run" / "model.safetensors")
    assert all("lora_" in k or "modules_to_save" in k for k in saved), "no 4-bit base in the checkpoint"


def test_qlora_refuses_fsdp(tmp_path):
    with pytest.raises(ConfigError, match="FSDP cannot shard"):
        compose(["peft=qlora", "parallelism=fsdp"])


# --- under torchrun -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_lora_under_ddp_and_fsdp_saves_the_adapters_and_resumes(base, tmp_path, parallelism):
    args = [*QUIET, "peft=lora", f"model.init_from={base}", "trainer.max_epochs=1", f"parallelism={parallelism}",
            "parallelism.nproc_per_node=2", f"hydra.run.dir={tmp_path / 'run'}"]
    out = trainctl(["run", *args], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    saved = _weights(tmp_path / "run" / "model.safetensors")
    assert saved and all("lora_" in k or "modules_to_save" in k for k in saved)
    out = trainctl(["run", *args[:-3], "trainer.max_epochs=2", "parallelism.nproc_per_node=2",
                    "checkpoint.resume=auto", f"hydra.run.dir={tmp_path / 'run'}", f"parallelism={parallelism}"],
                   cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "resuming from" in (tmp_path / "run" / "trainctl.log").read_text()
    result = trainctl(["eval", str(tmp_path / "run"), "--json"], cwd=tmp_path)
    assert result.returncode == 0 and json.loads(result.stdout)["metrics"]["val/acc"] > 0.5


def test_export_into_a_run_directory_another_process_owns_is_refused(lora_run, tmp_path):
    from trainctl import rundir

    rundir.acquire(lora_run, None)
    try:
        out = trainctl(["export", str(lora_run)], cwd=tmp_path)
    finally:
        rundir.release(lora_run)
    assert out.returncode == 2 and "pass -o DIR" in out.stderr and "Traceback" not in out.stderr
    assert not (lora_run / "export").exists()
