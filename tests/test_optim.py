"""Every optimizer builds and trains; parameter groups: weight decay exclusions, lr multipliers, Muon."""

from __future__ import annotations

import pytest
import torch

from conftest import compose
from trainctl.errors import ConfigError
from trainctl.models.gpt import GPT
from trainctl.models.mlp import MLP
from trainctl.optim import OPTIMIZERS, build_optimizer
from trainctl.regularization import RegularizationSpec, param_groups


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP((8,), 3, depth=2, width=32, norm="layer")


@pytest.mark.parametrize("name", OPTIMIZERS.names())
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
    raise TypeError(value)


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_setting_of_an_optimizer_reaches_it(name):
    """betas, momentum, nesterov, eps, ... as configured, in the optimizer's own hyperparameters."""
    defaults = compose([f"optimizer={name}"]).optimizer
    overrides = []
    for key, value in defaults.kwargs().items():
        if name == "sgd" and key == "dampening":
            continue  # Nesterov needs dampening 0, and flipping nesterov is checked below
        new = _changed(value)
        overrides.append(f"optimizer.{key}=" + (str(new).replace("None", "null").replace(" ", "")
                                                if isinstance(new, list) else str(new).lower() if isinstance(new, bool)
                                                else str(new)))
    spec = compose([f"optimizer={name}", *overrides]).optimizer
    optimizer = build_optimizer(spec, param_groups(_mlp(), RegularizationSpec(weight_decay=0.01)))
    for key, value in spec.kwargs().items():
        assert value != getattr(defaults, key) or (name, key) == ("sgd", "dampening")
        groups, group_key = optimizer.param_groups, key
        if name == "muon":  # Muon's own settings live in its groups, adamw_* in the AdamW groups
            muon = not key.startswith("adamw_")
            groups = [g for g in optimizer.param_groups if g["use_muon"] == muon]
            group_key = {"adamw_betas": "betas", "adamw_eps": "eps", "adamw_lr": "lr"}.get(key, key)
        assert groups
        for group in groups:
            got = group.get(group_key, optimizer.defaults.get(group_key))
            assert got == (tuple(value) if isinstance(value, (list, tuple)) else value), (name, key, got, value)


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_excluded_biases_keep_their_value_under_decay_only_updates(name):
    """Zero gradients, weight decay 0.1: decayed weights move (decoupled or as an L2 term), biases and norm
    weights excluded from decay stay exactly as they were."""
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
