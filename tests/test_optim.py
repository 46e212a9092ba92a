"""Every optimizer builds and trains; parameter groups: weight decay exclusions, lr multipliers, Muon."""

from __future__ import annotations

import pytest
import torch

from conftest import build, compose
from trainctl.errors import ConfigError
from trainctl.models.gpt import GPT
from trainctl.models.mlp import MLP
from trainctl.optim import OPTIMIZERS, build_optimizer
from trainctl.regularization import RegularizationSpec, param_groups


STEPPERS = [n for n in OPTIMIZERS.names() if not OPTIMIZERS.get(n).closure]
"""Optimizers stepped on the gradients at hand (L-BFGS, which re-evaluates the loss, is tested below)."""


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP((8,), 3, depth=2, width=32, norm="layer")


@pytest.mark.parametrize("name", STEPPERS)
def test_every_optimizer_lowers_the_loss(name):
    spec = compose([f"optimizer={name}"]).optimizer
    model = _mlp()
    optimizer = build_optimizer(spec, param_groups(model, RegularizationSpec(weight_decay=0.01)))
    if OPTIMIZERS.get(name).train_eval:
        optimizer.train()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "every parameter moved"
    assert losses[-1] < 0.97 * losses[0], f"{name}: {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_no_decay_on_biases_and_norm_weights():
    model = _mlp()
    groups = param_groups(model, RegularizationSpec(weight_decay=0.1))
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert set(decay["names"]) == {n for n, p in model.named_parameters() if p.ndim >= 2}
    assert set(no_decay["names"]) == {n for n, p in model.named_parameters() if p.ndim < 2}
    assert any(".1." in n for n in no_decay["names"]), "LayerNorm weights are in the no-decay group"
    everything = param_groups(model, RegularizationSpec(weight_decay=0.1, exclude_bias_and_norm=False))
    assert len(everything) == 1 and len(everything[0]["params"]) == len(list(model.parameters()))


def test_lr_multipliers_by_name_pattern():
    spec = compose(["optimizer=sgd", "optimizer.lr=0.1", "+optimizer.lr_multipliers={head.*: 10, blocks.0.*: 0.5}"]).optimizer
    model = _mlp()
    optimizer = build_optimizer(spec, param_groups(model, RegularizationSpec()))
    lr_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[id(p)] = (group["lr"], group["weight_decay"])
    named = dict(model.named_parameters())
    assert lr_of[id(named["head.weight"])] == (pytest.approx(1.0), 0.01)
    assert lr_of[id(named["head.bias"])] == (pytest.approx(1.0), 0.0)
    assert lr_of[id(named["blocks.0.0.weight"])][0] == pytest.approx(0.05)
    assert lr_of[id(named["blocks.1.0.weight"])][0] == pytest.approx(0.1)


def test_lr_multiplier_that_matches_nothing_is_an_error():
    spec = compose(["+optimizer.lr_multipliers={backbone.*: 0.1}"]).optimizer
    with pytest.raises(ConfigError, match="matches no parameter"):
        build_optimizer(spec, param_groups(_mlp(), RegularizationSpec()))


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    spec = compose(["optimizer=muon"]).optimizer
    model = GPT(vocab_size=50, max_seq_len=16, n_layer=2, n_head=2, d_model=32)
    optimizer = build_optimizer(spec, param_groups(model, RegularizationSpec()))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.param_groups if g["use_muon"] for p in g["params"]}
    assert muon and all(n.startswith("blocks.") and n.endswith("weight") for n in muon)
    assert "tok_embed.weight" not in muon and "pos_embed.weight" not in muon
    assert all(g["lr"] == pytest.approx(0.02 if g["use_muon"] else 3e-4) for g in optimizer.param_groups)


def _changed(value):
    """A value of the same kind, different from ``value`` and still valid for every optimizer."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 if abs(value) >= 1 else value * 0.5 if value else 0.05
    if isinstance(value, (list, tuple)):
        return [_changed(v) if v is not None else None for v in value]
    if isinstance(value, str):
        return {"channels_first": "channels_last"}[value]
    raise TypeError(value)


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_setting_of_an_optimizer_reaches_it(name):
    """betas, momentum, nesterov, eps, ... as configured, in the optimizer's own hyperparameters."""
    defaults = compose([f"optimizer={name}"]).optimizer
    overrides = []
    for key, value in defaults.kwargs().items():
        if (name == "sgd" and key == "dampening") or value in (None, float("inf"), "strong_wolfe"):
            continue  # Nesterov needs dampening 0 (flipping nesterov is checked below); null: no generic change
        new = _changed(value)
        overrides.append(f"optimizer.{key}=" + (str(new).replace("None", "null").replace(" ", "")
                                                if isinstance(new, list) else str(new).lower() if isinstance(new, bool)
                                                else str(new)))
    spec = compose([f"optimizer={name}", *overrides]).optimizer
    decay = 0.0 if OPTIMIZERS.get(name).closure else 0.01
    optimizer = build_optimizer(spec, param_groups(_mlp(), RegularizationSpec(weight_decay=decay)))
    for key, value in spec.kwargs().items():
        if getattr(defaults, key) in (None, float("inf"), "strong_wolfe"):
            continue
        assert value != getattr(defaults, key) or (name, key) == ("sgd", "dampening")
        groups, group_key = optimizer.param_groups, key
        if name == "muon":  # Muon's own settings live in its groups, adamw_* in the AdamW groups
            muon = not key.startswith("adamw_")
            groups = [g for g in optimizer.param_groups if g["use_muon"] == muon]
            group_key = {"adamw_betas": "betas", "adamw_eps": "eps", "adamw_lr": "lr"}.get(key, key)
        assert groups
        for group in groups:
            got = group.get(group_key, optimizer.defaults.get(group_key, getattr(optimizer, group_key, None)))
            assert got == (tuple(value) if isinstance(value, (list, tuple)) else value), (name, key, got, value)


