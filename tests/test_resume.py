"""Exact resume, with real processes and real signals: a run killed at any point (SIGKILL mid-epoch, at an
epoch boundary, with DataLoader workers, in the middle of writing a checkpoint, or stopped by SIGTERM -
also at the moment an evaluation is due) and then resumed ends with the same weights, bit for bit, and
the same metrics.jsonl and TensorBoard scalars as the run done without interruption."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, resume_and_compare, run_then_signal, trainctl
from trainctl.metrics import TIMING_KEYS

FAULTS = str(REPO / "tests" / "faults.py")
COMMON = ["logging.progress=plain", "logging.log_every_n_steps=3", "logging.tensorboard=true"]
MID_EPOCH = [*COMMON, "trainer.max_epochs=4", "trainer.grad_accum_steps=2", "scheduler=onecycle",
             "regularization.dropout=0.2", "checkpoint.every_n_steps=5", "checkpoint.every_n_epochs=null"]
"""12 optimizer steps per epoch (23 batches, accumulation 2), 48 in all; dropout draws random numbers."""
EPOCH_BOUNDARY = [*COMMON, "trainer.max_epochs=4", "scheduler=plateau", "scheduler.monitor=val/acc",
                  "scheduler.mode=max", "scheduler.patience=0", "checkpoint.save_best=false"]
"""23 steps per epoch, 92 in all; the plateau schedule's state changes at evaluations."""

pytestmark = pytest.mark.slow


