"""One owner per run directory: a command that writes a run directory holds `.trainctl.lock` for its
lifetime, a second command on it is refused with exit code 2 naming the holder, and a killed holder
releases it at once (the kernel drops the lock with the process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import trainctl
from trainctl import rundir

QUIET = ["logging.progress=none", "logging.tensorboard=false"]


def _start(args: list, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainctl", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_until(predicate, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _training(run_dir: Path, after_step: int = 1):
    """True once the run in ``run_dir`` has logged a training step past ``after_step``."""
    def check() -> bool:
        try:
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        except OSError:
            return False
        return any(json.loads(l).get("step", 0) > after_step for l in lines if l.strip())
    return check


def _holder(run_dir: Path) -> dict:
    return json.loads((run_dir / rundir.LOCK_NAME).read_text())


def test_nothing_is_written_into_a_directory_another_process_holds(tmp_path):
    run_dir = tmp_path / "held"
    assert rundir.acquire(run_dir)
    try:
        for args in (["run", f"hydra.run.dir={run_dir}"], ["run", "checkpoint.resume=auto", f"hydra.run.dir={run_dir}"]):
            out = trainctl(args, cwd=tmp_path, timeout=60)
            assert out.returncode == 2 and f"is in use by another trainctl process (pid {os.getpid()}" in out.stderr
            assert "Traceback" not in out.stderr and "fix:" in out.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [rundir.LOCK_NAME], "not even Hydra's .hydra/"
        (run_dir / "config.yaml").write_text("model: {}\n")
        out = trainctl(["resume", str(run_dir)], cwd=tmp_path, timeout=60)
        assert out.returncode == 2 and "is in use by another trainctl process" in out.stderr
    finally:
        rundir.release(run_dir)
    assert not rundir.holds(run_dir)


def test_the_lock_is_reentrant_and_released_with_its_holder(tmp_path):
    run_dir = tmp_path / "r"
    with rundir.owning(run_dir):
        assert rundir.holds(run_dir) and _holder(run_dir)["pid"] == os.getpid()
        with rundir.owning(run_dir):  # the job asks for the lock `trainctl run` took already
            assert rundir.holds(run_dir)
        assert rundir.holds(run_dir)
        child = subprocess.run([sys.executable, "-c", "import sys; from trainctl import rundir; "
                                f"rundir.check_free(__import__('pathlib').Path({str(run_dir)!r}))"],
                               capture_output=True, text=True)
        assert child.returncode != 0 and "RunDirBusy" in child.stderr
    assert not rundir.holds(run_dir)
    rundir.check_free(run_dir)


@pytest.mark.slow
def test_two_commands_on_one_run_directory(tmp_path):
    """A run, a second run and resumes on one directory: only one of them ever trains in it."""
    run_dir = tmp_path / "run"
    args = [*QUIET, "trainer.max_epochs=400", "checkpoint.every_n_epochs=1", "checkpoint.save_best=false",
            f"hydra.run.dir={run_dir}"]
    first = _start(["run", *args], tmp_path)
    _wait_until(_training(run_dir, 30), first)
    assert _holder(run_dir)["pid"] == first.pid and "trainctl run" in _holder(run_dir)["command"]

    # a second run that would continue the directory, and a resume, while the first one trains
    for second in (["run", *args, "checkpoint.resume=auto"], ["resume", str(run_dir)]):
        out = trainctl(second, cwd=tmp_path, timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert f"is in use by another trainctl process (pid {first.pid}" in out.stderr and "Traceback" not in out.stderr

    # SIGKILL: the kernel releases the lock, and the run can be resumed at once
    first.kill()
    first.communicate(timeout=60)
    resumed = _start(["resume", str(run_dir), "trainer.max_epochs=400"], tmp_path)
    _wait_until(lambda: (run_dir / rundir.LOCK_NAME).exists() and _holder(run_dir)["pid"] == resumed.pid, resumed)
    steps_at = max(json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines())
    _wait_until(_training(run_dir, steps_at + 20), resumed)
    out = trainctl(["resume", str(run_dir)], cwd=tmp_path, timeout=120)  # two resumes of one directory
    assert out.returncode == 2 and f"(pid {resumed.pid}" in out.stderr, out.stderr[-2000:]
    resumed.send_signal(signal.SIGTERM)
    resumed.communicate(timeout=120)
    assert resumed.returncode == 143
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == sorted(set(steps)), "one writer at a time: no duplicated or backward steps"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and summary["steps"] >= steps[-1]