@pytest.mark.parametrize("name", [n for n in STEPPERS if n != "prodigy"])
def test_excluded_biases_keep_their_value_under_decay_only_updates(name):
    """Zero gradients, weight decay 0.1: decayed weights move (decoupled or as an L2 term), biases and norm
    weights excluded from decay stay exactly as they were. (Prodigy takes no step at all on zero
    gradients: its step size is estimated from them; its per-group decay is tested below.)"""
    spec = compose([f"optimizer={name}"]).optimizer
    model = _mlp()
    optimizer = build_optimizer(spec, param_groups(model, RegularizationSpec(weight_decay=0.1)))
    if OPTIMIZERS.get(name).train_eval:
        optimizer.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(5):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    for n, p in model.named_parameters():
        if p.ndim < 2:
            assert torch.equal(p, before[n]), f"{name}: {n} was decayed"
        else:
            assert p.abs().sum() < before[n].abs().sum(), f"{name}: {n} was not decayed"


# --- Shampoo, SOAP, Prodigy, AdEMAMix, L-BFGS ---------------------------------------------------------------

NEW = ["shampoo", "soap", "prodigy", "ademamix"]
QUIET = ["logging.progress=none", "logging.tensorboard=false", "model.dropout=0", "trainer.eval_every_n_epochs=null"]


def _losses(tmp_path, overrides):
    import json

    from trainctl.metrics import MetricsWriter
    from trainctl.runner import Runner

    run = build([*QUIET, "trainer.max_epochs=null", "logging.log_every_n_steps=1", *overrides])
    Runner(run, writer=MetricsWriter(tmp_path, tensorboard=False)).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return run, [r["train/loss"] for r in records if "train/loss" in r]


@pytest.mark.parametrize("name", NEW)
def test_new_optimizers_train_the_digits_mlp(tmp_path, name):
    """A short trainctl run (digits MLP, two weight-decay groups, default settings) lowers the loss about as
    much as AdamW's 2.29 -> 2.19 in the same 24 steps."""
    run, losses = _losses(tmp_path, [f"optimizer={name}", "trainer.max_steps=24", "regularization.weight_decay=0.05",
                                     "model.width=64", "scheduler=constant"])
    assert len(run.optimizer.param_groups) == 2 and {g["weight_decay"] for g in run.optimizer.param_groups} == {0.05, 0.0}
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.05, f"{name}: {first:.3f} -> {last:.3f}"


def test_prodigy_grows_its_step_size_from_d0(tmp_path):
    """Learning-rate free: lr stays 1.0 and the step size d grows from d0 = 1e-6 by orders of magnitude,
    the same in every group, to about the size Adam's lr would have on this model."""
    run, losses = _losses(tmp_path, ["optimizer=prodigy", "trainer.max_steps=24", "scheduler=constant"])
    ds = {g["d"] for g in run.optimizer.param_groups}
    assert len(ds) == 1 and 1e-4 < ds.pop() < 1.0
    assert all(g["lr"] == 1.0 for g in run.optimizer.param_groups)
    assert losses[-1] < 0.8 * losses[0]


def test_prodigy_refuses_lr_multipliers():
    with pytest.raises(ConfigError, match="one step size"):
        compose(["optimizer=prodigy", "+optimizer.lr_multipliers={head.*: 10}"])


def test_ademamix_needs_three_betas():
    with pytest.raises(ConfigError, match="needs 3 values"):
        compose(["optimizer=ademamix", "optimizer.betas=[0.9,0.999]"])


def _trained(name, width=32, steps=3, extra=()):
    torch.manual_seed(0)
    model = MLP((8,), 3, depth=2, width=width, norm="layer")
    spec = compose([f"optimizer={name}", *extra]).optimizer
    decay = 0.0 if name == "lbfgs" else 0.01
    optimizer = build_optimizer(spec, param_groups(model, RegularizationSpec(weight_decay=decay)))
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator)

    def step():
        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        if name == "lbfgs":
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()
    for _ in range(steps):
        step()
    return model, optimizer, step