def _weights(run_dir: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def _metrics(run_dir: Path) -> List[dict]:
    """metrics.jsonl without the wall-clock readings (throughput differs between runs)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _scalars(run_dir: Path) -> Dict[str, List[tuple]]:
    """TensorBoard's scalars of a run, (step, value) per tag, without the wall-clock readings."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if tag not in TIMING_KEYS}


def _assert_same_run(resumed: Path, reference: Path) -> None:
    a, b = _weights(resumed), _weights(reference)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resuming"
    assert _metrics(resumed) == _metrics(reference), "metrics.jsonl differs (duplicated, missing or changed steps)"
    assert _scalars(resumed) == _scalars(reference), "TensorBoard differs (the killed session's records stayed?)"
    assert json.loads((resumed / "summary.json").read_text())["stop_reason"] == "completed"


def _faulty(fault: List[str], args: List[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, FAULTS, *fault, "--", "run", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per configuration, made once for the module."""
    made: Dict[str, Path] = {}

    def get(name: str, args: List[str], fresh: bool = False) -> Path:
        """The reference run of ``name``; ``fresh``: made again (it replaces the one made before)."""
        if fresh or name not in made:
            run_dir = tmp_path_factory.mktemp("reference") / name
            out = trainctl(["run", *args, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
            assert out.returncode == 0, out.stderr
            made[name] = run_dir
        return made[name]
    return get


WORKERS = [*MID_EPOCH, "data.num_workers=2"]
"""The same batches through a DataLoader with two worker processes."""


@pytest.mark.parametrize("name,args,kill_at,resumes_from", [
    ("mid_epoch", MID_EPOCH, 28, 25),          # step 25 is one step into the third epoch
    ("epoch_boundary", EPOCH_BOUNDARY, 52, 46),  # step 46 ends the second epoch
    ("workers", WORKERS, 34, 30),
])
def test_sigkill_then_resume_is_bitwise_equal(tmp_path, reference, name, args, kill_at, resumes_from):
    run_dir = tmp_path / "run"
    proc = _faulty(["kill-after-step", str(kill_at)], [*args, f"hydra.run.dir={run_dir}"], tmp_path)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / "last").resolve().name == f"step-{resumes_from:08d}"
    assert max(r["step"] for r in _metrics(run_dir)) > resumes_from, "the killed run logged past its checkpoint"

    resume_and_compare(run_dir, tmp_path, reference(name, args), _assert_same_run,
                       lambda: reference(name, args, fresh=True))
    log = (run_dir / "trainctl.log").read_text()
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{resumes_from:08d}'}" in log


def test_kill_while_a_checkpoint_is_written_keeps_the_previous_one(tmp_path, reference):
    run_dir, flag = tmp_path / "run", tmp_path / "stalled"
    # saves come at steps 5, 10, 12 (best), 15, 20: the 5th stops half-way through state.pt
    proc = _faulty(["stall-save", "5", str(flag)], [*MID_EPOCH, f"hydra.run.dir={run_dir}"], tmp_path)
    deadline = time.monotonic() + 120
    while not flag.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert flag.exists(), proc.communicate()[1]
    proc.kill()
    proc.communicate(timeout=60)
    ckpts = run_dir / "checkpoints"
    partial = [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    assert partial and not (partial[0] / "COMMITTED").exists(), "the half-written checkpoint is left uncommitted"
    assert (ckpts / "last").resolve().name == "step-00000015"

    from trainctl.checkpoint import newest_valid
    assert newest_valid(ckpts).step == 15

    resume_and_compare(run_dir, tmp_path, reference("mid_epoch", MID_EPOCH), _assert_same_run,
                       lambda: reference("mid_epoch", MID_EPOCH, fresh=True))
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")], "the leftover was cleaned up"


def test_sigterm_when_an_evaluation_is_due_defers_it_to_the_resumed_run(tmp_path, reference):
    run_dir = tmp_path / "run"
    # SIGTERM arrives during step 46, which ends epoch 2: the run stops before that epoch's evaluation
    proc = _faulty(["term-after-step", "46"], [*EPOCH_BOUNDARY, f"hydra.run.dir={run_dir}"], tmp_path)
    proc.communicate(timeout=300)
    assert proc.returncode == 143
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and summary["steps"] == 46
    assert [r["step"] for r in _metrics(run_dir) if "val/acc" in r] == [23], "the due evaluation was deferred"
    from trainctl.checkpoint import read_checkpoint
    assert read_checkpoint(run_dir / "checkpoints" / "last").state["run"]["eval_pending"]

    resume_and_compare(run_dir, tmp_path, reference("epoch_boundary", EPOCH_BOUNDARY), _assert_same_run,
                       lambda: reference("epoch_boundary", EPOCH_BOUNDARY, fresh=True))


def test_a_signal_after_a_steps_checkpoint_decision_stops_at_the_next_step_with_a_checkpoint(tmp_path, reference):
    run_dir = tmp_path / "run"
    # SIGTERM arrives once step 40's boundary is done (no checkpoint due there): the run trains step 41,
    # stops there and saves it, instead of stopping at 40 with nothing saved since the start
    proc = _faulty(["term-after-boundary", "40"], [*EPOCH_BOUNDARY, f"hydra.run.dir={run_dir}"], tmp_path)
    proc.communicate(timeout=300)
    assert proc.returncode == 143
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 41
    assert (run_dir / "checkpoints" / "last").resolve().name == "step-00000041"

    resume_and_compare(run_dir, tmp_path, reference("epoch_boundary", EPOCH_BOUNDARY), _assert_same_run,
                       lambda: reference("epoch_boundary", EPOCH_BOUNDARY, fresh=True))


def test_sigterm_saves_a_checkpoint_and_resumes_exactly(tmp_path, reference):
    args = [*EPOCH_BOUNDARY, "trainer.max_epochs=25", "checkpoint.every_n_epochs=5"]
    run_dir = tmp_path / "run"
    proc = run_then_signal(args, run_dir, tmp_path, signal.SIGTERM, after_lines=40)
    assert proc.returncode == 143, proc.stderr_text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and summary["signal"] == "SIGTERM"
    stopped = summary["steps"]
    assert 0 < stopped < 25 * 23
    assert (run_dir / "checkpoints" / "last").resolve().name == f"step-{stopped:08d}", "saved where it stopped"

    resume_and_compare(run_dir, tmp_path, reference("sigterm", args), _assert_same_run,
                       lambda: reference("sigterm", args, fresh=True))
