"""The training loop's math: accumulation, clipping, reproducibility, batch order."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build
from trainctl.batches import windows_of
from trainctl.runner import Runner

# No dropout and no batch norm, so one big batch and accumulated micro-batches see the same function.
EXACT = ["model.dropout=0", "trainer.max_epochs=1", "trainer.eval_every_n_epochs=null", "logging.tensorboard=false"]


def _train(overrides):
    run = build([*EXACT, *overrides])
    Runner(run).fit()
    return run


def _keep_grads(run):
    """Make train_step stop after clipping, leaving the window's gradient in place."""
    run.optimizer.step = lambda *a, **k: None
    run.optimizer.zero_grad = lambda *a, **k: None
    run.scheduler.step = lambda: None


def _weights(run):
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulation_equals_one_big_batch_including_a_short_last_window(optimizer):
    # 1437 training samples: 14 windows of 4 x 25, then a last window of only 25 + 12 samples.
    accumulated = _train([f"optimizer={optimizer}", "data.batch_size=25", "trainer.grad_accum_steps=4",
                          "regularization.max_grad_norm=0.5"])
    big = _train([f"optimizer={optimizer}", "data.batch_size=100", "trainer.grad_accum_steps=1",
                  "regularization.max_grad_norm=0.5"])
    assert len(accumulated.data.train) == 58 and accumulated.horizon.total_steps == big.horizon.total_steps == 15
    a, b = _weights(accumulated), _weights(big)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    # The comparison is sensitive: a different effective batch gives different weights.
    other = _weights(_train([f"optimizer={optimizer}", "data.batch_size=25", "trainer.grad_accum_steps=3",
                             "regularization.max_grad_norm=0.5"]))
    assert max((other[k] - b[k]).abs().max().item() for k in b) > 1e-3


def test_last_window_is_scaled_by_its_real_size():
    """The gradient of a 2-micro-batch last window is the mean over its 37 samples, not a sum over k=4."""
    run = build([*EXACT, "optimizer=sgd", "data.batch_size=25", "trainer.grad_accum_steps=4"])
    window = list(windows_of(run.data.train.epoch(0), 4))[-1]
    assert [len(x) for x, _ in window] == [25, 12]
    reference = copy.deepcopy(run.model)
    x_all = torch.cat([x for x, _ in window])
    y_all = torch.cat([y for _, y in window])
    torch.nn.functional.cross_entropy(reference(x_all), y_all).backward()
    runner = Runner(run)
    _keep_grads(run)
    runner.train_step(window)
    for (name, p), q in zip(run.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_clipping_happens_once_on_the_whole_window():
    run = build([*EXACT, "optimizer=sgd", "data.batch_size=32", "trainer.grad_accum_steps=2",
                 "regularization.max_grad_norm=0.01"])
    window = list(windows_of(run.data.train.epoch(0), 2))[0]
    reference = copy.deepcopy(run.model)
    x_all, y_all = torch.cat([x for x, _ in window]), torch.cat([y for _, y in window])
    torch.nn.functional.cross_entropy(reference(x_all), y_all).backward()
    total = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.01)
    _keep_grads(run)
    runner = Runner(run)
    runner.train_step(window)
    torch.testing.assert_close(runner.meter.norm_sum, total)
    clipped_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in run.model.parameters()]))
    assert clipped_norm.item() == pytest.approx(0.01, rel=1e-4)
    for p, q in zip(run.model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_clip_by_value_bounds_every_gradient_element():
    run = build([*EXACT, "optimizer=sgd", "regularization.clip_value=0.001"])
    _keep_grads(run)
    Runner(run).train_step(next(windows_of(run.data.train.epoch(0), 1)))
    bound = torch.tensor(0.001).item()  # 0.001 as float32
    grads = torch.cat([p.grad.flatten() for p in run.model.parameters()])
    assert grads.abs().max().item() == bound, "some gradients were large enough to be clipped"


def test_seeded_runs_are_reproducible_and_seeds_matter():
    overrides = ["trainer.max_steps=30", "trainer.eval_every_n_epochs=null", "logging.tensorboard=false"]
    first, second = _weights(_train(overrides)), _weights(_train(overrides))
    assert all(torch.equal(first[k], second[k]) for k in first)
    third = _weights(_train([*overrides, "trainer.seed=1"]))
    assert not all(torch.equal(first[k], third[k]) for k in first)


@pytest.mark.parametrize("data", ["digits", "synthetic", "text", "csv"])
def test_fast_path_yields_exactly_the_dataloader_batches(data, text_file, csv_classification):
    """Whole-batch slicing of in-memory tensors (num_workers=0) against a DataLoader fetching and
    collating sample by sample in a worker process, for the same seed."""
    args = {"digits": [], "synthetic": ["data=synthetic"],
            "text": ["data=text", f"data.path={text_file}", "model=gpt", "data.seq_len=16"],
            "csv": ["data=csv", f"data.path={csv_classification}", "data.target=label"]}[data]
    fast = build([*args, "data.num_workers=0", "data.batch_size=50"]).data
    workers = build([*args, "data.num_workers=1", "data.batch_size=50"]).data
    for split, epochs in ((fast.train, workers.train), (0, 3)), ((fast.val, workers.val), (0,)):
        for epoch in epochs:
            a, b = list(split[0].epoch(epoch)), list(split[1].epoch(epoch))
            assert len(a) == len(b) == len(split[0]) > 1
            for (xa, ya), (xb, yb) in zip(a, b):
                assert xa.dtype == xb.dtype and ya.dtype == yb.dtype
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(list(fast.train.epoch(0))[0][1], list(fast.train.epoch(1))[0][1]), "each epoch reshuffles"


def test_starting_mid_epoch_skips_by_index():
    train = build(["data.batch_size=50"]).data.train
    full = list(train.epoch(2))
    resumed = list(train.epoch(2, start=7))
    assert len(resumed) == len(full) - 7
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[7:], resumed))


def test_max_steps_stops_mid_epoch_and_the_run_evaluates_at_the_end():
    run = build(["trainer.max_steps=5", "trainer.max_epochs=null", "logging.tensorboard=false"])
    runner = Runner(run)
    summary = runner.fit()
    assert summary["steps"] == 5 and runner.state.epoch == 0 and runner.state.batch_in_epoch == 5
    assert runner.state.last_eval_step == 5 and "val/acc" in summary["final"]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_batch_count_matches_the_batches_every_rank_yields(world):
    """len() is asked at every step, so it is arithmetic; it must agree with the batches drawn, and
    under several ranks every rank draws the same number of training batches."""
    from trainctl.batches import Batches, TensorSource

    for n in (1, 2, 7, 100, 129, 1437):
        source = TensorSource(torch.zeros(n, 1), torch.zeros(n))
        for batch_size in (1, 3, 64):
            for shuffle in (True, False):
                for drop_last in (True, False):
                    counts = []
                    for rank in range(world):
                        batches = Batches(source, batch_size, shuffle, drop_last, 0, rank=rank, world_size=world)
                        drawn = list(batches.epoch(0))
                        assert len(batches) == len(drawn) and all(len(x) for x, _ in drawn)
                        counts.append(len(drawn))
                    if shuffle:
                        assert len(set(counts)) == 1, (n, batch_size, drop_last, counts)
