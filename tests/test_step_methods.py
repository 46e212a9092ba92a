"""SAM/ASAM, adaptive gradient clipping and the L1 / coupled L2 penalties (`regularization.*`), each checked
against an independent computation: the gradient at the perturbed point on a quadratic and on a real
window (with accumulation), the units AGC clips by hand, L1's sparsity on a short digits run, and
Adam's update with a coupled L2 term next to AdamW's decoupled decay on one parameter."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build, compose
from trainctl.batches import windows_of
from trainctl.errors import ConfigError
from trainctl.penalties import AGC, Penalties, clip_unitwise_
from trainctl.runner import Runner
from trainctl.sharpness import SAM

EXACT = ["logging.progress=none", "logging.tensorboard=false", "model.dropout=0", "trainer.eval_every_n_epochs=null",
         "optimizer=sgd", "optimizer.momentum=0", "regularization.weight_decay=0", "scheduler=constant"]


# --- SAM / ASAM -----------------------------------------------------------------------------------------------

def _quadratic():
    """f(w) = 1/2 w^T A w - b^T w over two parameters (a matrix and a vector), in float64."""
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(2, 3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)]
    a = [torch.rand(2, 3, generator=gen, dtype=torch.float64) + 0.5, torch.rand(3, generator=gen, dtype=torch.float64) + 0.5]
    b = [torch.randn(2, 3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)]
    return w, (lambda ws: [ai * wi - bi for ai, wi, bi in zip(a, ws, b)])  # diagonal A: grad = A w - b


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_steps_with_the_gradient_at_the_perturbed_point_of_a_quadratic(adaptive):
    w0, grad = _quadratic()
    rho, eta, lr = 0.3, 0.1, 0.5
    g = grad(w0)
    if adaptive:  # e = rho T^2 g / ||T g||, T = |w| + eta
        t = [wi.abs() + eta for wi in w0]
        norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
        e = [rho * ti ** 2 * gi / norm for ti, gi in zip(t, g)]
    else:  # e = rho g / ||g||
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        e = [rho * gi / norm for gi in g]
    g_perturbed = grad([wi + ei for wi, ei in zip(w0, e)])
    expected = [wi - lr * gi for wi, gi in zip(w0, g_perturbed)]

    params = [torch.nn.Parameter(wi.clone()) for wi in w0]
    for p, gi in zip(params, g):
        p.grad = gi.clone()
    seen = []

    def recompute():
        seen.append([p.detach().clone() for p in params])
        for p, gi in zip(params, grad([p.detach() for p in params])):
            p.grad = gi

    sam = SAM(rho, adaptive, eta)
    sam.bind(torch.nn.Module())
    sam.before_step(params, recompute)
    for p, wi in zip(params, w0):
        assert torch.equal(p.detach(), wi), "the weights are restored exactly after the second pass"
    for at, wi, ei in zip(seen[0], w0, e):
        torch.testing.assert_close(at, wi + ei)
    torch.optim.SGD(params, lr=lr).step()
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.detach(), want)
    plain = [wi - lr * gi for wi, gi in zip(w0, g)]
    assert not torch.allclose(params[0].detach(), plain[0]), "not the plain gradient step"


def _window_reference(run, window, rho, lr):
    """The SAM step of ``run``'s model on the whole window as one batch, by hand."""
    x, y = torch.cat([b[0] for b in window]), torch.cat([b[1] for b in window])
    model = copy.deepcopy(run.model)

    def grads():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return [p.grad.clone() for p in model.parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    first = grads()
    norm = torch.sqrt(sum((g ** 2).sum() for g in first))
    with torch.no_grad():
        for p, g in zip(model.parameters(), first):
            p.add_(rho * g / norm)
    return [w - lr * g for w, g in zip(start, grads())]


@pytest.mark.parametrize("accum", [1, 2])
def test_sam_in_the_loop_steps_from_w_with_the_whole_windows_perturbed_gradient(accum):
    run = build([*EXACT, "optimizer.lr=0.2", "data.batch_size=16", f"trainer.grad_accum_steps={accum}",
                 "regularization.sam_rho=0.1"])
    assert [w.name for w in run.step_wrappers] == ["sam"]
    window = next(windows_of(run.data.train.epoch(0), accum))
    expected = _window_reference(run, window, 0.1, 0.2)
    Runner(run).train_step(window)
    for got, want in zip(run.model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


def test_sam_with_accumulation_equals_sam_on_the_combined_batch():
    args = [*EXACT, "optimizer.lr=0.2", "trainer.max_steps=6", "trainer.max_epochs=null",
            "regularization.sam_rho=0.05", "regularization.sam_adaptive=true"]
    whole, split = build([*args, "data.batch_size=32"]), build([*args, "data.batch_size=16", "trainer.grad_accum_steps=2"])
    Runner(whole).fit()
    Runner(split).fit()
    for a, b in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sam_updates_batch_norm_statistics_once_per_step():
    args = [*EXACT, "model=cnn", "data.batch_size=16", "optimizer.lr=0.1"]
    plain, sam = build(args), build([*args, "regularization.sam_rho=0.05"])
    window = next(windows_of(plain.data.train.epoch(0), 1))
    Runner(plain).train_step(window)
    Runner(sam).train_step(window)
    buffers = dict(sam.model.named_buffers())
    assert any("running_mean" in k for k in buffers)
    for key, value in plain.model.named_buffers():
        assert torch.equal(buffers[key], value), f"{key}: the second pass left the running statistics alone"


def test_sam_under_bf16_autocast_steps_close_to_fp32():
    args = [*EXACT, "optimizer.lr=0.2", "data.batch_size=32", "regularization.sam_rho=0.05"]
    fp32, bf16 = build(args), build([*args, "precision=bf16"])
    window = next(windows_of(fp32.data.train.epoch(0), 1))
    start = [p.detach().clone() for p in fp32.model.parameters()]
    Runner(fp32).train_step(window)
    Runner(bf16).train_step(window)
    for w0, a, b in zip(start, fp32.model.parameters(), bf16.model.parameters()):
        assert torch.linalg.vector_norm(a - b) < 0.05 * torch.linalg.vector_norm(a - w0) + 1e-6


def test_sam_is_refused_with_the_loss_scaler_and_a_bad_rho():
    with pytest.raises(ConfigError, match="second forward/backward pass"):
        build(["logging.progress=none", "precision=fp16", "regularization.sam_rho=0.05"])
    with pytest.raises(ConfigError) as error:
        compose(["regularization.sam_rho=-1"])
    assert error.value.key == "regularization.sam_rho"
    with pytest.raises(ConfigError) as error:
        compose(["regularization.sam_adaptive=true"])
    assert error.value.key == "regularization.sam_adaptive"


# --- AGC --------------------------------------------------------------------------------------------------------

def test_agc_clips_exactly_the_units_over_the_threshold():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [6.0, 8.0]])  # unit norms 5, 0 (-> eps), 1, 10
    g = torch.tensor([[0.3, 0.4], [0.0, 2.0], [0.06, 0.08], [0.24, 0.32]])  # norms 0.5, 2, 0.1, 0.4
    clipping, eps = 0.05, 1.0
    # limits 0.25, 0.05, 0.05, 0.5: rows 0, 1 and 2 are over and scaled to their limit, row 3 is not
    expected = torch.stack([g[0] * 0.25 / 0.5, g[1] * 0.05 / 2, g[2] * 0.05 / 0.1, g[3]])
    got = g.clone()
    clip_unitwise_(w, got, clipping, eps)
    torch.testing.assert_close(got, expected)
    assert torch.equal(got[3], g[3]), "a unit under the threshold is left exactly as it was"
    conv_w, conv_g = torch.ones(2, 1, 2, 2), torch.stack([torch.full((1, 2, 2), 0.01), torch.full((1, 2, 2), 1.0)])
    clip_unitwise_(conv_w, conv_g, 0.1, 1e-3)  # unit norms: weights 2, grads 0.02 and 2; limit 0.2
    assert torch.equal(conv_g[0], torch.full((1, 2, 2), 0.01))
    torch.testing.assert_close(torch.linalg.vector_norm(conv_g[1]), torch.tensor(0.2))
    bias, bias_g = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 1.0])  # a vector is one unit: limit 0.5
    clip_unitwise_(bias, bias_g, 0.1, 1e-3)
    torch.testing.assert_close(bias_g, torch.tensor([1.0, 1.0]) * 0.5 / 2 ** 0.5)


