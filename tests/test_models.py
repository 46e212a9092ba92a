"""Built-in networks and user models through `_target_`."""

from __future__ import annotations

import pytest
import torch

from conftest import build
from trainctl.errors import ConfigError
from trainctl.models.cnn import CNN
from trainctl.models.gpt import GPT


def test_gpt_is_causal_and_ties_weights():
    torch.manual_seed(0)
    model = GPT(vocab_size=256, max_seq_len=16, n_layer=2, n_head=2, d_model=32).eval()
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    out_a, out_b = model(idx), model(changed)
    assert out_a.shape == (2, 16, 256)
    torch.testing.assert_close(out_a[:, :10], out_b[:, :10])
    assert not torch.allclose(out_a[:, 10:], out_b[:, 10:])
    assert model.head.weight is model.tok_embed.weight


def test_cnn_handles_small_images():
    out = CNN((1, 8, 8), 10, channels=[8, 16, 16, 16])(torch.zeros(4, 1, 8, 8))
    assert out.shape == (4, 10)


def test_dropout_override_reaches_built_in_models():
    run = build(["regularization.dropout=0.3"])
    probabilities = {m.p for m in run.model.modules() if isinstance(m, torch.nn.Dropout)}
    assert probabilities == {0.3}


def test_custom_model_gets_data_facts_and_the_dropout_override(tmp_path):
    (tmp_path / "mynets.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, in_features, num_classes, hidden=16):\n"
        "        super().__init__()\n"
        "        self.hidden = hidden\n"
        "        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, hidden),\n"
        "                                        torch.nn.ReLU(), torch.nn.Dropout(0.5))\n"
        "        self.head = torch.nn.Linear(hidden, num_classes)\n"
        "    def forward(self, x):\n"
        "        return self.head(self.body(x))\n")
    run = build(["model=custom", "model._target_=mynets.Net", "+model.hidden=24", "allowed_target_prefixes=[mynets.]",
                 "regularization.dropout=0.2"], base_dir=str(tmp_path))
    assert run.model.hidden == 24 and run.model.head.out_features == 10 and run.model.body[1].in_features == 64
    assert run.model.body[3].p == 0.2
    with pytest.raises(ConfigError, match="takes no argument 'hiden'.*Did you mean 'hidden'"):
        build(["model=custom", "model._target_=mynets.Net", "+model.hiden=24",
               "allowed_target_prefixes=[mynets.]"], base_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="cannot import"):
        build(["model=custom", "model._target_=mynets.Missing", "allowed_target_prefixes=[mynets.]"],
              base_dir=str(tmp_path))
