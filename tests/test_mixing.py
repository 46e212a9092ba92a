"""Mixup and CutMix (`transforms=[mixup]`, `transforms=[cutmix]`): the batches are the stated convex
combinations / pasted boxes, the targets carry the same weights, the losses take them (with label
smoothing, with bce), they are refused where they cannot work, and a resumed run mixes what the
uninterrupted one would."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build, compose, stop_then_resume, trainctl
from trainctl.errors import ConfigError
from trainctl.mixing import Mix

QUIET = ["logging.progress=none", "logging.tensorboard=false"]


def mix(mixup_alpha=0.0, cutmix_alpha=0.0, p=1.0, switch_p=0.5, num_classes=10) -> Mix:
    return Mix("test", mixup_alpha, cutmix_alpha, p, switch_p, num_classes)


def beta(alpha: float) -> float:
    return float(torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha)).sample())


# --- mixup ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_is_the_convex_combination_of_each_sample_and_its_partner(alpha):
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    torch.manual_seed(3)
    mixed_x, mixed_y = mix(mixup_alpha=alpha)(x, y)
    torch.manual_seed(3)  # the documented draws, in order: lam, then the partners
    lam, perm = beta(alpha), torch.randperm(16)
    assert 0 < lam < 1 and not torch.equal(perm, torch.arange(16))
    torch.testing.assert_close(mixed_x, lam * x + (1 - lam) * x[perm])
    onehot = torch.eye(10)[y]
    torch.testing.assert_close(mixed_y, lam * onehot + (1 - lam) * onehot[perm])
    assert torch.allclose(mixed_y.sum(1), torch.ones(16)) and not torch.equal(mixed_x, x)

    soft = torch.softmax(torch.randn(16, 10), 1)  # already class probabilities: blended as they are
    torch.manual_seed(4)
    _, twice = mix(mixup_alpha=alpha)(x, soft)
    torch.manual_seed(4)
    lam, perm = beta(alpha), torch.randperm(16)
    torch.testing.assert_close(twice, lam * soft + (1 - lam) * soft[perm])


def test_mixup_weights_follow_beta_alpha_alpha():
    """The blend weights read back from the targets (class i's weight in row i) have Beta(a, a)'s law."""
    stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(0)
    transform, n = mix(mixup_alpha=0.4, num_classes=64), 64
    x, y = torch.zeros(n, 3), torch.arange(n)
    weights = []
    for _ in range(800):
        _, t = transform(x, y)
        row = int(torch.nonzero(t.diagonal() < 1)[0])  # a sample whose partner is not itself
        weights.append(float(t[row, row]))
    assert stats.kstest(weights, stats.beta(0.4, 0.4).cdf).pvalue > 0.01
    assert stats.kstest(weights, stats.beta(1.0, 1.0).cdf).pvalue < 1e-6, "the test tells alphas apart"


# --- cutmix -------------------------------------------------------------------------------------------------

def test_cutmix_pastes_one_box_from_the_partner_and_weights_targets_by_its_area():
    n, height, width = 24, 16, 12
    x, y = torch.randn(n, 3, height, width), torch.arange(n)
    clipped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out, t = mix(cutmix_alpha=1.0, num_classes=n)(x, y)
        torch.manual_seed(seed)  # the documented draws: lam, partners, box centre (row, column)
        lam, perm = beta(1.0), torch.randperm(n)
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        box_h, box_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        rows = range(max(cy - box_h // 2, 0), min(cy - box_h // 2 + box_h, height))
        cols = range(max(cx - box_w // 2, 0), min(cx - box_w // 2 + box_w, width))
        inside = torch.zeros(height, width, dtype=torch.bool)
        inside[rows.start:rows.stop, cols.start:cols.stop] = True
        clipped += len(rows) * len(cols) < box_h * box_w
        area = inside.float().mean().item()
        assert area <= 1 - lam + 1e-6, "the box is at most (1 - lam) of the image"
        for i in range(n):
            j = int(perm[i])
            assert torch.equal(out[i][:, ~inside], x[i][:, ~inside]), "outside the box: the sample itself"
            assert torch.equal(out[i][:, inside], x[j][:, inside]), "inside the box: the partner's pixels"
            expected = torch.zeros(n)
            expected[i] += 1 - area
            expected[j] += area
            torch.testing.assert_close(t[i], expected)
    assert clipped >= 5, "boxes at the border were clipped and their weight is the clipped area"


def test_cutmix_box_is_about_one_minus_lambda_of_the_image():
    """Where the box is not clipped its area is (1 - lam) of the image, less at most the whole-pixel cut."""
    height, width = 48, 64
    transform = mix(cutmix_alpha=1.0, num_classes=8)
    x, y = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, height, width), torch.arange(8)
    checked = 0
    for seed in range(120):
        torch.manual_seed(seed)
        lam = beta(1.0)
        torch.manual_seed(seed)
        out, t = transform(x, y)
        pasted = (out[0, 0] != 0).float()
        if pasted.sum() == 0 or pasted[:, 0].any() or pasted[:, -1].any() or pasted[0].any() or pasted[-1].any():
            continue  # the partner was itself, or the box touches the border (and may be clipped)
        checked += 1
        side = math.sqrt(1 - lam)
        assert 1 - lam - side * (height + width) / (height * width) <= pasted.mean().item() <= 1 - lam + 1e-9
        assert t[0, 0].item() == pytest.approx(1 - pasted.mean().item())
    assert checked >= 10


# --- p and switch_p -------------------------------------------------------------------------------------------

def _kinds(transform: Mix, calls: int):
    """For each call: 'none', 'cutmix' (every pixel is the sample's or its partner's, the partner's on the
    share its target weight says) or 'mixup' (every pixel the blend the target weights say)."""
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8)
    kinds = []
    for _ in range(calls):
        out, t = transform(x, y)
        if out is x:
            assert t is y, "an unmixed batch keeps its hard labels"
            kinds.append("none")
            continue
        if bool((t.diagonal() == 1).all()):  # a cutmix box of no whole pixel: nothing pasted, weight 1
            assert torch.equal(out, x)
            kinds.append("cutmix")
            continue
        i = int(torch.nonzero(t.diagonal() < 1)[0])
        j = int(torch.nonzero(t[i])[t[i].nonzero().flatten() != i][0])  # the partner: the other class
        own, partner = out[i] == x[i], (out[i] == x[j]) & (out[i] != x[i])
        if bool((own | partner).all()) and partner.float().mean().item() == pytest.approx(t[i, j].item()):
            kinds.append("cutmix")
        else:
            torch.testing.assert_close(out[i], t[i, i] * x[i] + t[i, j] * x[j])
            kinds.append("mixup")
    return kinds


def test_p_is_the_share_of_mixed_batches_and_p0_leaves_them_alone():
    torch.manual_seed(0)
    assert set(_kinds(mix(mixup_alpha=0.4, p=0.0), 50)) == {"none"}
    kinds = _kinds(mix(mixup_alpha=0.4, p=0.3), 600)
    assert 0.25 < 1 - kinds.count("none") / 600 < 0.35


def test_switch_p_chooses_cutmix_or_mixup_per_batch():
    torch.manual_seed(0)
    assert set(_kinds(mix(mixup_alpha=1.0, cutmix_alpha=1.0, switch_p=0.0), 80)) == {"mixup"}
    assert set(_kinds(mix(mixup_alpha=1.0, cutmix_alpha=1.0, switch_p=1.0), 80)) == {"cutmix"}
    kinds = _kinds(mix(mixup_alpha=1.0, cutmix_alpha=1.0, switch_p=0.25), 600)
    assert 0.19 < kinds.count("cutmix") / 600 < 0.31


# --- the losses take the mixed targets ----------------------------------------------------------------------

def test_label_smoothing_and_bce_take_the_mixed_targets():
    run = build([*QUIET, "transforms=[mixup]", "regularization.label_smoothing=0.1"])
    x, y = next(iter(run.data.train.epoch(0)))
    mixed_x, t = run.transforms[0](x, y)
    logits = torch.randn(len(x), 10)
    smoothed = 0.9 * t + 0.1 / 10
    expected = -(smoothed * torch.log_softmax(logits, 1)).sum()
    torch.testing.assert_close(run.loss(logits, t), expected)
    assert run.loss.count(t) == len(x)

    bce = build([*QUIET, "transforms=[cutmix]", "loss=bce"])
    _, t = bce.transforms[0](x, y)
    expected = -(t * F.logsigmoid(logits) + (1 - t) * F.logsigmoid(-logits)).sum()
    torch.testing.assert_close(bce.loss(logits, t), expected)

    binary = build([*QUIET, "transforms=[mixup]", "loss=bce", "data.classes=[3,8]"])
    xb, yb = next(iter(binary.data.train.epoch(0)))
    _, t = binary.transforms[0](xb, yb)
    one = torch.randn(len(xb), 1)
    expected = -(t[:, 1:] * F.logsigmoid(one) + t[:, :1] * F.logsigmoid(-one)).sum()
    torch.testing.assert_close(binary.loss(one, t), expected)


# --- refused where it cannot work ---------------------------------------------------------------------------

def test_refusals_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match="applies to classification data, not regression") as error:
        compose(["transforms=[mixup]", "data=synthetic", "data.task=regression"])
    assert error.value.key == "transforms.mixup"
    with pytest.raises(ConfigError, match=r"boxes of images .* data=synthetic has none") as error:
        compose(["transforms=[cutmix]", "data=synthetic"])  # refused when the config is checked
    assert error.value.key == "transforms.cutmix.cutmix_alpha" and "transforms=[mixup]" in error.value.fix
    with pytest.raises(ConfigError) as error:
        compose(["transforms=[mixup]", "transforms.mixup.cutmix_alpha=1", "data=synthetic"])
    assert error.value.key == "transforms.mixup.cutmix_alpha" and "cutmix_alpha=0" in error.value.fix
    assert build([*QUIET, "transforms=[mixup]", "data=synthetic"]).transforms[0].name == "mixup"
    for override, key in (("transforms.mixup.mixup_alpha=-1", "transforms.mixup.mixup_alpha"),
                          ("transforms.mixup.mixup_alpha=0", "transforms.mixup.mixup_alpha"),
                          ("transforms.mixup.p=1.5", "transforms.mixup.p"),
                          ("transforms.mixup.switch_p=-0.1", "transforms.mixup.switch_p")):
        with pytest.raises(ConfigError) as error:
            compose(["transforms=[mixup]", override])
        assert error.value.key == key, override
    with pytest.raises(ConfigError, match="token ids"):
        mix(mixup_alpha=0.2)(torch.randint(0, 50, (4, 2, 16)), torch.tensor([0, 1, 0, 1]))


# --- training and resuming ----------------------------------------------------------------------------------

def test_mixing_reaches_training_only_and_resumes_exactly(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from trainctl.job import train

    common = [*QUIET, "model.dropout=0", "trainer.max_steps=8", "trainer.max_epochs=null",
              "trainer.eval_every_n_steps=4", "checkpoint.every_n_steps=1", "trainer.grad_accum_steps=2"]
    args = [*common, "transforms=[mixup,cutmix]", "transforms.cutmix.mixup_alpha=0.5", "transforms.mixup.p=0.5"]
    train(compose(args), tmp_path / "reference", str(tmp_path))
    train(compose(common), tmp_path / "plain", str(tmp_path))
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("reference", "plain"))
    assert any(not torch.equal(a[k], b[k]) for k in a), "the mixed batches reached training"

    stop_then_resume(monkeypatch, args, tmp_path / "run", str(tmp_path), 5)
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("reference", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run mixes what the uninterrupted one would"


@pytest.mark.slow
def test_cli_runs_mixup_on_a_cnn_and_refuses_cutmix_on_features(tmp_path):
    done = trainctl(["run", "model=cnn", "transforms=[mixup]", "trainer.max_epochs=2", *QUIET,
                     f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "model.safetensors").exists()
    refused = trainctl(["run", "data=synthetic", "transforms=[cutmix]", *QUIET, f"hydra.run.dir={tmp_path / 'x'}"],
                       tmp_path)
    assert refused.returncode == 2 and "transforms.cutmix" in refused.stderr and "Traceback" not in refused.stderr