ROUND_TRIP = {"shampoo": ["optimizer.momentum=0.5"], "soap": ["optimizer.precondition_frequency=2"],
              "prodigy": [], "ademamix": ["optimizer.t_alpha_beta3=10"], "lbfgs": ["optimizer.max_iter=3"]}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_state_round_trip_continues_exactly(name):
    """Build, a few steps, save the state (as a checkpoint does: torch.save, weights_only load), build anew
    with the same weights, load it (the shape check passes): the next step is bitwise the same."""
    import io

    from trainctl.optim import load_optimizer_state

    model, optimizer, step = _trained(name, extra=ROUND_TRIP[name])
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    other, fresh, other_step = _trained(name, steps=0, extra=ROUND_TRIP[name])
    other.load_state_dict(model.state_dict())
    scheduler = torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 1.0)
    load_optimizer_state(fresh, scheduler, saved, scheduler.state_dict())
    step()
    other_step()
    for (n, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), f"{name}: {n} differs after resuming"


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_state_saved_for_another_model_is_refused(name):
    """Same parameter count, other widths: the loaded state does not fit, and says which entry."""
    _, optimizer, _ = _trained(name, width=48, extra=ROUND_TRIP[name])
    _, fresh, _ = _trained(name, steps=0, extra=ROUND_TRIP[name])
    fresh.load_state_dict(optimizer.state_dict())
    from trainctl.optim import check_optimizer_state

    with pytest.raises(ValueError, match="optimizer state"):
        check_optimizer_state(fresh)


def test_prodigy_resumed_with_new_settings_keeps_its_step_size():
    """Changed settings on resume replace the saved ones, but d (a running estimate) stays."""
    from trainctl.optim import load_optimizer_state, optimizer_settings

    _, optimizer, _ = _trained("prodigy")
    d = optimizer.param_groups[0]["d"]
    _, fresh, _ = _trained("prodigy", steps=0, extra=["optimizer.d_coef=0.5"])
    settings = optimizer_settings(fresh)
    scheduler = torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 1.0)
    load_optimizer_state(fresh, scheduler, optimizer.state_dict(), scheduler.state_dict(), True, settings)
    assert fresh.param_groups[0]["d"] == d != 1e-6 and fresh.param_groups[0]["d_coef"] == 0.5


LBFGS_RUN = ["optimizer=lbfgs", "optimizer.max_iter=5", "data=synthetic", "data.task=regression",
             "data.n_samples=200", "data.batch_size=1000", "data.shuffle=false", "regularization.weight_decay=0",
             "scheduler=constant", "trainer.max_steps=4"]


def test_lbfgs_run_matches_torch_lbfgs_driven_by_hand(tmp_path):
    """Full batch (the whole training split), 4 trainctl steps = 4 calls of torch's LBFGS.step(closure) on a
    copy of the model: the same weights after every step, bit for bit, and the logged loss is the loss at
    the weights each step started from."""
    import copy

    from trainctl.callbacks import Callback
    from trainctl.metrics import MetricsWriter
    from trainctl.runner import Runner

    class Weights(Callback):
        name = "weights"

        def __init__(self):
            self.after = []

        def on_step_end(self, run, state):
            self.after.append([p.detach().clone() for p in run.model.parameters()])

    run = build([*QUIET, "trainer.max_epochs=null", "logging.log_every_n_steps=1", *LBFGS_RUN])
    reference = copy.deepcopy(run.model)
    (x, y), = list(run.data.train.epoch(0))  # one batch: the whole training split
    recorder = Weights()
    run.callbacks.append(recorder)
    Runner(run, writer=MetricsWriter(tmp_path, tensorboard=False)).fit()

    # the same parameters in the same order (weights, then biases: the order of trainctl's one group)
    names = {id(p): n for n, p in run.model.named_parameters()}
    own = dict(reference.named_parameters())
    ordered = [own[names[id(p)]] for p in run.optimizer.param_groups[0]["params"]]
    optimizer = torch.optim.LBFGS(ordered, lr=1.0, max_iter=5, line_search_fn="strong_wolfe")

    def objective():  # the run's loss: its sum over the batch over its number of terms
        return run.loss(reference(x), y) / run.loss.count(y)

    def closure():
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss
    import json

    logged = [json.loads(line)["train/loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    for i, after in enumerate(recorder.after):
        with torch.no_grad():
            start = float(objective())
        assert logged[i] == pytest.approx(start, rel=1e-6), f"step {i + 1}: logged loss"
        optimizer.step(closure)
        for a, b in zip(after, reference.parameters()):  # both in the model's order
            assert torch.equal(a, b), f"step {i + 1} differs from torch's LBFGS"
    assert len(recorder.after) == 4 and logged[-1] < 0.5 * logged[0]


@pytest.mark.parametrize("override, key", [("precision=fp16", "precision"),
                                           ("regularization.max_grad_norm=1.0", "regularization.max_grad_norm"),
                                           ("regularization.weight_decay=0.01", "regularization.weight_decay")])
def test_lbfgs_refuses_what_does_not_fit(tmp_path, override, key):
    from trainctl.runner import Runner

    with pytest.raises(ConfigError) as error:
        Runner(build([*QUIET, "trainer.max_epochs=null", *LBFGS_RUN, override])).fit()
    assert error.value.key == key

