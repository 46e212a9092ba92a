"""Losses: sums and term counts, label smoothing in training only, BCE and regression criteria train."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build
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