def test_agc_in_the_loop_leaves_excluded_parameters_alone():
    run = build([*EXACT, "regularization.agc_clipping=0.001", "regularization.agc_exclude=[head.*]"])
    agc = run.step_wrappers[0]
    assert isinstance(agc, AGC)
    agc.bind(run.model)
    params = [p for p in run.model.parameters()]
    gen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    before = {n: p.grad.clone() for n, p in run.model.named_parameters()}
    agc.before_step(params, lambda: None)
    for name, p in run.model.named_parameters():
        expected = before[name].clone()
        if not name.startswith("head."):
            clip_unitwise_(p.detach(), expected, 0.001, 1e-3)
            assert not torch.equal(expected, before[name])
        assert torch.equal(p.grad, expected), name
    with pytest.raises(ConfigError, match="matches no parameter"):
        AGC(0.01, 1e-3, ["classifier.*"]).bind(run.model)


# --- penalties ----------------------------------------------------------------------------------------------

def test_penalties_add_the_gradient_of_their_loss_terms_and_log_their_value():
    run = build([*EXACT, "regularization.l1=0.01", "regularization.l2=0.1"])
    penalties = run.step_wrappers[0]
    assert isinstance(penalties, Penalties)
    named = dict(run.model.named_parameters())
    chosen = [n for n, p in named.items() if p.ndim >= 2]  # the weight-decayed ones
    for p in named.values():
        p.grad = torch.zeros_like(p)
    penalties.before_step(list(named.values()), lambda: None)
    reference = {n: p.detach().clone().requires_grad_() for n, p in named.items()}
    loss = sum(0.01 * reference[n].abs().sum() + 0.1 / 2 * (reference[n] ** 2).sum() for n in chosen)
    loss.backward()
    for n, p in named.items():
        want = reference[n].grad if n in chosen else torch.zeros_like(p)
        torch.testing.assert_close(p.grad, want)
    assert penalties.log_values()["train/penalty"] == pytest.approx(loss.item(), rel=1e-5)
    only_head = build([*EXACT, "regularization.l1=0.01", "regularization.penalty_params=[head.bias]"]).step_wrappers[0]
    only_head.bind(run.model)
    assert only_head.chosen(list(named.values())) == [named["head.bias"]]


