"""Exact resume with SAM on: a run killed by SIGKILL mid-epoch (accumulation 2, dropout drawing new masks
in the second pass) and resumed ends with the uninterrupted run's weights and metrics, bit for bit."""

from __future__ import annotations

import signal

import pytest

from conftest import resume_and_compare, trainctl
from test_resume import MID_EPOCH, _assert_same_run, _faulty, _metrics

pytestmark = pytest.mark.slow

SAM = [*MID_EPOCH, "regularization.sam_rho=0.05", "regularization.sam_adaptive=true", "regularization.l1=1e-5"]


def _reference(tmp_path, name: str = "reference"):
    reference = tmp_path / name
    out = trainctl(["run", *SAM, f"hydra.run.dir={reference}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return reference


def test_sigkill_then_resume_with_sam_is_bitwise_equal(tmp_path):
    reference = _reference(tmp_path)
    run_dir = tmp_path / "run"
    proc = _faulty(["kill-after-step", "28"], [*SAM, f"hydra.run.dir={run_dir}"], tmp_path)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / "last").resolve().name == "step-00000025"
    assert max(r["step"] for r in _metrics(run_dir)) > 25, "the killed run logged past its checkpoint"
    resume_and_compare(run_dir, tmp_path, reference, _assert_same_run, lambda: _reference(tmp_path, "reference-2"))
    assert any("train/penalty" in r for r in _metrics(run_dir))
