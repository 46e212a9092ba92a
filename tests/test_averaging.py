"""Weight averaging (`averaging=ema|swa`): the averages equal their hand-computed formulas, SWA averages
exactly the epoch-end snapshots after its start under SWALR's learning rate, batch-norm statistics are
recomputed over the training data under the averaged weights, and evaluations, checkpoints (`trainctl
eval CKPT`) and the final weights use the average."""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F

from conftest import build, compose
from trainctl.callbacks import Callback
from trainctl.errors import ConfigError
from trainctl.runner import Runner

SMALL = ["data.batch_size=256", "logging.progress=none", "checkpoint=off"]
"""digits: 6 optimizer steps per epoch."""


def _weights(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Recorder(Callback):
    """The model's tensors after every step, at the start and end of every evaluation, and the lr used."""

    name = "recorder"

    def __init__(self) -> None:
        self.after: Dict[int, Dict[str, torch.Tensor]] = {}
        self.eval_start: Dict[int, Dict[str, torch.Tensor]] = {}
        self.eval_end: Dict[int, Dict[str, torch.Tensor]] = {}
        self.metrics: Dict[int, Dict[str, float]] = {}
        self.lrs: List[float] = []

    def on_before_optimizer_step(self, run, state):
        self.lrs.append(run.optimizer.param_groups[0]["lr"])

    def on_step_end(self, run, state):
        self.after[state.step] = _weights(run.model)

    def on_eval_start(self, run, state):
        self.eval_start[state.step] = _weights(run.model)

    def on_eval_end(self, run, state, metrics):
        self.eval_end[state.step] = _weights(run.model)
        self.metrics[state.step] = dict(metrics)


def _fit(overrides: List[str]):
    run = build([*SMALL, *overrides])
    recorder = Recorder()
    run.callbacks.append(recorder)  # after the averaging callback: it sees the swapped-in weights
    Runner(run).fit()
    averaging = next(c for c in run.callbacks if c.name == "averaging")
    return run, averaging, recorder


def _close(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], keys=None) -> None:
    for key in keys or a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-5, atol=1e-6, msg=key)


def test_ema_equals_the_hand_computed_average_with_warmup_and_every_n_steps():
    run, ema, rec = _fit(["averaging=ema", "averaging.decay=0.8", "averaging.every_n_steps=2",
                          "model.norm=batch", "trainer.max_steps=11", "trainer.eval_every_n_epochs=1"])
    expected: Dict[str, torch.Tensor] = {}
    k = 0
    for step in range(2, 12, 2):  # updates at steps 2, 4, 6, 8, 10
        w = rec.after[step]
        if not expected:
            expected = {n: t.double() for n, t in w.items()}
        else:
            k += 1
            decay = min(0.8, (1 + k) / (10 + k))  # 0.1818.., 0.25, 0.3077.., 0.3571..: warmup all along
            expected = {n: decay * expected[n] + (1 - decay) * w[n].double() for n in w}
    assert ema.updates == 5 and int(ema.averaged.n_averaged) == 5
    averaged = ema.averaged.module.state_dict()
    floats = [n for n in expected if "num_batches_tracked" not in n]
    assert any("running_mean" in n for n in floats), "batch-norm statistics are averaged too"
    _close(averaged, expected, floats)
    for name in (n for n in expected if "num_batches_tracked" in n):
        assert torch.equal(averaged[name], rec.after[10][name]), "integer buffers are copied"
    # the run ends with the average in the model (what model.safetensors holds)
    _close(_weights(run.model), averaged)
    assert not torch.equal(rec.after[11][floats[0]], averaged[floats[0]])


def test_ema_half_life_and_copied_buffers():
    run, ema, rec = _fit(["averaging=ema", "averaging.half_life_steps=3", "averaging.warmup=false",
                          "averaging.buffers=copy", "model.norm=batch", "trainer.max_steps=4",
                          "trainer.eval_every_n_epochs=null"])
    decay = 0.5 ** (1 / 3)
    expected = {n: t.double() for n, t in rec.after[1].items()}
    for step in (2, 3, 4):
        expected = {n: decay * expected[n] + (1 - decay) * rec.after[step][n].double() for n in expected}
    averaged = ema.averaged.module.state_dict()
    params = [n for n, _ in run.model.named_parameters()]
    _close(averaged, expected, params)
    for name, buffer in rec.after[4].items():
        if name not in params:
            assert torch.equal(averaged[name], buffer), f"{name} is copied from the model"


