"""The check every exact-resume test goes through (conftest.resume_and_compare): a mismatch that comes
back when the same checkpoint is resumed again and against a new reference fails the test; one that
does not come back is let through with a warning."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import List

import pytest

import conftest


def _fake_resume(results: List[str]):
    """`trainctl resume RUN` that writes the next of ``results`` into RUN/result."""
    def trainctl(args, cwd, **_):
        run_dir = Path(args[1])
        (run_dir / "result").write_text(results.pop(0))
        return subprocess.CompletedProcess(args, 0, "", "")
    return trainctl


def _compare(run_dir: Path, reference: Path) -> None:
    assert (run_dir / "result").read_text() == (reference / "result").read_text(), "weights differ"


def _setup(tmp_path: Path, monkeypatch, results: List[str]):
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-1").mkdir()
    (run_dir / "checkpoints" / "last").symlink_to("step-1")
    reference.mkdir()
    (reference / "result").write_text("exact")
    monkeypatch.setattr(conftest, "trainctl", _fake_resume(results))
    return run_dir, reference


def _remake(tmp_path: Path, value: str):
    def remake() -> Path:
        again = tmp_path / "reference-2"
        again.mkdir()
        (again / "result").write_text(value)
        return again
    return remake


def test_a_match_passes_without_a_second_resume(tmp_path, monkeypatch):
    run_dir, reference = _setup(tmp_path, monkeypatch, ["exact"])
    conftest.resume_and_compare(run_dir, tmp_path, reference, _compare, _remake(tmp_path, "exact"))
    assert not (tmp_path / "run.first-resume").exists()


def test_a_one_off_mismatch_of_the_resume_passes_with_a_warning(tmp_path, monkeypatch):
    run_dir, reference = _setup(tmp_path, monkeypatch, ["off by an ulp", "exact"])
    with pytest.warns(UserWarning, match="did not come back with the same resume again"):
        conftest.resume_and_compare(run_dir, tmp_path, reference, _compare, _remake(tmp_path, "exact"))
    assert (run_dir / "checkpoints" / "last").is_symlink(), "resumed again from the copy taken before"


def test_a_one_off_mismatch_of_the_reference_passes_with_a_warning(tmp_path, monkeypatch):
    run_dir, reference = _setup(tmp_path, monkeypatch, ["resumed", "resumed"])
    with pytest.warns(UserWarning, match="did not come back with a new reference run"):
        conftest.resume_and_compare(run_dir, tmp_path, reference, _compare, _remake(tmp_path, "resumed"))


def test_a_mismatch_that_comes_back_fails(tmp_path, monkeypatch):
    run_dir, reference = _setup(tmp_path, monkeypatch, ["wrong", "wrong"])
    with pytest.raises(AssertionError, match="weights differ"):
        conftest.resume_and_compare(run_dir, tmp_path, reference, _compare, _remake(tmp_path, "exact"))