def test_l1_drives_more_weights_to_zero_than_no_penalty():
    args = ["logging.progress=none", "logging.tensorboard=false", "trainer.eval_every_n_epochs=null",
            "trainer.max_epochs=3", "optimizer=sgd", "optimizer.lr=0.1", "regularization.weight_decay=0",
            "model.width=64", "logging.log_every_n_steps=10"]
    plain, sparse = build(args), build([*args, "regularization.l1=0.003"])
    Runner(plain).fit()
    runner = Runner(sparse)
    runner.fit()

    def near_zero(model):
        weights = torch.cat([p.detach().flatten() for p in model.parameters() if p.ndim >= 2])
        return (weights.abs() < 1e-3).float().mean().item()
    assert near_zero(sparse.model) > near_zero(plain.model) + 0.2, (near_zero(sparse.model), near_zero(plain.model))
    assert runner.final["train/penalty"] > 0 and "train/penalty" not in Runner(plain).final


def _adam_by_hand(w, grad_of, lr, betas, eps, steps, l2=0.0, decoupled=0.0):
    m = v = 0.0
    for t in range(1, steps + 1):
        g = grad_of(w) + l2 * w
        w = w * (1 - lr * decoupled)
        m, v = betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g * g
        w = w - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)) ** 0.5 + eps)
    return w


@pytest.mark.parametrize("coupled", [True, False])
def test_coupled_l2_and_decoupled_decay_follow_their_formulas_on_one_parameter(coupled):
    decay = 0.5
    overrides = (["optimizer=adam", "regularization.weight_decay=0", f"regularization.l2={decay}"] if coupled
                 else ["optimizer=adamw", f"regularization.weight_decay={decay}"])
    run = build(["logging.progress=none", "optimizer.lr=0.1", "scheduler=constant", *overrides])
    group = run.optimizer.param_groups[0]
    w = torch.nn.Parameter(torch.tensor([[2.0]], dtype=torch.float64))  # a weight: penalised and decayed
    opt = type(run.optimizer)([w], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                              weight_decay=group["weight_decay"])
    holder = torch.nn.Module()
    holder.weight = w
    for wrapper in run.step_wrappers:
        wrapper.bind(holder)
    for _ in range(3):
        w.grad = (w.detach() - 1.0) * 3.0  # the data loss 3/2 (w - 1)^2
        for wrapper in run.step_wrappers:
            wrapper.before_step([w], lambda: None)
        opt.step()
    want = _adam_by_hand(2.0, lambda x: 3.0 * (x - 1.0), 0.1, group["betas"], group["eps"], 3,
                         l2=decay if coupled else 0.0, decoupled=0.0 if coupled else decay)
    assert w.item() == pytest.approx(want, rel=1e-12)
    other = _adam_by_hand(2.0, lambda x: 3.0 * (x - 1.0), 0.1, group["betas"], group["eps"], 3,
                          l2=0.0 if coupled else decay, decoupled=decay if coupled else 0.0)
    assert abs(w.item() - other) > 1e-2, "coupled and decoupled decay are different updates"


def test_penalty_settings_are_validated():
    for override, key in [("regularization.l1=-1", "regularization.l1"),
                          ("regularization.agc_clipping=0", "regularization.agc_clipping"),
                          ("regularization.agc_eps=0", "regularization.agc_eps"),
                          ("regularization.penalty_params=[head.*]", "regularization.penalty_params"),
                          ("regularization.agc_exclude=[head.*]", "regularization.agc_exclude")]:
        with pytest.raises(ConfigError) as error:
            compose([override])
        assert error.value.key == key, override
    with pytest.raises(ConfigError, match="matches no parameter"):
        build(["regularization.l2=0.1", "regularization.penalty_params=[nothing.*]"]).step_wrappers[0].bind(
            build(["logging.progress=none"]).model)


def test_wrappers_act_in_order_and_are_bound_by_the_build():
    run = build(["logging.progress=none", "regularization.sam_rho=0.05", "regularization.l1=1e-4",
                 "regularization.agc_clipping=0.01", "regularization.agc_exclude=[head.*]"])
    assert [w.name for w in run.step_wrappers] == ["sam", "penalties", "agc"]
    agc = run.step_wrappers[2]
    head = dict(run.model.named_parameters())["head.weight"]
    assert agc._chosen is not None and id(head) not in agc._chosen, "build_run binds the wrappers to the model"