def test_ema_of_bf16_weights_is_kept_in_fp32():
    """Under precision=bf16_true an update of (1 - decay) times a small difference rounds away in bf16:
    the average is kept in fp32 and follows the hand-computed one."""
    run, ema, rec = _fit(["precision=bf16_true", "averaging=ema", "averaging.decay=0.999", "averaging.warmup=false",
                          "trainer.max_steps=6", "trainer.eval_every_n_epochs=null"])
    params = [n for n, p in run.model.named_parameters()]
    assert rec.after[1][params[0]].dtype == torch.bfloat16
    expected = {n: rec.after[1][n].double() for n in params}
    in_bf16 = {n: rec.after[1][n].clone() for n in params}
    for step in range(2, 7):
        expected = {n: 0.999 * expected[n] + 0.001 * rec.after[step][n].double() for n in params}
        in_bf16 = {n: torch.lerp(in_bf16[n], rec.after[step][n], 0.001) for n in params}
    averaged = ema.averaged.module.state_dict()
    assert all(averaged[n].dtype == torch.float32 for n in params)
    _close(averaged, expected, params)
    moved = sum(int((expected[n] != rec.after[1][n].double()).sum()) for n in params)
    stuck = sum(int((in_bf16[n] != rec.after[1][n]).sum()) for n in params)
    total = sum(rec.after[1][n].numel() for n in params)
    assert moved > 0.5 * total and stuck < 0.05 * total, "an average kept in bf16 would barely have moved"
    # the final weights are the average, rounded to the model's bf16
    for n in params:
        assert torch.equal(run.model.state_dict()[n], averaged[n].to(torch.bfloat16))


def test_swa_averages_the_epoch_end_snapshots_under_the_swa_lr():
    run, swa, rec = _fit(["averaging=swa", "averaging.start_epoch=1", "averaging.swa_lr=0.0003",
                          "averaging.anneal_epochs=0", "trainer.max_epochs=4", "trainer.eval_every_n_epochs=1",
                          "scheduler=plateau", "scheduler.mode=max", "scheduler.patience=0",
                          "scheduler.factor=0.5"])  # val/loss never "improves": plateau halves the lr at each evaluation
    per_epoch = run.horizon.steps_per_epoch
    snapshots = [rec.after[e * per_epoch] for e in (2, 3, 4)]  # the ends of epochs 1, 2, 3 (from 0)
    params = [n for n, _ in run.model.named_parameters()]
    mean = {n: sum(s[n].double() for s in snapshots) / 3 for n in params}
    assert swa.updates == 3
    _close(swa.averaged.module.state_dict(), mean, params)
    assert rec.lrs[per_epoch:] == [0.0003] * (3 * per_epoch), "SWALR's lr from epoch 1 on, whatever plateau does"
    assert rec.lrs[0] != 0.0003


def test_swa_recomputes_batch_norm_statistics_of_the_training_data_under_the_averaged_weights():
    run, swa, rec = _fit(["model=cnn", "model.channels=[4]", "averaging=swa", "averaging.start_epoch=0",
                          "trainer.max_epochs=2", "trainer.eval_every_n_epochs=null"])
    module = swa.averaged.module
    conv, bn = module.blocks[0][0], module.blocks[0][1]
    means, variances = [], []
    with torch.no_grad():
        for x, _ in run.data.train.epoch(1):  # the batches of the last epoch, in its order
            out = F.conv2d(x, conv.weight, conv.bias, padding=conv.padding)
            means.append(out.mean((0, 2, 3)))
            variances.append(out.var((0, 2, 3), unbiased=True))
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bn.running_var, torch.stack(variances).mean(0), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(bn.running_var, rec.after[12]["blocks.0.1.running_var"]), "not the copied ones"
    assert swa.bn_done
    _close(_weights(run.model), module.state_dict())


