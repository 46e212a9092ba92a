"""Initialisation schemes (`model.init`) and stochastic depth (`model.drop_path` on the GPT): each scheme
draws the variance its formula gives, biases are zero, norm layers and embeddings are kept, a pretrained
start replaces it; drop-path drops whole samples' branches at linear-over-depth rates, keeps the
expectation, is the identity in evaluation and resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import build, compose, stop_then_resume
from trainctl.errors import ConfigError
from trainctl.initialization import initialize
from trainctl.models import DropPath
from trainctl.models.gpt import GPT, Block

QUIET = ["logging.progress=none", "logging.tensorboard=false"]
FAN_IN, FAN_OUT = 512, 256


def _layer(scheme: str, activation: str = "relu", **kwargs) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(FAN_IN, FAN_OUT)
    initialize(nn.Sequential(layer), scheme, activation=activation, **kwargs)
    return layer


@pytest.mark.parametrize("scheme,activation,gain,variance", [
    ("xavier_uniform", "relu", 1.0, 2 / (FAN_IN + FAN_OUT)),
    ("xavier_normal", "relu", 1.5, 1.5**2 * 2 / (FAN_IN + FAN_OUT)),
    ("kaiming_uniform", "relu", 1.0, 2 / FAN_IN),                      # fan_in mode, relu gain sqrt(2)
    ("kaiming_normal", "tanh", 1.0, (5 / 3) ** 2 / FAN_IN),
    ("kaiming_normal", "leaky_relu", 1.0, 2 / (1 + 0.01**2) / FAN_IN),
    ("kaiming_uniform", "gelu", 1.0, 2 / FAN_IN),                      # gelu/silu get relu's gain
    ("normal", "relu", 1.0, 0.05**2),
])
def test_each_scheme_draws_its_documented_variance(scheme, activation, gain, variance):
    layer = _layer(scheme, activation, gain=gain, std=0.05)
    w = layer.weight.detach()
    assert w.var().item() == pytest.approx(variance, rel=0.03)
    assert abs(w.mean().item()) < 0.01 * math.sqrt(variance)
    bound = math.sqrt(3 * variance)  # a uniform's half-width for that variance
    if scheme.endswith("uniform"):
        assert w.abs().max().item() <= bound * (1 + 1e-6)
    else:
        assert (w.abs() > bound).float().mean().item() == pytest.approx(0.083, abs=0.01)  # P(|z| > sqrt 3)
    assert torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_orthogonal_gives_orthonormal_rows_for_linear_and_conv(gain):
    torch.manual_seed(0)
    linear, conv = nn.Linear(FAN_IN, FAN_OUT), nn.Conv2d(16, 32, 3)
    initialize(nn.Sequential(linear, conv), "orthogonal", gain=gain)
    for w in (linear.weight, conv.weight.flatten(1)):  # fewer rows than columns: W W^T = gain^2 I
        torch.testing.assert_close(w @ w.T, gain**2 * torch.eye(w.shape[0]), atol=1e-5, rtol=0)
    assert torch.count_nonzero(linear.bias) == 0 and torch.count_nonzero(conv.bias) == 0


def test_norm_layers_are_kept_and_default_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Conv1d(8, 8, 3), nn.BatchNorm1d(8))
    for norm in (model[1], model[3]):
        nn.init.constant_(norm.weight, 3.0)
        nn.init.constant_(norm.bias, -1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert initialize(model, "default") == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert initialize(model, "xavier_normal") == 2
    for name in ("1.weight", "1.bias", "3.weight", "3.bias", "3.running_mean", "3.running_var"):
        assert torch.equal(model.state_dict()[name], before[name]), name
    assert not torch.equal(model[0].weight, before["0.weight"])


def test_a_built_in_model_gets_the_scheme_from_the_config_the_same_way_for_the_same_seed():
    a = build([*QUIET, "model.init=xavier_normal", "model.init_gain=2.0"]).model
    b = build([*QUIET, "model.init=xavier_normal", "model.init_gain=2.0"]).model
    plain = build([*QUIET]).model
    first = a.blocks[0][0]  # digits: 64 features -> 256
    fan_in, fan_out = first.weight.shape[1], first.weight.shape[0]
    assert first.weight.var().item() == pytest.approx(4 * 2 / (fan_in + fan_out), rel=0.05)
    assert all(torch.count_nonzero(m.bias) == 0 for m in a.modules() if isinstance(m, nn.Linear))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name}: same seed, same weights"
    assert not torch.equal(first.weight, plain.blocks[0][0].weight)
    other_seed = build([*QUIET, "model.init=xavier_normal", "model.init_gain=2.0", "trainer.seed=1"]).model
    assert not torch.equal(first.weight, other_seed.blocks[0][0].weight)


def test_cnn_convolutions_get_kaiming_from_its_activation():
    model = build([*QUIET, "model=cnn", "model.init=kaiming_normal", "model.activation=tanh",
                   "model.channels=[64]"]).model
    conv = model.blocks[0][3]  # the second 3x3 convolution: 64 -> 64
    assert conv.weight.var().item() == pytest.approx((5 / 3) ** 2 / (64 * 9), rel=0.03)
    assert torch.equal(model.blocks[0][1].weight, torch.ones(64)), "batch norm keeps its ones"


def _gpt(text_file, *extra):
    return build([*QUIET, "model=gpt", "data=text", f"data.path={text_file}", "model.n_layer=2",
                  "model.d_model=64", "model.n_head=2", *extra]).model


def test_gpt_embeddings_and_tied_head_keep_their_init_except_under_normal(text_file):
    default = _gpt(text_file)
    proj = default.blocks[0].attn.proj.weight
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.05), "GPT-2's scaled residual init"
    xavier = _gpt(text_file, "model.init=xavier_uniform")
    assert xavier.head.weight is xavier.tok_embed.weight
    assert xavier.tok_embed.weight.std().item() == pytest.approx(0.02, rel=0.05), "embeddings are kept"
    assert xavier.blocks[0].attn.qkv.weight.var().item() == pytest.approx(2 / (64 + 192), rel=0.05)
    normal = _gpt(text_file, "model.init=normal", "model.init_std=0.05")
    for name, p in normal.named_parameters():
        if p.dim() == 2:  # every weight, the residual projections and the embeddings included
            assert p.std().item() == pytest.approx(0.05, rel=0.1), name
        elif name.endswith("bias") and "ln" not in name:
            assert torch.count_nonzero(p) == 0, name
        else:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), f"{name}: norm layers are kept"


def test_init_from_replaces_the_scheme(tmp_path):
    from safetensors.torch import save_file

    saved = build([*QUIET]).model
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(tmp_path / "start.safetensors"))
    loaded = build([*QUIET, "model.init=orthogonal", f"model.init_from={tmp_path / 'start.safetensors'}"]).model
    for (name, p), q in zip(loaded.named_parameters(), saved.parameters()):
        assert torch.equal(p, q), name


def test_bad_init_settings_are_refused_with_the_key(tmp_path):
    for overrides, key in [(["model.init=glorot"], "model.init"), (["model.init_std=0"], "model.init_std"),
                           (["model.init_gain=-1"], "model.init_gain")]:
        with pytest.raises(ConfigError) as error:
            compose([*QUIET, *overrides])
        assert error.value.key == key
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "tokenizer_config.json").write_text("{}")
    (tmp_path / "t.txt").write_text("some text " * 50)
    with pytest.raises(ConfigError, match="discard the weights") as error:
        compose(["model=hf", f"model.path={hf}", "data=hf_text", f"data.path={tmp_path / 't.txt'}",
                 f"data.tokenizer={hf}", "model.init=xavier_uniform"])
    assert error.value.key == "model.init"


# --- stochastic depth ------------------------------------------------------------------------------------

def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    torch.manual_seed(0)
    module = DropPath(0.3).train()
    x = torch.ones(20000, 4, 8)
    y = module(x)
    per_sample = y.flatten(1)
    assert torch.all(per_sample == per_sample[:, :1]), "one decision per sample"
    dropped = (per_sample[:, 0] == 0).float().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.015)
    assert torch.all((per_sample[:, 0] == 0) | torch.isclose(per_sample[:, 0], torch.tensor(1 / 0.7)))
    assert y.mean().item() == pytest.approx(1.0, abs=0.02), "kept samples are scaled by 1/(1-p)"
    module.eval()
    assert module(x) is x, "identity in eval mode"


def test_a_gpt_block_drops_its_attention_and_mlp_branches_per_sample():
    torch.manual_seed(0)
    block = Block(16, 2, 0.0, True, drop_path_p=0.5).train()
    x = torch.randn(8, 5, 16)
    torch.manual_seed(1)
    got = block(x)
    torch.manual_seed(1)  # the same draws, by hand: x + m1/keep * attn, then + m2/keep * mlp
    m1 = torch.empty(8, 1, 1).bernoulli_(0.5)
    m2 = torch.empty(8, 1, 1).bernoulli_(0.5)
    with torch.no_grad():
        h = x + m1 / 0.5 * block.attn(block.ln1(x))
        expected = h + m2 / 0.5 * block.mlp(block.ln2(h))
    torch.testing.assert_close(got, expected)
    assert 0 < m1.sum() < 8 and 0 < m2.sum() < 8 and not torch.equal(m1, m2)


def test_rates_are_linear_over_depth_and_eval_is_unchanged():
    model = GPT(50, 8, n_layer=5, n_head=2, d_model=16, drop_path_rate=0.2)
    assert isinstance(model.blocks[0].drop_path, nn.Identity), "the first block is never dropped"
    assert [b.drop_path.p for b in model.blocks[1:]] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    plain = GPT(50, 8, n_layer=5, n_head=2, d_model=16)
    plain.load_state_dict(model.state_dict())  # drop-path adds no tensors: checkpoints stay interchangeable
    idx = torch.randint(0, 50, (4, 8))
    assert torch.equal(model.eval()(idx), plain.eval()(idx))
    assert not torch.equal(model.train()(idx), plain.train()(idx))


def test_regularization_dropout_leaves_drop_path_alone(text_file):
    model = _gpt(text_file, "model.drop_path=0.1", "regularization.dropout=0.3")
    assert model.blocks[1].drop_path.p == 0.1 and model.blocks[1].attn.resid_dropout.p == 0.3
    with pytest.raises(ConfigError, match="first block is never dropped"):
        compose(["model=gpt", "data=text", f"data.path={text_file}", "model.n_layer=1", "model.drop_path=0.1"])
    with pytest.raises(ConfigError) as error:
        compose(["model=gpt", "data=text", f"data.path={text_file}", "model.drop_path=1.0"])
    assert error.value.key == "model.drop_path"


def test_a_gpt_with_drop_path_trains_and_resumes_exactly(tmp_path, text_file, monkeypatch):
    from safetensors.torch import load_file

    from trainctl.job import train

    common = [*QUIET, "model=gpt", "data=text", f"data.path={text_file}", "model.n_layer=3", "model.d_model=16",
              "model.n_head=2", "data.seq_len=16", "data.batch_size=8", "trainer.max_steps=6",
              "trainer.max_epochs=null", "trainer.eval_every_n_steps=3", "checkpoint.every_n_steps=1"]
    args = [*common, "model.drop_path=0.5"]
    train(compose(args), tmp_path / "reference", str(tmp_path))
    ref = load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in ref.values())

    stop_then_resume(monkeypatch, args, tmp_path / "run", str(tmp_path), 3)
    run = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(ref[k], run[k]) for k in ref), "masks drawn after a resume are those of the whole run"
