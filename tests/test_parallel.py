"""DDP under torchrun on CPU (gloo, 2 processes): the same math as one process with the whole batch,
one run directory whichever way it is launched, and clear errors for a launch that does not fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import trainctl

pytestmark = pytest.mark.slow

# No dropout (ranks draw their own masks); evaluation and checkpoints on, so their collectives run too.
COMMON = ["model.dropout=0", "trainer.max_epochs=null", "logging.progress=none", "logging.tensorboard=false",
          "trainer.eval_every_n_steps=4", "trainer.eval_every_n_epochs=null", "checkpoint.every_n_steps=4",
          "checkpoint.every_n_epochs=null", "logging.log_every_n_steps=2"]


def _torchrun(args: list, cwd: Path, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "-m", "trainctl", "run", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def _records(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("accumulation,extra", [(1, []), (2, []), (2, ["regularization.sam_rho=0.05"])],
                         ids=["plain", "accumulation", "sam"])
def test_two_ranks_train_exactly_like_one_process_with_twice_the_batch(tmp_path, accumulation, extra):
    """Also SAM: its second pass at the perturbed weights exchanges the gradients like the first."""
    steps = [f"trainer.max_steps={8 // accumulation}", f"trainer.grad_accum_steps={accumulation}", *extra]
    single = trainctl(["run", *COMMON, *steps, "data.batch_size=64", f"hydra.run.dir={tmp_path / 'single'}"],
                      cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr
    ddp = _torchrun([*COMMON, *steps, "parallelism=ddp", "data.batch_size=32", f"hydra.run.dir={tmp_path / 'ddp'}"],
                    tmp_path, 29611 + accumulation + 2 * len(extra))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = load_file(str(tmp_path / "single" / "model.safetensors")), load_file(str(tmp_path / "ddp" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # the same samples per step; only the order of floating-point sums differs, which AdamW's
        # normalised step turns into up to ~2e-6 on weights whose gradient is near zero
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=key)
    single_records, ddp_records = _records(tmp_path / "single"), _records(tmp_path / "ddp")
    assert [r["step"] for r in ddp_records] == [r["step"] for r in single_records]
    for r, s in zip(ddp_records, single_records):
        for key in ("train/loss", "val/loss", "val/acc", "lr"):
            if key in s:
                assert r[key] == pytest.approx(s[key], rel=1e-5, abs=1e-6), (r["step"], key)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["stop_reason"] == "completed" and summary["samples_seen"] == 8 * 64
    meta = json.loads((tmp_path / "ddp" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert "world size                 2" in (tmp_path / "ddp" / "trainctl.log").read_text()


def test_torchrun_and_self_launch_each_make_one_run_directory(tmp_path):
    args = [*COMMON, "trainer.max_steps=4", "parallelism=ddp"]
    out = _torchrun(args, tmp_path, 29621)
    assert out.returncode == 0, out.stderr[-3000:]
    launched = trainctl(["run", *args, "parallelism.nproc_per_node=2", "parallelism.rdzv_endpoint=localhost:29622"],
                        cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr[-3000:]
    run_dirs = sorted(p.parent for p in (tmp_path / "outputs").glob("*/*/metrics.jsonl"))
    assert len(run_dirs) == 2 and len(list((tmp_path / "outputs").glob("*/*"))) == 2, "one directory per run"
    for run_dir in run_dirs:
        records = _records(run_dir)
        assert [r["step"] for r in records if "train/loss" in r] == [2, 4], "one writer (rank 0), no duplicates"
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "done"
        assert len(list((run_dir / "checkpoints").glob("step-*"))) == 1


def test_a_launch_that_does_not_fit_the_strategy_is_a_clear_error(tmp_path):
    out = trainctl(["run", "parallelism=ddp", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "needs several processes" in out.stderr and "torchrun" in out.stderr
    assert not (tmp_path / "r").exists()
    out = _torchrun(["trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, 29631)
    assert out.returncode != 0 and "add parallelism=ddp" in out.stderr
    assert out.stderr.count("trainctl: error:") == 1, "rank 0 reports a problem every rank found"
    old = tmp_path / "old"
    old.mkdir()
    (old / "summary.json").write_text('{"status": "done"}')
    out = _torchrun(["parallelism=ddp", f"hydra.run.dir={old}"], tmp_path, 29632)
    assert out.returncode != 0 and out.stderr.count("already holds a run") == 1, out.stderr[-2000:]
    assert "hydra.run.dir: hydra.run.dir" not in out.stderr
    assert sorted(p.name for p in old.iterdir()) == ["summary.json"], "no rank touched the old run"
    out = trainctl(["run", "parallelism.nproc_per_node=2"], cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "set parallelism=ddp" in out.stderr


def test_sigterm_stops_every_rank_together_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    import signal

    from conftest import assert_resumed_exactly, run_then_signal

    args = [*COMMON, "trainer.max_steps=40", "parallelism=ddp", "parallelism.nproc_per_node=2",
            "model.dropout=0.2"]  # dropout: every rank's own random stream must survive the restart
    reference = trainctl(["run", *args, "parallelism.rdzv_endpoint=localhost:29641",
                          f"hydra.run.dir={tmp_path / 'reference'}"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "run"
    proc = run_then_signal([*args, "parallelism.rdzv_endpoint=localhost:29642"], run_dir, tmp_path, signal.SIGTERM,
                           after_lines=6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and 0 < summary["steps"] < 40, proc.stderr_text[-3000:]
    assert proc.returncode == 143, "the exit code of an interrupted run, also through torchrun"
    refused = trainctl(["resume", str(run_dir)], cwd=tmp_path, timeout=120)
    assert refused.returncode == 2 and "world size: 2 -> 1" in refused.stderr
    assert "parallelism.nproc_per_node=2" in refused.stderr
    resumed = trainctl(["run", *args, "parallelism.rdzv_endpoint=localhost:29643", "checkpoint.resume=auto",
                        f"hydra.run.dir={run_dir}"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_exactly(run_dir, tmp_path / "reference", list(range(2, 41, 2)))


def test_a_failing_rank_ends_the_job_and_an_elastic_restart_resumes_it_exactly(tmp_path):
    from conftest import REPO

    args = [*COMMON, "trainer.max_steps=16", "parallelism=ddp"]
    reference = _torchrun([*args, f"hydra.run.dir={tmp_path / 'reference'}"], tmp_path, 29651)
    assert reference.returncode == 0, reference.stderr[-3000:]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29652"]
    fault = [str(REPO / "tests" / "faults.py"), "raise-once", "10", "1", str(tmp_path / "failed-once"), "--", "run"]
    # without restarts: the whole job stops with the rank's error instead of hanging
    failed = subprocess.run([*base, *fault, *args, f"hydra.run.dir={tmp_path / 'failed'}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert failed.returncode != 0 and "simulated failure of rank 1" in failed.stderr
    (tmp_path / "failed-once").unlink()
    # with one restart (what parallelism.max_restarts=1 passes to torchrun, with checkpoint.resume=auto)
    restarted = subprocess.run([*base, "--max_restarts=1", *fault, *args, "checkpoint.resume=auto",
                                f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                               timeout=300, env=env)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert (tmp_path / "failed-once").exists()
    a, b = load_file(str(tmp_path / "run" / "model.safetensors")), load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "the restarted job resumed from its checkpoint exactly"
    assert [r["step"] for r in _records(tmp_path / "run") if "train/loss" in r] == list(range(2, 17, 2))


def test_the_self_launch_command_is_torchrun_with_the_run_directory_fixed():
    from trainctl.errors import ConfigError
    from trainctl.launch import torchrun_command
    from trainctl.parallel import ParallelismSpec

    spec = ParallelismSpec(name="ddp", nproc_per_node=4, nnodes=2, node_rank=1, rdzv_endpoint="node0:29500",
                           max_restarts=2)
    command = torchrun_command(spec, ["parallelism=ddp", "optimizer=sgd"], "/runs/a")
    assert command[1:4] == ["-m", "trainctl.torchrun", str(os.getpid())], "torchrun, tied to this process"
    assert {"--nproc_per_node=4", "--nnodes=2", "--node_rank=1", "--rdzv_endpoint=node0:29500",
            "--max_restarts=2"} <= set(command)
    assert command[-4:] == ["parallelism=ddp", "optimizer=sgd", "checkpoint.resume=auto", "hydra.run.dir=/runs/a"]
    one_node = torchrun_command(ParallelismSpec(name="ddp", nproc_per_node=2), [], "/runs/b")
    port = int(next(a for a in one_node if a.startswith("--master_port=")).split("=")[1])
    assert "--master_addr=localhost" in one_node and 1024 <= port < 65536, "a free local port"
    with pytest.raises(ConfigError, match="several nodes meet at node 0"):
        ParallelismSpec(name="ddp", nproc_per_node=2, nnodes=2).validate()


def test_a_sweep_starts_one_torchrun_per_job(tmp_path):
    # two jobs at a time (joblib), each on its own free rendezvous port
    out = trainctl(["run", "-m", *COMMON, "trainer.max_steps=4", "parallelism=ddp", "parallelism.nproc_per_node=2",
                    "optimizer.lr=1e-3,3e-3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert [j.name for j in jobs] == ["0", "1"]
    for job, lr in zip(jobs, (1e-3, 3e-3)):
        summary = json.loads((job / "summary.json").read_text())
        assert summary["status"] == "done" and summary["steps"] == 4
        meta = json.loads((job / "checkpoints" / "last" / "meta.json").read_text())
        assert meta["world_size"] == 2
        assert f"lr: {lr}" in (job / "config.yaml").read_text()


def _processes_of(run_dir: Path) -> list:
    """Pids of the processes whose command line names ``run_dir`` (torchrun's agent and the ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if f"hydra.run.dir={run_dir}" in cmdline:
            found.append(int(entry.name))
    return found


def _start_job(args: list, run_dir: Path, cwd: Path) -> subprocess.Popen:
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainctl", "run", *args, f"hydra.run.dir={run_dir}"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) > 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    return proc


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists processes through /proc")
def test_the_processes_of_a_job_end_with_the_trainctl_run_that_started_them(tmp_path):
    import signal
    import time

    run_dir = tmp_path / "run"
    args = [*COMMON, "trainer.max_steps=100000", "parallelism=ddp", "parallelism.nproc_per_node=2"]
    launcher = _start_job(args, run_dir, tmp_path)
    holder = json.loads((run_dir / ".trainctl.lock").read_text())
    assert holder["rank"] == 0 and holder["pid"] != launcher.pid, "rank 0 owns the directory, once for the job"
    children = [p for p in _processes_of(run_dir) if p != launcher.pid]
    assert len(children) == 3, children  # torchrun's agent and two ranks
    launcher.send_signal(signal.SIGKILL)
    launcher.communicate(timeout=60)
    deadline = time.monotonic() + 90
    while any(Path(f"/proc/{pid}").exists() and "Z" not in (Path(f"/proc/{pid}") / "stat").read_text().split()[2]
              for pid in children):
        assert time.monotonic() < deadline, "torchrun or a rank outlived the trainctl run that started them"
        time.sleep(0.2)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and summary["signal"] == "SIGTERM", summary
    stopped = summary["steps"]
    assert (run_dir / "checkpoints" / "last").resolve().name == f"step-{stopped:08d}", "a checkpoint where they stopped"
    resumed = trainctl(["run", *args, f"trainer.max_steps={stopped + 4}", "checkpoint.resume=auto",
                        f"hydra.run.dir={run_dir}"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == stopped + 4


def test_a_killed_rank_0_is_recorded_by_the_launcher(tmp_path):
    import signal

    run_dir = tmp_path / "run"
    launcher = _start_job([*COMMON, "trainer.max_steps=100000", "parallelism=ddp", "parallelism.nproc_per_node=2"],
                          run_dir, tmp_path)
    rank0 = json.loads((run_dir / ".trainctl.lock").read_text())["pid"]
    os.kill(rank0, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 1 and "Traceback" not in stderr.split("trainctl: starting")[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stop_reason"] == "failed"
    assert "torchrun exited with code" in summary["error"] and summary["steps"] > 0, summary


def test_swa_batch_norm_statistics_under_ddp_are_the_mean_over_every_ranks_share(tmp_path):
    """update_bn runs on each rank's share of the last epoch's batches; the ranks then hold the mean of
    their statistics, which the final weights keep."""
    import torch.nn.functional as F

    from conftest import compose
    from trainctl import data as data_mod
    from trainctl.batches import build_batches

    args = ["model=cnn", "model.channels=[4]", "averaging=swa", "averaging.start_epoch=0", "trainer.max_epochs=2",
            "data.batch_size=256", "logging.progress=none", "logging.tensorboard=false", "checkpoint.save_best=false"]
    out = _torchrun([*args, "parallelism=ddp", f"hydra.run.dir={tmp_path / 'ddp'}"], tmp_path, 29661)
    assert out.returncode == 0, out.stderr[-3000:]
    final = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    spec = compose(args)
    arrays = data_mod.load(spec.data)
    per_rank = []
    for rank in (0, 1):
        train = build_batches(spec.data, arrays, torch.device("cpu"), rank=rank, world_size=2).train
        stats = []
        with torch.no_grad():
            for x, _ in train.epoch(1):  # the last epoch's batches: this rank's share of each
                h = F.conv2d(x, final["blocks.0.0.weight"], final.get("blocks.0.0.bias"), padding=1)
                stats.append(torch.stack([h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)]))
        per_rank.append(torch.stack(stats).mean(0))
    expected = (per_rank[0] + per_rank[1]) / 2
    torch.testing.assert_close(final["blocks.0.1.running_mean"], expected[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(final["blocks.0.1.running_var"], expected[1], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(final["blocks.0.1.running_var"], per_rank[0][1], rtol=1e-3), "not rank 0's alone"