def test_evaluations_use_the_averaged_weights_and_swap_back():
    run, ema, rec = _fit(["averaging=ema", "averaging.decay=0.9", "trainer.max_steps=12",
                          "trainer.eval_every_n_steps=6", "regularization.dropout=0.1"])
    for step in (6, 12):
        for name in rec.after[step]:
            assert torch.equal(rec.eval_end[step][name], rec.after[step][name]), "trained weights back"
        assert any(not torch.equal(rec.eval_start[step][n], rec.after[step][n]) for n in rec.after[step])
    # the last evaluation is of the average, which the model holds once training ends
    again = run.evaluator(run.model, run.data.val, run.precision.autocast)
    assert again == pytest.approx(rec.metrics[12], rel=1e-6)
    _close(_weights(run.model), rec.eval_start[12])


def test_checkpoint_eval_and_final_weights_use_the_average(tmp_path):
    from safetensors.torch import load_file

    from trainctl.job import evaluate_saved, train

    spec = compose(["averaging=ema", "averaging.decay=0.9", "trainer.max_epochs=2", "data.batch_size=256",
                    "logging.progress=none", "trainer.monitor=val/loss", "checkpoint.every_n_epochs=1"])
    run_dir = tmp_path / "run"
    train(spec, run_dir, str(tmp_path))
    from trainctl.checkpoint import read_checkpoint

    best = read_checkpoint(run_dir / "checkpoints" / "best")
    saved = best.state["callbacks"]["averaging"]
    assert saved["updates"] == best.step
    raw = load_file(str(best.weights))
    assert any(not torch.equal(raw[k], saved["weights"][k]) for k in raw), "the checkpoint's weights are the trained ones"
    logged = [r for r in map(__import__("json").loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r.get("step") == best.step and "val/loss" in r][0]
    result = evaluate_saved(run_dir / "checkpoints" / "best", [], str(tmp_path))
    assert result["metrics"]["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-6)
    trained = evaluate_saved(run_dir / "checkpoints" / "best", ["averaging.use_for_eval=false"], str(tmp_path))
    assert trained["metrics"]["val/loss"] != pytest.approx(logged["val/loss"], rel=1e-6)
    last = read_checkpoint(run_dir / "checkpoints" / "last").state["callbacks"]["averaging"]["weights"]
    final = load_file(str(run_dir / "model.safetensors"))
    for key in final:
        assert torch.equal(final[key], last[key]), "model.safetensors holds the average"


@pytest.mark.parametrize("overrides,key", [
    (["averaging=ema", "averaging.decay=1.0"], "averaging.decay"),
    (["averaging=ema", "averaging.buffers=mean"], "averaging.buffers"),
    (["averaging=swa", "averaging.anneal_strategy=cosine"], "averaging.anneal_strategy"),
    (["averaging=swa", "averaging.start_epoch=5", "trainer.max_epochs=5"], "averaging.start_epoch"),
    (["averaging=swa", "parallelism=fsdp"], "averaging"),
    (["averaging=ema", "optimizer=schedulefree_adamw"], "averaging"),
    (["averaging=ema", "early_stopping.patience=2", "early_stopping.restore_best_weights=true"],
     "early_stopping.restore_best_weights"),
])
def test_what_cannot_work_is_refused(overrides, key):
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert info.value.key == key


def test_nothing_is_added_without_averaging():
    assert compose([]).averaging.name == "none"
    assert not [c for c in build(SMALL).callbacks if c.name == "averaging"]


def test_swalr_anneals_from_the_schedule_s_lr_to_swa_lr():
    run, swa, rec = _fit(["averaging=swa", "averaging.start_epoch=1", "averaging.swa_lr=0.0003",
                          "averaging.anneal_epochs=1", "averaging.anneal_strategy=linear", "trainer.max_epochs=3",
                          "trainer.eval_every_n_epochs=null"])  # scheduler=warmup_cosine steps every step too
    from torch.optim.swa_utils import SWALR

    per_epoch = run.horizon.steps_per_epoch
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=rec.lrs[per_epoch])
    reference, expected = SWALR(optimizer, 0.0003, anneal_epochs=per_epoch, anneal_strategy="linear"), []
    for _ in range(2 * per_epoch):
        expected.append(optimizer.param_groups[0]["lr"])
        reference.step()
    assert rec.lrs[per_epoch:] == pytest.approx(expected, rel=1e-12)
    assert expected[-1] == pytest.approx(0.0003) and expected[0] != pytest.approx(0.0003)
