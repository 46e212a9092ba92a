"""Exact resume with weight averaging on: a run with EMA or SWA killed by SIGKILL and resumed ends with
the same weights (the average, in model.safetensors), bit for bit, and the same metrics as the run done
without interruption; `trainctl eval RUN/checkpoints/best` evaluates the averaged weights that `best`
was chosen on."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import resume_and_compare, trainctl
from test_resume import COMMON, _assert_same_run, _faulty, _metrics

pytestmark = pytest.mark.slow

SMALL = [*COMMON, "data.batch_size=256", "trainer.max_epochs=4", "checkpoint.every_n_steps=5",
         "checkpoint.every_n_epochs=null", "regularization.dropout=0.2"]
"""digits: 6 optimizer steps per epoch, 24 in all; dropout draws random numbers."""
EMA = [*SMALL, "averaging=ema", "averaging.decay=0.8", "averaging.every_n_steps=2"]
SWA = [*SMALL, "model=cnn", "model.channels=[4]", "averaging=swa", "averaging.start_epoch=1",
       "averaging.anneal_epochs=2", "averaging.swa_lr=0.0005"]
"""SWALR from step 6, annealing until step 18; snapshots at steps 12, 18, 24; batch norm recomputed at 24."""


@pytest.mark.parametrize("name,args,kill_at", [("ema", EMA, 14), ("swa", SWA, 16)])
def test_sigkill_then_resume_is_bitwise_equal(tmp_path, name, args, kill_at):
    reference = tmp_path / "reference"
    out = trainctl(["run", *args, f"hydra.run.dir={reference}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr

    run_dir = tmp_path / "run"
    proc = _faulty(["kill-after-step", str(kill_at)], [*args, f"hydra.run.dir={run_dir}"], tmp_path)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    resumes_from = int((run_dir / "checkpoints" / "last").resolve().name.split("-")[1])
    assert 6 < resumes_from < kill_at
    def remake() -> Path:
        again = tmp_path / "reference-2"
        assert trainctl(["run", *args, f"hydra.run.dir={again}"], cwd=tmp_path).returncode == 0
        return again
    resume_and_compare(run_dir, tmp_path, reference, _assert_same_run, remake)
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{resumes_from:08d}'}" in (run_dir / "trainctl.log").read_text()

    # the final weights are the average the last checkpoint holds (not the trained weights it saved)
    from trainctl.checkpoint import read_checkpoint

    last = read_checkpoint(reference / "checkpoints" / "last")
    averaged, final, trained = (last.state["callbacks"]["averaging"]["weights"],
                                load_file(str(reference / "model.safetensors")), load_file(str(last.weights)))
    assert all(torch.equal(final[k], averaged[k]) for k in final)
    assert any(not torch.equal(final[k], trained[k]) for k in final)
    if name == "swa":  # `trainctl eval` of best: the averaged weights best was chosen on
        best = read_checkpoint(reference / "checkpoints" / "best")
        out = trainctl(["eval", str(reference / "checkpoints" / "best")], cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        logged = [r for r in _metrics(reference) if r["step"] == best.step and "val/loss" in r][0]
        result = json.loads(Path(reference / "eval-best.json").read_text())
        assert result["metrics"]["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-6)
        assert result["metrics"]["val/acc"] == logged["val/acc"]
