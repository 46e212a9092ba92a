"""A non-editable install from the built wheel carries conf/ and recipes/ and runs from any directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_wheel_install_runs_from_any_directory(tmp_path):
    dist, site, work = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True)
    wheel = next(dist.glob("trainctl-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import trainctl; print(trainctl.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), "the wheel's copy is the one imported"
    out = subprocess.run([sys.executable, "-m", "trainctl", "run", "+recipe=digits_cnn", "trainer.max_epochs=3",
                          "logging.progress=none"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (run_dir,) = list((work / "outputs").glob("*/*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "completed" and summary["final"]["val/acc"] > 0.9
