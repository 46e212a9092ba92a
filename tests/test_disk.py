"""A full disk and a read-only run directory, on real filesystems: a small tmpfs mounted in a private
mount namespace (`tests/smallfs.py`). Every failure ends cleanly - one message, no traceback, the right
exit code, `summary.json` saying how the run ended, nothing temporary left on the full disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

QUIET = ["logging.progress=none"]


def on_small_fs(tmp_path: Path, steps: List[dict], size: str = "16m") -> dict:
    """Run ``steps`` (see tests/smallfs.py) with a tmpfs of ``size`` mounted at tmp_path/'fs'."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare (util-linux) to mount a small filesystem")
    namespace = [unshare, "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        namespace[1:1] = ["--user", "--map-root-user"]
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps({"mount": str(tmp_path / "fs"), "size": size, "cwd": str(tmp_path), "steps": steps}))
    out = subprocess.run([*namespace, sys.executable, str(REPO / "tests" / "smallfs.py"), str(scenario)],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0 and ("Operation not permitted" in out.stderr or "mount:" in out.stderr):
        pytest.skip(f"cannot mount a small filesystem here: {out.stderr.strip()[-300:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def _clean(result: dict) -> None:
    assert "Traceback" not in result["stderr"] + result["stdout"], result["stderr"][-3000:]


def _leftovers(files: dict) -> list:
    return [name for name in files if ".tmp" in name or name.split("/")[-1].startswith(".tmp-")]


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_a_full_disk_during_checkpoints_ends_cleanly(tmp_path, on_error):
    run_dir = tmp_path / "fs" / "run"
    out = on_small_fs(tmp_path, [{"fill": 200_000}, {"trainctl": [
        "run", *QUIET, "trainer.max_epochs=3", "checkpoint.save_best=false", f"checkpoint.on_error={on_error}",
        f"hydra.run.dir={run_dir}"]}])
    result, summary = out["results"][0], out["summaries"]["run"]
    _clean(result)
    assert result["code"] == 1
    assert summary["status"] == "failed" and summary["stop_reason"] == "checkpoint_failed"
    assert "No space left on device" in summary["checkpoint_error"] or "the disk is full" in summary["checkpoint_error"]
    assert summary["steps"] == (23 if on_error == "stop" else 69)
    assert not _leftovers(out["files"]), "a failed save leaves nothing temporary on the full disk"
    assert "run/metrics.jsonl" in out["files"] and "run/model.safetensors" not in out["files"]


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_a_full_disk_for_metrics_and_tensorboard_ends_cleanly(tmp_path, on_error):
    run_dir = tmp_path / "fs" / "run"
    out = on_small_fs(tmp_path, [{"fill": 64_000}, {"trainctl": [
        "run", *QUIET, "trainer.max_epochs=40", "checkpoint=off", "logging.log_every_n_steps=1",
        f"checkpoint.on_error={on_error}", f"hydra.run.dir={run_dir}"]}])
    result, summary = out["results"][0], out["summaries"]["run"]
    _clean(result)
    assert result["code"] == 1 and summary["status"] == "failed", summary
    if on_error == "stop":
        assert summary["stop_reason"] == "failed" and 0 < summary["steps"] < 40 * 23
        assert "could not write" in summary["error"] and "No space left on device" in summary["error"]
    else:  # trains to the end without metrics; the final weights do not fit either
        assert summary["steps"] == 40 * 23 and "No space left on device" in summary["logging_error"]
        assert summary["stop_reason"] == "checkpoint_failed"
    assert not _leftovers(out["files"])


def test_a_read_only_run_directory_is_one_clear_message(tmp_path):
    fs = tmp_path / "fs"
    out = on_small_fs(tmp_path, [
        {"trainctl": ["run", *QUIET, "trainer.max_epochs=1", f"hydra.run.dir={fs / 'run'}"]},
        {"readonly": True},
        {"trainctl": ["resume", str(fs / "run"), "trainer.max_epochs=2"]},
        {"trainctl": ["eval", str(fs / "run")]},
        {"trainctl": ["eval", str(fs / "run"), "--json"]},
        {"trainctl": ["run", *QUIET, f"hydra.run.dir={fs / 'new'}"]},
    ])
    first, resume, table, as_json, new = out["results"]
    assert first["code"] == 0, first["stderr"][-2000:]
    for result in (resume, table, as_json, new):
        _clean(result)
        assert result["code"] == 2 and "Read-only file system" in result["stderr"], result["stderr"][-2000:]
    assert "val/acc" in table["stdout"], "eval prints its metrics before it tries to write them"
    assert json.loads(as_json["stdout"])["metrics"]["val/acc"] > 0.5
    assert "-o FILE" in table["stderr"]
    assert out["summaries"]["run"]["status"] == "done" and out["summaries"]["run"]["steps"] == 23
