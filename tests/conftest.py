"""Shared helpers: compose a spec the way the CLI does, build runs, write small data files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Sequence

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def compose(overrides: Sequence[str] = (), base_dir: str = "."):
    from trainctl.config import compose_spec

    return compose_spec(list(overrides), os.path.abspath(base_dir))[1]


def build(overrides: Sequence[str] = (), base_dir: str = "."):
    from trainctl.build import build_run

    return build_run(compose(overrides, base_dir), base_dir=os.path.abspath(base_dir))


def trainctl(args: List[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in a subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "trainctl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def stop_then_resume(monkeypatch, args: Sequence[str], run_dir: Path, base_dir: str, stop_step: int) -> None:
    """Train ``args`` in-process, stopped as by a signal after optimizer step ``stop_step``, then resumed
    in the same run directory with `checkpoint.resume=auto`."""
    from trainctl.job import train
    from trainctl.runner import Runner

    stop_at = {"step": stop_step}
    step = Runner.train_step

    def interrupted(self, window):
        step(self, window)
        if self.state.step == stop_at["step"]:
            stop_at["step"] = -1
            self.state.request_stop("interrupted")
    monkeypatch.setattr(Runner, "train_step", interrupted)
    train(compose(args), run_dir, base_dir)
    train(compose([*args, "checkpoint.resume=auto"]), run_dir, base_dir)


def run_then_signal(args: List[str], run_dir: Path, cwd: Path, sig: int, after_lines: int) -> subprocess.Popen:
    """Start `trainctl run ARGS hydra.run.dir=RUN_DIR`, send ``sig`` once metrics.jsonl has more than
    ``after_lines`` records, and wait for the process to end."""
    import time

    proc = subprocess.Popen([sys.executable, "-m", "trainctl", "run", *args, f"hydra.run.dir={run_dir}"],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) > after_lines:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=60)
    return proc


def resume_and_compare(run_dir: Path, cwd: Path, reference: Path, compare: Callable[[Path, Path], None],
                       remake: Callable[[], Path]) -> None:
    """`trainctl resume RUN_DIR`, then ``compare(RUN_DIR, reference)``, which asserts bitwise equality.

    Now and then one CPU process ends a few ulps away from another given the same code and inputs (on
    the 2-core VM the suite runs on: 3 of about 430 resumes of one and the same checkpoint, never
    reproducible on demand). So a mismatch is checked twice more before the test fails:
    the same resume again, from a copy of the run directory taken before the first, and then a reference
    made again (``remake``). A resume that does not continue exactly fails every time; a mismatch that
    does not come back is reported as a warning, not hidden."""
    import shutil
    import warnings

    before = run_dir.with_name(run_dir.name + ".before-resume")
    shutil.copytree(run_dir, before, symlinks=True)
    out = trainctl(["resume", str(run_dir)], cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    try:
        compare(run_dir, reference)
        return
    except AssertionError as exc:
        failure = exc
    os.replace(run_dir, run_dir.with_name(run_dir.name + ".first-resume"))
    shutil.copytree(before, run_dir, symlinks=True)
    out = trainctl(["resume", str(run_dir)], cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    for attempt, against in (("the same resume again", lambda: reference), ("a new reference run", remake)):
        try:
            compare(run_dir, against())
        except AssertionError:
            continue
        warnings.warn(f"a bitwise mismatch after resuming ({failure}) did not come back with {attempt}: "
                      "a one-off numerical difference between processes, not the resume")
        return
    raise failure


def assert_resumed_exactly(run_dir: Path, reference: Path, log_steps: List[int]) -> None:
    """The resumed run ends with the reference's weights, bit for bit, and logged each step once."""
    import json

    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(run_dir / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resuming"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == log_steps, "no duplicated or missing records"


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A small, learnable text: repeated sentences with a few variations (about 20 KB)."""
    rng = np.random.default_rng(0)
    words = ["the cat sat on the mat.", "a dog ran in the park.", "birds sing at dawn.",
             "rain falls on the roof.", "the sun rises in the east."]
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 900)))
    return path


@pytest.fixture
def csv_classification(tmp_path: Path) -> Path:
    """400 rows: label is 'pos' when x1 + 2*x2 > 0, plus a noise column; features on very different scales."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 3)) * np.array([1.0, 1.0, 100.0]) + np.array([0.0, 0.0, 500.0])
    label = np.where(x[:, 0] + 2 * x[:, 1] > 0, "pos", "neg")
    lines = ["x1,x2,noise,label"] + [f"{a:.5f},{b:.5f},{c:.3f},{l}" for (a, b, c), l in zip(x, label)]
    path = tmp_path / "points.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tsv_regression(tmp_path: Path) -> Path:
    """300 rows of y = 3*a - 2*b + 50 (+ small noise), tab-separated."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=300), rng.normal(size=300)
    y = 3 * a - 2 * b + 50 + rng.normal(scale=0.05, size=300)
    path = tmp_path / "reg.tsv"
    path.write_text("a\tb\ty\n" + "".join(f"{p:.5f}\t{q:.5f}\t{r:.5f}\n" for p, q, r in zip(a, b, y)))
    return path
