"""Losses: sums and term counts, label smoothing in training only, BCE and regression criteria train; focal,
class weights, smooth_l1 and kl_div against their formulas and torch's own functions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import build, compose
from trainctl.data import DataInfo
from trainctl.loss import CrossEntropySpec, LOSSES, build_loss
from trainctl.metrics import MetricsWriter
from trainctl.runner import Runner

QUIET = ["logging.tensorboard=false"]


def test_label_smoothing_applies_to_training_only():
    info = DataInfo("classification", (4,), num_classes=5)
    train, val = build_loss(CrossEntropySpec(), info, label_smoothing=0.2)
    logits = torch.tensor([[4.0, 0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1])
    assert train.count(targets) == 2
    assert train(logits, targets).item() == pytest.approx(
        F.cross_entropy(logits, targets, label_smoothing=0.2, reduction="sum").item())
    assert val(logits, targets).item() == pytest.approx(F.cross_entropy(logits, targets, reduction="sum").item())
    assert train(logits, targets).item() > val(logits, targets).item()


def test_token_losses_count_every_token():
    info = DataInfo("lm", (8,), vocab_size=256)
    train, _ = build_loss(LOSSES.get("auto").spec(), info, 0.0)
    logits, targets = torch.randn(3, 8, 256), torch.randint(0, 256, (3, 8))
    assert train.count(targets) == 24
    assert train(logits, targets).item() / 24 == pytest.approx(
        F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1)).item(), rel=1e-5)


@pytest.mark.parametrize("classes", [2, 3])
def test_bce_trains_binary_and_one_vs_rest(classes):
    run = build(["data=synthetic", f"data.n_classes={classes}", "loss=bce", "trainer.max_epochs=15", *QUIET])
    assert run.model.head.out_features == (1 if classes == 2 else classes)
    summary = Runner(run).fit()
    assert summary["final"]["val/acc"] > (0.85 if classes == 2 else 0.75)


@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
def test_regression_losses_train(loss):
    run = build(["data=synthetic", "data.task=regression", f"loss={loss}", "trainer.max_epochs=20",
                 "optimizer.lr=3e-3", *QUIET])
    first = run.evaluator(run.model, run.data.val, run.precision.autocast)["val/mse"]
    summary = Runner(run).fit()
    assert summary["final"]["val/mse"] < first / 10


def test_evaluation_every_n_steps_and_every_epoch(tmp_path):
    run = build(["trainer.max_epochs=2", "trainer.eval_every_n_steps=10", *QUIET])
    run.run_dir = tmp_path
    Runner(run, writer=MetricsWriter(tmp_path, tensorboard=False)).fit()
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    eval_steps = [r["step"] for r in records if "val/acc" in r]
    assert eval_steps == [10, 20, 23, 30, 40, 46]
    assert math.isfinite(json.loads((tmp_path / "summary.json").read_text())["best_metric"])


def test_an_epoch_end_that_is_also_an_interval_step_is_evaluated_once(tmp_path):
    run = build(["trainer.max_epochs=2", "trainer.eval_every_n_steps=23", *QUIET])  # 23 steps per epoch
    run.run_dir = tmp_path
    Runner(run, writer=MetricsWriter(tmp_path, tensorboard=False)).fit()
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/acc" in r] == [23, 46]


def _torchmetrics_reference(info, batches, loss) -> dict:
    """The same metrics from torchmetrics, batch by batch, the way trainctl used to compute them."""
    import torchmetrics
    from torchmetrics import classification, regression, text

    mean = torchmetrics.MeanMetric()
    if info.task == "classification":
        metrics = {"val/acc": classification.MulticlassAccuracy(info.num_classes, average="micro"),
                   "val/f1": classification.MulticlassF1Score(info.num_classes, average="macro")}
    elif info.task == "regression":
        metrics = {"val/mse": regression.MeanSquaredError(num_outputs=info.num_targets),
                   "val/mae": regression.MeanAbsoluteError(num_outputs=info.num_targets)}
    else:
        metrics = {"val/ppl": text.Perplexity()}
    for outputs, targets in batches:
        mean.update(loss(outputs, targets) / loss.count(targets), loss.count(targets))
        if info.task == "classification":
            preds = (outputs[:, 0] > 0).long() if outputs.shape[-1] == 1 else outputs.argmax(-1)
            for m in metrics.values():
                m.update(preds, targets)
        elif info.task == "regression":
            for m in metrics.values():
                m.update(outputs.squeeze(-1), targets.squeeze(-1)) if info.num_targets == 1 else m.update(outputs, targets)
        else:
            metrics["val/ppl"].update(outputs, targets)
    return {"val/loss": float(mean.compute()), **{k: float(m.compute().mean()) for k, m in metrics.items()}}


@pytest.mark.parametrize("task", ["classification", "binary", "absent_classes", "regression", "lm"])
def test_evaluation_matches_torchmetrics(task):
    from trainctl.arrays import DataInfo
    from trainctl.evaluation import Evaluator
    from trainctl.loss import AutoLossSpec, BCESpec, build_loss

    torch.manual_seed(0)
    n, spec = 203, AutoLossSpec()
    if task in ("classification", "absent_classes", "binary"):
        classes = 2 if task == "binary" else 7
        info = DataInfo("classification", (5,), num_classes=classes)
        outputs = torch.randn(n, 1 if task == "binary" else classes) * 2
        targets = torch.randint(0, classes, (n,))
        if task == "absent_classes":  # class 6 is neither a target nor predicted, class 5 only predicted
            targets = targets.clamp(max=4)
            outputs[:, 6] = -100.0
        spec = BCESpec() if task == "binary" else spec
    elif task == "regression":
        info = DataInfo("regression", (5,), num_targets=3)
        outputs, targets = torch.randn(n, 3), torch.randn(n, 3)
    else:
        info = DataInfo("lm", (9,), vocab_size=11)
        outputs, targets = torch.randn(n, 9, 11), torch.randint(0, 11, (n, 9))
    loss = build_loss(spec, info, 0.0)[1]
    chunks = list(zip(outputs.split(50), targets.split(50)))

    class Identity(torch.nn.Module):  # returns the prepared outputs of each batch
        def __init__(self):
            super().__init__()
            self.outputs = iter(o for o, _ in chunks)

        def forward(self, x):
            return next(self.outputs)

    class Batches:
        def epoch(self, epoch):
            return iter((torch.zeros(len(o)), t) for o, t in chunks)

        def shortfall(self):
            return 0
    ours = Evaluator(info, loss, torch.device("cpu"))(Identity(), Batches(), lambda: torch.autocast("cpu", enabled=False))
    reference = _torchmetrics_reference(info, chunks, loss)
    assert ours.keys() == reference.keys()
    for key in ours:
        assert ours[key] == pytest.approx(reference[key], rel=1e-5), key


# --- focal, class weights, smooth_l1, kl_div ---------------------------------------------------------------

def _info(classes: int, counts=None) -> DataInfo:
    return DataInfo("classification", (4,), num_classes=classes, class_counts=counts)


def _loss(name: str, info: DataInfo, smoothing: float = 0.0, **fields):
    spec = LOSSES.get(name).spec(**fields)
    spec.validate()
    return build_loss(spec, info, smoothing)


def test_focal_equals_its_formula_by_hand():
    logits = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]
    labels, gamma, weights = [0, 2], 2.0, [0.5, 1.0, 3.0]
    expected = 0.0
    for row, y in zip(logits, labels):
        p = math.exp(row[y]) / sum(math.exp(v) for v in row)
        expected += -weights[y] * (1 - p) ** gamma * math.log(p)
    train, val = _loss("focal", _info(3), gamma=gamma, class_weights=weights)
    got = train(torch.tensor(logits), torch.tensor(labels))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert val(torch.tensor(logits), torch.tensor(labels)).item() == pytest.approx(expected, rel=1e-6)
    # binary alpha (Lin et al.): alpha for class 1, 1 - alpha for class 0
    logits, labels, alpha = [[0.3, -0.4], [1.5, 0.5], [-2.0, 1.0]], [1, 0, 1], 0.25
    expected = 0.0
    for row, y in zip(logits, labels):
        p = math.exp(row[y]) / sum(math.exp(v) for v in row)
        expected += -(alpha if y == 1 else 1 - alpha) * (1 - p) ** 0.5 * math.log(p)
    train, _ = _loss("focal", _info(2), gamma=0.5, alpha=alpha)
    assert train(torch.tensor(logits), torch.tensor(labels)).item() == pytest.approx(expected, rel=1e-6)


def test_focal_with_soft_targets_is_its_formula_and_focuses_on_hard_examples():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 4, dtype=torch.float64) * 2, torch.distributions.Dirichlet(torch.ones(4)).sample((6,))
    weights = [1.0, 2.0, 0.5, 1.5]
    p = logits.softmax(-1)
    expected = -(torch.tensor(weights) * targets * (1 - p) ** 3 * p.log()).sum()
    train, _ = _loss("focal", _info(4), gamma=3.0, class_weights=weights)
    assert train.count(targets.float()) == 6
    assert train(logits.float(), targets.float()).item() == pytest.approx(expected.item(), rel=1e-5)
    # an easy example (p_t = 0.9) loses far more of its weight than a hard one (p_t = 0.1)
    easy, hard = torch.tensor([[math.log(9.0), 0.0]]), torch.tensor([[0.0, math.log(9.0)]])
    focal, _ = _loss("focal", _info(2), gamma=2.0)
    ce, _ = _loss("cross_entropy", _info(2))
    label = torch.tensor([0])
    assert focal(easy, label) / ce(easy, label) == pytest.approx(0.01, rel=1e-5)  # (1 - 0.9)^2
    assert focal(hard, label) / ce(hard, label) == pytest.approx(0.81, rel=1e-5)  # (1 - 0.1)^2


@pytest.mark.parametrize("weights", [None, [0.2, 1.0, 4.0, 0.7, 1.3]])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal_at_gamma_zero_is_cross_entropy_hard_and_soft(weights, smoothing):
    torch.manual_seed(1)
    logits, labels = torch.randn(16, 5) * 3, torch.randint(0, 5, (16,))
    soft = torch.distributions.Dirichlet(torch.ones(5)).sample((16,))
    focal, _ = _loss("focal", _info(5), smoothing, gamma=0.0, class_weights=weights)
    w = torch.tensor(weights) if weights else None
    for targets in (labels, soft):
        reference = F.cross_entropy(logits, targets, weight=w, reduction="sum", label_smoothing=smoothing)
        torch.testing.assert_close(focal(logits, targets), reference, rtol=1e-5, atol=1e-5)


def test_focal_gradient_stays_finite_on_confident_predictions():
    logits = torch.tensor([[60.0, 0.0, 0.0], [0.0, 2.0, 0.0]], requires_grad=True)
    focal, _ = _loss("focal", _info(3), gamma=0.5)
    focal(logits, torch.tensor([0, 1])).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_class_weights_match_torch_weighted_cross_entropy(smoothing):
    torch.manual_seed(2)
    weights = [1.0, 3.0, 0.25, 2.0]
    logits, labels = torch.randn(32, 4), torch.randint(0, 4, (32,))
    soft = torch.distributions.Dirichlet(torch.ones(4)).sample((32,))
    train, val = _loss("cross_entropy", _info(4), smoothing, class_weights=weights)
    w = torch.tensor(weights)
    for targets in (labels, soft):
        torch.testing.assert_close(
            train(logits, targets), F.cross_entropy(logits, targets, weight=w, reduction="sum", label_smoothing=smoothing))
        torch.testing.assert_close(val(logits, targets), F.cross_entropy(logits, targets, weight=w, reduction="sum"))
    # the batch mean divides by the number of terms; torch's 'mean' by the sum of the batch's weights
    assert train.count(labels) == 32
    mean = F.cross_entropy(logits, labels, weight=w, label_smoothing=smoothing)
    torch.testing.assert_close(train(logits, labels) / 32, mean * w[labels].sum() / 32)


def test_class_weights_of_the_wrong_length_or_for_tokens_are_refused(text_file):
    from trainctl.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        _loss("cross_entropy", _info(3), class_weights=[1.0, 2.0])
    assert error.value.key == "loss.class_weights" and "3 classes" in error.value.message
    with pytest.raises(ConfigError) as error:
        _loss("focal", _info(3), alpha=0.25)
    assert error.value.key == "loss.alpha" and "class_weights" in error.value.fix
    with pytest.raises(ConfigError) as error:  # a dataset read per batch has no class counts
        _loss("focal", _info(3), class_weights="auto")
    assert error.value.key == "loss.class_weights" and "[w0,w1,...]" in error.value.fix
    for bad in ("balanced", [1.0, -1.0], [0, 0], []):
        with pytest.raises(ConfigError) as error:
            _loss("cross_entropy", _info(2), class_weights=bad)
        assert error.value.key == "loss.class_weights"
    with pytest.raises(ConfigError) as error:
        compose(["data=text", "model=gpt", f"data.path={text_file}", "loss=cross_entropy", "loss.class_weights=auto"])
    assert error.value.key == "loss.class_weights"


def test_auto_class_weights_are_the_inverse_frequency_of_the_training_split(tmp_path):
    from trainctl import data as data_mod

    rng = np.random.default_rng(0)
    labels = ["a"] * 300 + ["b"] * 80 + ["c"] * 20
    rows = [f"{rng.normal():.4f},{rng.normal():.4f},{label}" for label in labels]
    (tmp_path / "skewed.csv").write_text("x1,x2,label\n" + "\n".join(rows) + "\n")
    overrides = ["data=csv", f"data.path={tmp_path / 'skewed.csv'}", "data.target=label", "loss=cross_entropy",
                 "loss.class_weights=auto", *QUIET]
    run = build(overrides)
    y_train = data_mod.load(compose(overrides).data).y_train
    classes, counts = np.unique(y_train, return_counts=True)
    assert classes.tolist() == [0, 1, 2] and run.data.info.class_counts == tuple(counts.tolist())
    expected = len(y_train) / (3 * counts)
    assert expected.tolist() == pytest.approx([320 / (3 * 240), 320 / (3 * 64), 320 / (3 * 16)])
    assert float((expected[y_train]).mean()) == pytest.approx(1.0)  # training examples' weights average 1
    logits, targets = torch.randn(10, 3), torch.tensor([0, 1, 2, 2, 1, 0, 0, 0, 1, 2])
    torch.testing.assert_close(run.loss(logits, targets), F.cross_entropy(
        logits, targets, weight=torch.tensor(expected, dtype=torch.float32), reduction="sum"))


def test_image_folders_know_their_class_counts(tmp_path):
    from PIL import Image

    from trainctl.data import load

    for name, n in (("cat", 9), ("dog", 3)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.new("L", (8, 8), 20 * i).save(tmp_path / name / f"{i}.png")
    spec = compose(["data=images", f"data.path={tmp_path}", "model=cnn", "data.val_fraction=0.25"]).data
    arrays = load(spec)
    assert arrays.sources is not None and sum(arrays.info.class_counts) == arrays.info.n_train == 9
    assert arrays.info.class_counts == (7, 2)  # stratified: 9 - 2 cats and 3 - 1 dogs train


@pytest.mark.parametrize("beta", [1.0, 0.3, 0.0])
def test_smooth_l1_matches_torch_and_its_formula(beta):
    torch.manual_seed(3)
    outputs, targets = torch.randn(20, 2), torch.randn(20, 2)
    train, val = _loss("smooth_l1", DataInfo("regression", (3,), num_targets=2), beta=beta)
    assert train.count(targets) == 40
    torch.testing.assert_close(train(outputs, targets), F.smooth_l1_loss(outputs, targets, beta=beta, reduction="sum"))
    hand = sum((0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta)
               for d in (outputs - targets).flatten().tolist())
    assert val(outputs, targets).item() == pytest.approx(hand, rel=1e-5)


def test_kl_div_is_its_formula_and_cross_entropy_minus_target_entropy():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.2, 0.6]])  # a zero probability adds 0 (0 log 0 = 0)
    train, _ = _loss("kl_div", _info(3))
    hand = 0.0
    for row, t in zip(logits.tolist(), soft.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        hand += sum(tc * (math.log(tc) - (v - log_z)) for v, tc in zip(row, t) if tc > 0)
    assert train(logits, soft).item() == pytest.approx(hand, rel=1e-6)
    assert train.count(soft) == 2
    entropy = -sum(tc * math.log(tc) for t in soft.tolist() for tc in t if tc > 0)
    ce = F.cross_entropy(logits, soft, reduction="sum").item()
    assert train(logits, soft).item() == pytest.approx(ce - entropy, rel=1e-6)
    labels = torch.tensor([0, 2])  # hard labels: one-hot targets have no entropy, so KL is cross-entropy
    torch.testing.assert_close(train(logits, labels), F.cross_entropy(logits, labels, reduction="sum"))
    smoothed, _ = _loss("kl_div", _info(3), 0.1)
    torch.testing.assert_close(smoothed(logits, labels), F.kl_div(
        logits.log_softmax(-1), F.one_hot(labels, 3) * 0.9 + 0.1 / 3, reduction="sum"))


def test_focal_with_auto_class_weights_trains_on_digits():
    run = build(["loss=focal", "loss.class_weights=auto", "trainer.max_epochs=2", *QUIET])
    counts = run.data.info.class_counts
    assert len(counts) == 10 and sum(counts) == run.data.info.n_train
    summary = Runner(run).fit()
    assert summary["final"]["val/acc"] > 0.8
    assert 0 < summary["final"]["val/loss"] < F.cross_entropy(torch.zeros(1, 10), torch.tensor([0])).item()
