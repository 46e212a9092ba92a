"""Metrics on the training batches (`logging.train_metrics`): train/acc, train/mse, train/mae, train/ppl,
each checked against an independent computation over the same batches, across accumulation windows,
with soft targets, under DDP-style reduction, across a checkpoint, and in `trainctl report`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import build
from trainctl.batches import windows_of
from trainctl.metrics import TRAIN_METRICS, VAL_METRICS, MetricsWriter, TrainMeter, read_metrics
from trainctl.runner import Runner

pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")

QUIET = ["trainer.eval_every_n_epochs=null", "logging.tensorboard=false", "checkpoint=off", "trainer.max_epochs=null"]


def _fit_fixed(overrides, tmp_path: Path):
    """Train with the optimizer step switched off (the model stays as built, so every training batch can be
    scored again afterwards); returns the run and its training readings."""
    run = build([*QUIET, *overrides])
    run.optimizer.step = lambda *a, **k: None
    Runner(run, writer=MetricsWriter(tmp_path, tensorboard=False)).fit()
    return run, [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]


def _intervals(run, every: int, steps: int):
    """The micro-batches of each log interval, as the loop drew them (epoch 0, in order)."""
    windows = list(windows_of(run.data.train.epoch(0), run.grad_accum_steps))[:steps]
    return [[b for w in windows[i:i + every] for b in w] for i in range(0, steps, every)]


def test_classification_accuracy_covers_every_micro_batch_of_the_interval(tmp_path):
    every, steps = 3, 6  # accumulation 2: six micro-batches per reading
    run, logged = _fit_fixed(["model=mlp", "data=digits", "model.dropout=0", "data.batch_size=32",
                              "trainer.grad_accum_steps=2", f"logging.log_every_n_steps={every}",
                              f"trainer.max_steps={steps}"], tmp_path)
    assert [r["step"] for r in logged] == [3, 6]
    with torch.no_grad():
        for record, batches in zip(logged, _intervals(run, every, steps)):
            assert len(batches) == 6
            correct = sum(int((run.model(x).argmax(-1) == y).sum()) for x, y in batches)
            total = sum(len(y) for _, y in batches)
            assert record["train/acc"] == pytest.approx(correct / total, abs=1e-12)
    assert 0 < logged[0]["train/acc"] < 1  # an untrained model: a non-trivial check


def test_lm_token_accuracy_and_perplexity(tmp_path, text_file):
    every, steps = 2, 4
    run, logged = _fit_fixed(["model=gpt", "data=text", f"data.path={text_file}", "model.n_layer=1",
                              "model.d_model=32", "model.n_head=2", "data.seq_len=16", "data.batch_size=8",
                              "trainer.grad_accum_steps=2", f"logging.log_every_n_steps={every}",
                              f"trainer.max_steps={steps}"], tmp_path)
    with torch.no_grad():
        for record, batches in zip(logged, _intervals(run, every, steps)):
            correct = sum(int((run.model(x).argmax(-1) == y).sum()) for x, y in batches)
            assert record["train/acc"] == pytest.approx(correct / sum(y.numel() for _, y in batches), abs=1e-12)
            assert record["train/ppl"] == pytest.approx(math.exp(record["train/loss"]), rel=1e-12)


def test_regression_errors_are_in_the_targets_own_units(tmp_path):
    import torchmetrics.functional as tmf

    every, steps = 2, 4
    run, logged = _fit_fixed(["model=mlp", "data=synthetic", "data.task=regression", "data.n_targets=2",
                              "model.dropout=0", "data.batch_size=50", "trainer.grad_accum_steps=2",
                              f"logging.log_every_n_steps={every}", f"trainer.max_steps={steps}"], tmp_path)
    info = run.data.info
    mean, std = torch.tensor(info.target_mean), torch.tensor(info.target_std)
    assert std.min() > 50  # standardized targets: a metric in the wrong units would be far off
    with torch.no_grad():
        for record, batches in zip(logged, _intervals(run, every, steps)):
            preds = torch.cat([run.model(x) for x, _ in batches]) * std + mean
            targets = torch.cat([y for _, y in batches]) * std + mean
            assert record["train/mse"] == pytest.approx(float(tmf.mean_squared_error(preds, targets)), rel=1e-5)
            assert record["train/mae"] == pytest.approx(float(tmf.mean_absolute_error(preds, targets)), rel=1e-5)
            assert "train/ppl" not in record and "train/acc" not in record


def test_soft_targets_count_against_their_largest_weight(tmp_path):
    """Mixup in the real loop: every (outputs, soft targets) pair the loss saw, scored by hand."""
    run = build([*QUIET, "model=mlp", "data=digits", "transforms=[mixup]", "transforms.mixup.mixup_alpha=1.0",
                 "data.batch_size=32", "trainer.grad_accum_steps=2", "logging.log_every_n_steps=3",
                 "trainer.max_steps=3"])
    seen = []
    loss = run.loss

    class Recording:
        def __call__(self, outputs, targets):
            seen.append((outputs.detach().clone(), targets.clone()))
            return loss(outputs, targets)

        def count(self, targets):
            return loss.count(targets)

    run.loss = Recording()
    Runner(run, writer=MetricsWriter(tmp_path, tensorboard=False)).fit()
    (record,) = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert len(seen) == 6 and all(t.is_floating_point() and t.shape[-1] == 10 for _, t in seen)
    assert any(float(t.max(-1).values.min()) < 0.9 for _, t in seen), "the targets are mixed"
    correct = sum(int((o.argmax(-1) == t.argmax(-1)).sum()) for o, t in seen)
    assert record["train/acc"] == pytest.approx(correct / sum(len(t) for _, t in seen), abs=1e-12)


def test_one_logit_and_soft_binary_targets():
    meter = TrainMeter(1, torch.device("cpu"), info=_Info("classification"))
    tally = meter.tally()
    logits = torch.tensor([[2.0], [-1.0], [0.5], [-3.0]])  # predicted classes 1, 0, 1, 0
    tally(logits, torch.tensor([1, 1, 1, 0]))  # 3 right
    tally(logits, torch.tensor([[0.3, 0.7], [0.6, 0.4], [0.9, 0.1], [0.5, 0.5]]))  # classes 1, 0, 0, 0: 3 right
    meter.add(torch.zeros(()))
    meter.step_done(8, 8, None)
    assert meter.read()["train/acc"] == 6 / 8


class _Info:
    def __init__(self, task, target_std=None):
        self.task, self.target_std = task, target_std


def _meter(task="classification", dist=None):
    return TrainMeter(1, torch.device("cpu"), info=_Info(task), dist=dist)


def test_a_recomputed_pass_and_a_skipped_step_are_not_counted():
    meter = _meter()
    right, wrong = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    tally = meter.tally()
    tally(right, torch.tensor([1]))
    assert meter.tally() is None, "a step wrapper's second forward pass (SAM) adds nothing"
    meter.add(torch.zeros(()))
    meter.step_done(1, 1, None)
    meter.tally()(wrong, torch.tensor([1]))  # a step skipped as non-finite: no add, so not counted
    meter.step_done(1, 0, None)
    meter.tally()(right, torch.tensor([1]))
    meter.add(torch.zeros(()))
    meter.step_done(1, 1, None)
    assert meter.read()["train/acc"] == 1.0


def test_readings_cover_every_rank():
    class TwoRanks:
        world_size = 2

        def sum(self, tensor):  # the other rank got 1 of its 2 rows right
            return tensor.add_(1)

    meter = _meter(dist=TwoRanks())
    meter.tally()(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([1, 1]))
    meter.add(torch.zeros(()))
    meter.step_done(4, 4, None)
    assert meter.read()["train/acc"] == 3 / 4


def test_the_sums_survive_a_checkpoint():
    def fed(meter, targets):
        meter.tally()(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor(targets))
        meter.add(torch.zeros(()))
        meter.step_done(3, 3, None)
        return meter

    saved = fed(_meter(), [1, 0, 1]).state_dict()  # 3 of 3 right before the checkpoint
    resumed = _meter()
    resumed.load_state_dict(saved)
    assert fed(resumed, [0, 1, 0]).read()["train/acc"] == 3 / 6  # 0 of 3 after it
    plain = TrainMeter(1, torch.device("cpu"))
    plain.load_state_dict(saved)  # metrics switched off on resume: the loss state still loads
    assert "train/acc" not in plain.read()


def test_switched_off_and_names_pair_with_validation():
    run = build(["model=mlp", "data=digits", "logging.train_metrics=false"])
    assert run.meter.metrics is None and run.meter.tally() is None
    for task, names in TRAIN_METRICS.items():
        twins = {"val/" + n[6:] for n in names} - {"val/acc"} if task == "lm" else {"val/" + n[6:] for n in names}
        assert twins <= set(VAL_METRICS[task]), task


# --- report ------------------------------------------------------------------------------------------

def _run_dir(path: Path, lr: str, train_acc, val_acc) -> Path:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr={lr}\n")
    records = [{"step": 10 * (i + 1), "epoch": i, "train/loss": 1.0 / (i + 1), "train/acc": a}
               for i, a in enumerate(train_acc)]
    records += [{"step": 10 * (i + 1), "epoch": i + 1, "val/acc": v, "val/loss": 1.0 - v} for i, v in enumerate(val_acc)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"status": "done", "stop_reason": "completed", "monitor": "val/acc", "mode": "max",
               "best_metric": max(val_acc), "steps": 10 * len(val_acc),
               "final": {"val/acc": val_acc[-1], "val/loss": 1 - val_acc[-1], "train/acc": train_acc[-1],
                         "train/loss": 1.0 / len(train_acc)}}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_report_shows_the_gap_and_draws_training_twins(tmp_path):
    from trainctl import plots
    from trainctl.report import build_report, columns, find_runs, markdown, run_row, single_run_rows

    root = tmp_path / "sweep"
    _run_dir(root / "0", "0.1", [0.5, 0.99], [0.6, 0.80])  # over-fits: gap 0.19
    _run_dir(root / "1", "0.01", [0.4, 0.85], [0.5, 0.82])
    report = build_report(find_runs([str(root)]))
    assert "acc gap (train-val)" in columns(report)
    gaps = {run_row(report, r)["run"]: run_row(report, r)["gap"] for r in report.runs}
    assert gaps == {"0": pytest.approx(0.19), "1": pytest.approx(0.03)}
    assert "| 0.1900 |" in markdown(report, {}, None)
    acc_ax, loss_ax = plots.curves_figure(report).axes
    lines = {(tuple(line.get_ydata()), line.get_linestyle()): line.get_color() for line in acc_ax.get_lines()}
    best_val, best_train = lines[((0.5, 0.82), "-")], lines[((0.4, 0.85), "--")]
    assert best_val == best_train, "a run's training twin is drawn in its colour, dashed"
    assert len(loss_ax.get_lines()) == 4  # val/loss and train/loss of both runs
    single = build_report(find_runs([str(root / "0")]))
    rows = dict(single_run_rows(single))
    assert rows["final train/acc"] == "0.9900" and rows["acc gap (train-val)"] == "0.1900"
