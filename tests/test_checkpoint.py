"""Checkpoint contents and layout, pruning, early stopping, non-finite steps, save failures, unsafe or
damaged files, and what may change on resume."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import List

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose, trainctl
from trainctl.callbacks import EarlyStopping
from trainctl.checkpoint import committed, find_source, newest_valid, read_checkpoint
from trainctl.errors import ConfigError
from trainctl.files import COMMIT_MARKER, CheckpointError, commit_dir, safe_torch_load
from trainctl.metrics import TIMING_KEYS
from trainctl.state import RunState

QUIET = ["logging.progress=none", "logging.tensorboard=false"]


def fit(tmp_path: Path, overrides: List[str], name: str = "run") -> dict:
    from trainctl.job import train

    spec = compose([*QUIET, *overrides])
    return train(spec, tmp_path / name, str(tmp_path))


def _steps(run_dir: Path) -> List[int]:
    return [int(p.name.split("-")[1]) for p in committed(run_dir / "checkpoints")]


def test_a_checkpoint_holds_everything_and_loads_weights_only(tmp_path):
    summary = fit(tmp_path, ["trainer.max_epochs=3", "early_stopping.patience=5"])
    ckpts = tmp_path / "run" / "checkpoints"
    last = ckpts / "last"
    assert last.is_symlink() and last.resolve().name == "step-00000069"
    assert (ckpts / "best").resolve().name == f"step-{summary['best_step']:08d}"
    assert sorted(p.name for p in last.iterdir()) == [COMMIT_MARKER, "meta.json", "model.safetensors",
                                                      "spec.yaml", "state.pt"]
    ckpt = read_checkpoint(last)
    assert set(ckpt.state) == {"run", "optimizer", "scheduler", "precision", "checkpointer", "callbacks",
                               "meter", "rng"}
    assert ckpt.state["run"]["step"] == 69 and ckpt.state["run"]["epoch"] == 3
    assert set(ckpt.state["rng"]) >= {"python", "numpy", "torch"}
    assert ckpt.state["callbacks"]["early_stopping"]["best"] == pytest.approx(summary["best_metric"])
    assert ckpt.meta["trainctl_version"] and ckpt.meta["torch_version"] == torch.__version__
    assert "optimizer:" in ckpt.spec_yaml and "!!python" not in ckpt.spec_yaml
    final = load_file(str(tmp_path / "run" / "model.safetensors"))
    saved = load_file(str(last / "model.safetensors"))
    assert all(torch.equal(final[k], saved[k]) for k in final)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rmsprop", "adam", "lion", "lamb", "lars", "muon",
                                       "adafactor", "schedulefree_adamw"])
def test_every_optimizers_state_round_trips_through_a_weights_only_load(tmp_path, optimizer):
    scheduler = "scheduler=constant" if optimizer == "schedulefree_adamw" else "scheduler=onecycle"
    if optimizer in ("adagrad", "adafactor", "lars", "lamb", "lion", "muon"):
        scheduler = "scheduler=warmup_cosine"
    fit(tmp_path, [f"optimizer={optimizer}", scheduler, "trainer.max_steps=5", "checkpoint.save_best=false"])
    ckpt = newest_valid(tmp_path / "run" / "checkpoints")
    assert ckpt.step == 5 and ckpt.state["optimizer"]["state"], "optimizer state is saved and readable"


def test_keep_last_k_keeps_exactly_k_after_each_commit(tmp_path):
    fit(tmp_path, ["trainer.max_steps=40", "checkpoint.every_n_steps=5", "checkpoint.every_n_epochs=null",
                   "checkpoint.save_best=false", "checkpoint.keep_last_k=3"])
    assert _steps(tmp_path / "run") == [30, 35, 40]


def test_the_best_checkpoint_survives_pruning(tmp_path):
    summary = fit(tmp_path, ["trainer.max_epochs=6", "checkpoint.keep_last_k=1"])
    steps = _steps(tmp_path / "run")
    assert steps[-1] == 138 and summary["best_step"] in steps and len(steps) <= 2


def test_early_stopping_on_a_constructed_sequence_and_its_state_resumes():
    from trainctl.monitor import Monitor

    values = [0.50, 0.60, 0.65, 0.64, 0.651, 0.66, 0.62, 0.63, 0.60, 0.70]
    # min_delta 0.005: 0.651 is not an improvement on 0.65; patience 3 stops at the 3rd miss after 0.66

    def early_stopping() -> EarlyStopping:
        return EarlyStopping(Monitor("val/acc", "max", min_delta=0.005), patience=3)

    def evaluated(callback: EarlyStopping, state: RunState, value: float) -> None:
        callback.monitor.update({"val/acc": value}, state.step)  # the runner updates the monitors first
        callback.on_eval_end(None, state, {"val/acc": value})

    def run(callback: EarlyStopping, state: RunState, start: int) -> int:
        for i, value in enumerate(values[start:], start=start):
            state.step = i + 1
            evaluated(callback, state, value)
            if state.should_stop:
                return i
        return -1

    whole, state = early_stopping(), RunState()
    assert run(whole, state, 0) == 8 and state.stop_reason == "early_stopped"
    assert whole.best == 0.66 and whole.best_step == 6

    first, state = early_stopping(), RunState()
    for i, value in enumerate(values[:7]):
        state.step = i + 1
        evaluated(first, state, value)
    resumed = early_stopping()
    resumed.load_state_dict(first.state_dict())
    assert resumed.wait == 1 and run(resumed, RunState(), 7) == 8


def test_early_stopping_ends_the_run_at_the_right_epoch(tmp_path):
    # a vanishing lr: the validation metric does not change, so the first evaluation stays the best
    summary = fit(tmp_path, ["optimizer.lr=1e-12", "early_stopping.patience=2", "early_stopping.min_delta=0.001",
                             "trainer.max_epochs=30"])
    assert summary["stop_reason"] == "early_stopped" and summary["status"] == "done"
    assert summary["steps"] == 3 * 23 and summary["epochs_completed"] == 3
    assert _steps(tmp_path / "run")[-1] == 69, "a checkpoint is saved where it stopped"


def test_restore_best_weights_writes_the_best_weights(tmp_path):
    summary = fit(tmp_path, ["trainer.max_epochs=12", "optimizer.lr=0.02", "early_stopping.patience=2",
                             "early_stopping.restore_best_weights=true"])
    run_dir = tmp_path / "run"
    final = load_file(str(run_dir / "model.safetensors"))
    best = load_file(str(run_dir / "checkpoints" / "best" / "model.safetensors"))
    last = load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.equal(final[k], best[k]) for k in final)
    if summary["best_step"] != summary["steps"]:
        assert not all(torch.equal(final[k], last[k]) for k in final), "last keeps the final state"


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    summary = fit(tmp_path, ["optimizer=sgd", "optimizer.lr=1e8", "scheduler=constant",
                             "checkpoint.every_n_steps=1", "checkpoint.every_n_epochs=null",
                             "checkpoint.keep_last_k=null", "logging.log_every_n_steps=50"])
    assert summary["stop_reason"] == "diverged" and summary["status"] == "failed"
    assert not (tmp_path / "run" / "model.safetensors").exists(), "no non-finite weights are written"
    for path in committed(tmp_path / "run" / "checkpoints"):
        weights = load_file(str(path / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), f"{path.name} holds non-finite weights"


def test_skip_mode_skips_non_finite_steps_and_then_gives_up(tmp_path, monkeypatch):
    from trainctl import loss as loss_mod

    calls = {"n": 0}
    original = loss_mod.SumLoss.__call__

    def flaky(self, outputs, targets):
        calls["n"] += 1
        value = original(self, outputs, targets)
        return value * float("nan") if calls["n"] in (4, 5, 9) else value

    monkeypatch.setattr(loss_mod.SumLoss, "__call__", flaky)
    summary = fit(tmp_path, ["trainer.on_nonfinite=skip", "trainer.max_steps=20", "trainer.eval_every_n_epochs=null",
                             "checkpoint=off"])
    assert summary["stop_reason"] == "completed" and summary["skipped_steps"] == 3
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())

    monkeypatch.setattr(loss_mod.SumLoss, "__call__", lambda self, o, t: original(self, o, t) * float("nan"))
    summary = fit(tmp_path, ["trainer.on_nonfinite=skip", "trainer.max_consecutive_skips=4", "checkpoint=off"],
                  name="always-nan")
    assert summary["stop_reason"] == "diverged" and summary["steps"] == 4


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_a_failing_save_is_reported_and_the_previous_checkpoint_stays(tmp_path, monkeypatch, caplog, on_error):
    real_save = torch.save
    calls = {"n": 0}

    def disk_full(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with caplog.at_level(logging.ERROR, logger="trainctl"):
        summary = fit(tmp_path, ["trainer.max_epochs=5", "checkpoint.save_best=false",
                                 f"checkpoint.on_error={on_error}"])
    ckpts = tmp_path / "run" / "checkpoints"
    assert "No space left on device" in caplog.text and "previous checkpoint" in caplog.text
    assert _steps(tmp_path / "run") == [23, 46] and (ckpts / "last").resolve().name == "step-00000046"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    assert "No space left" in summary["checkpoint_error"]
    if on_error == "stop":
        assert summary["stop_reason"] == "checkpoint_failed" and summary["steps"] == 69
    else:
        assert summary["stop_reason"] == "completed" and summary["steps"] == 115


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    fit(tmp_path, ["trainer.max_epochs=1", "checkpoint.save_best=false"])
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000023"
    marker = tmp_path / "PWNED"
    torch.save({"run": _Exploit(marker)}, ckpt / "state.pt")
    # re-seal it, as an attacker who rewrote the whole directory would
    (ckpt / COMMIT_MARKER).unlink()
    tmp = ckpt.with_name(".tmp-evil")
    ckpt.rename(tmp)
    commit_dir(tmp, ckpt)

    with pytest.raises(CheckpointError, match="refusing to load"):
        safe_torch_load(ckpt / "state.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_checkpoint(ckpt)
    out = trainctl(["resume", str(tmp_path / "run")], cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "refusing to load" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists(), "the payload never ran"


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    fit(tmp_path, ["trainer.max_epochs=3", "checkpoint.save_best=false", "checkpoint.keep_last_k=null"])
    ckpts = tmp_path / "run" / "checkpoints"
    state = ckpts / "step-00000069" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    flipped = ckpts / "step-00000046" / "model.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-10] ^= 0xFF
    flipped.write_bytes(bytes(data))  # one corrupted byte
    with caplog.at_level(logging.WARNING, logger="trainctl"):
        assert newest_valid(ckpts).step == 23
    assert "truncated" in caplog.text and "checksum" in caplog.text and "falling back" in caplog.text
    with pytest.raises(CheckpointError, match="truncated"):
        find_source(ckpts / "step-00000069")
    (ckpts / "step-00000023" / COMMIT_MARKER).unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_source(tmp_path / "run")


def test_resume_refuses_changes_that_cannot_work_and_lists_the_allowed_ones(tmp_path, caplog):
    fit(tmp_path, ["trainer.max_epochs=2"])
    run_dir = tmp_path / "run"
    base = [*QUIET, f"checkpoint.resume={run_dir}"]
    with pytest.raises(ConfigError) as error:
        fit(tmp_path, [*base, "model.width=64", "data.batch_size=32"], name="changed")
    assert "model.width: 256 -> 64" in str(error.value) and "data.batch_size: 64 -> 32" in str(error.value)
    with pytest.raises(ConfigError, match="optimizer.name: adamw -> sgd"):
        fit(tmp_path, [*base, "optimizer=sgd"], name="changed")
    with caplog.at_level(logging.WARNING, logger="trainctl"):
        summary = fit(tmp_path, [*base, "trainer.max_epochs=3", "optimizer.lr=0.0005"], name="longer")
    assert summary["steps"] == 69 and summary["stop_reason"] == "completed"
    assert "trainer.max_epochs: 2 -> 3" in caplog.text and "optimizer.lr: 0.001 -> 0.0005" in caplog.text
    steps = [json.loads(l)["step"] for l in (tmp_path / "longer" / "metrics.jsonl").read_text().splitlines()]
    assert min(steps) > 46, "a run started from a checkpoint continues at its step"


def test_resume_auto_continues_in_place_or_starts_fresh(tmp_path):
    run_dir = tmp_path / "job"
    first = trainctl(["run", "trainer.max_epochs=2", "checkpoint.resume=auto", f"hydra.run.dir={run_dir}",
                      *QUIET], cwd=tmp_path, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "starting from the beginning" in (run_dir / "trainctl.log").read_text()
    again = trainctl(["run", "trainer.max_epochs=3", "checkpoint.resume=auto", f"hydra.run.dir={run_dir}",
                      *QUIET], cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 69
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == sorted(r["step"] for r in records), "no step goes backwards"
    train = [r["step"] for r in records if "train/loss" in r]
    assert train == list(range(10, 61, 10)), "each training reading once, none duplicated by the second session"
    evals = [r["step"] for r in records if "val/acc" in r]
    assert evals == [23, 46, 69]


def test_eval_command_reproduces_the_run_and_checkpoint_metrics(tmp_path):
    fit(tmp_path, ["trainer.max_epochs=3"])
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    out = trainctl(["eval", str(run_dir), "--json"], cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["metrics"]["val/acc"] == pytest.approx(summary["final"]["val/acc"], abs=1e-6)
    assert json.loads((run_dir / "eval.json").read_text())["metrics"] == result["metrics"]
    out = trainctl(["eval", str(run_dir / "checkpoints" / "best")], cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and "val/acc" in out.stdout
    best = json.loads((run_dir / "eval-best.json").read_text())
    assert best["metrics"]["val/acc"] == pytest.approx(summary["best_metric"], abs=1e-6)
    out = trainctl(["eval", str(tmp_path)], cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "neither a run directory" in out.stderr


def test_an_interruption_when_an_evaluation_is_due_defers_it_to_the_resumed_run(tmp_path, monkeypatch):
    from trainctl.runner import Runner

    args = ["trainer.max_epochs=3", "scheduler=plateau", "scheduler.patience=0", "early_stopping.patience=9"]
    fit(tmp_path, args, name="reference")
    original = Runner.train_step

    def interrupted_at_23(self, window):  # as if SIGTERM arrived during step 23, which ends epoch 1
        original(self, window)
        if self.state.step == 23 and not getattr(self, "_was_interrupted", False):
            self._was_interrupted = True
            self.state.request_stop("interrupted")

    monkeypatch.setattr(Runner, "train_step", interrupted_at_23)
    summary = fit(tmp_path, args, name="run")
    assert summary["stop_reason"] == "interrupted" and summary["steps"] == 23
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last").state["run"]["eval_pending"]
    monkeypatch.setattr(Runner, "train_step", original)
    assert fit(tmp_path, [*args, "checkpoint.resume=auto"], name="run")["stop_reason"] == "completed"

    def records(name: str) -> list:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(l).items() if k not in TIMING_KEYS} for l in lines]
    assert records("run") == records("reference")
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("run", "reference"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_exception_mid_run_is_recorded_and_the_last_checkpoint_stays(tmp_path, monkeypatch):
    from trainctl.evaluation import Evaluator

    original, calls = Evaluator.__call__, {"n": 0}

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return original(self, *args)

    monkeypatch.setattr(Evaluator, "__call__", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        fit(tmp_path, ["trainer.max_epochs=5"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "failed" and "simulated" in summary["error"]
    assert newest_valid(tmp_path / "run" / "checkpoints").step == 46


def test_resume_before_the_first_checkpoint_starts_over_in_place(tmp_path):
    from trainctl.spec import spec_yaml

    run_dir = tmp_path / "early-kill"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(spec_yaml(compose([*QUIET, "trainer.max_epochs=2"])))
    (run_dir / "metrics.jsonl").write_text('{"step": 10, "epoch": 0, "train/loss": 2.3}\n')
    out = trainctl(["resume", str(run_dir)], cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "starting from the beginning" in (run_dir / "trainctl.log").read_text()
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/acc" in r] == [23, 46]
    assert [r["step"] for r in records].count(10) == 1, "the killed session's records were replaced"


@pytest.mark.parametrize("override,needle", [
    ("trainer.max_epoch=3", "trainer.max_epoch: no such key. Did you mean 'trainer.max_epochs'?"),
    ("trainer.max_epochs=abc", "trainer.max_epochs: Value 'abc'"),
    ("optimizer=sgd", "optimizer: a continued run keeps its optimizer option (adamw)"),
    ("+trainer.x=1", "use key=value"),
])
def test_bad_resume_overrides_name_the_key(tmp_path, override, needle):
    from trainctl.resume import load_saved_spec
    from trainctl.spec import spec_yaml

    (tmp_path / "config.yaml").write_text(spec_yaml(compose([])))
    with pytest.raises(ConfigError) as error:
        load_saved_spec(tmp_path / "config.yaml", [override], str(tmp_path))
    assert needle in str(error.value) and error.value.fix


def test_records_of_a_killed_session_are_dropped_from_metrics_and_tensorboard(tmp_path):
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["logging.progress=none", "trainer.max_epochs=2", "checkpoint.save_best=false"]
    from trainctl.job import train

    train(compose(args), tmp_path / "run", str(tmp_path))
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.rmtree(ckpts / "step-00000046")  # as if killed after logging step 46 but before its save
    (ckpts / "last").unlink()
    train(compose([*args, "checkpoint.resume=auto"]), tmp_path / "run", str(tmp_path))
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in json.loads(l)]
    assert steps == [10, 20, 30, 40], "each step logged once"
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [10, 20, 30, 40]
