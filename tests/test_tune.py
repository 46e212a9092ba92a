"""`trainctl tune`: the space file, pruning decided by Optuna's own pruners on the values the runs logged,
pruned trials marked in the storage, in summary.json and in `trainctl report`, and a study that continues
after Ctrl-C or a killed process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trainctl.errors import ConfigError

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

TINY = ["data=synthetic", "data.n_samples=300", "model.width=16", "trainer.max_epochs=3", "checkpoint=off",
        "logging.tensorboard=false", "logging.progress=none"]


def _space(tmp_path: Path, pruner, n_trials: int = 6, name: str = "tiny", **extra) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "study_name": name, "n_trials": n_trials, "metric": "val/acc", "pruner": pruner,
        "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 3}, "overrides": TINY,
        "params": {"optimizer.lr": {"type": "float", "low": "1e-5", "high": 0.3, "log": True}}, **extra}))
    return path


def _tune(tmp_path: Path, monkeypatch, *args: str) -> None:
    from trainctl.commands.tune import main

    monkeypatch.chdir(tmp_path)
    main(list(args))


def _study(root: Path, name: str = "tiny"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'study.db'}")


def _val_acc(run_dir: Path):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val/acc"] for r in records if "val/acc" in r]


# --- the space file -------------------------------------------------------------------------------------

def test_a_space_file_is_checked_key_by_key():
    from trainctl.tune import parse_space

    space = parse_space({"params": {"optimizer.lr": {"type": "float", "low": "1e-4", "high": 0.3, "log": True},
                                    "optimizer": {"type": "categorical", "choices": ["adamw", "sgd"]}},
                         "pruner": "hyperband"}, "s")
    assert space.params["optimizer.lr"].low == 1e-4 and space.pruner == {"type": "hyperband"}  # YAML's '1e-4' string
    assert space.study_name == "s" and space.sampler == {"type": "tpe"}
    bad = [({"params": {"x": {"type": "floot", "low": 0, "high": 1}}}, "params.x.type"),
           ({"params": {"x": {"type": "float", "low": 1, "high": 0}}}, "params.x"),
           ({"params": {"x": {"type": "float", "low": 0, "high": 1, "log": True}}}, "params.x.low"),
           ({"params": {"x": {"type": "float", "low": 0, "high": 1, "hgih": 2}}}, "params.x.hgih"),
           ({"params": {"x": {"type": "categorical", "choices": []}}}, "params.x.choices"),
           ({"params": {"x": {"type": "int", "low": 0, "high": 4}}, "pruner": {"type": "median", "n_startup": 3}},
            "pruner.n_startup"),
           ({"params": {"x": {"type": "int", "low": 0, "high": 4}}, "sampler": "grid"}, "sampler.type"),
           ({"params": {"x": {"type": "int", "low": 0, "high": 4}}, "n_trails": 3}, "space.n_trails"),
           ({"params": {}}, "params")]
    for data, key in bad:
        with pytest.raises(ConfigError) as error:
            parse_space(data, "s")
        assert error.value.key == key, (data, str(error.value))


def test_bad_command_lines_fail_before_the_study(tmp_path, monkeypatch):
    space = _space(tmp_path, "median")
    for args, key in ((["--space", str(space), "optimizer.lr=0.1"], "optimizer.lr"),
                      (["--space", "no_such_space"], "--space"),
                      (["--space", str(space), "trainer.max_epoch=2"], "trainer.max_epoch")):
        with pytest.raises(ConfigError) as error:
            _tune(tmp_path, monkeypatch, *args)
        assert key in str(error.value)
    assert not (tmp_path / "outputs" / "tune" / "tiny" / "study.db").exists()


# --- pruning ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pruner", [{"type": "median", "n_startup_trials": 2},
                                    {"type": "hyperband", "min_resource": 1, "max_resource": 3, "reduction_factor": 3}])
def test_pruning_follows_optunas_pruner_on_the_logged_values(tmp_path, monkeypatch, pruner):
    from trainctl.report import build_report, find_runs, headline
    from trainctl.runs import RunRecord
    from trainctl.tune import make_pruner

    _tune(tmp_path, monkeypatch, "--space", str(_space(tmp_path, pruner, n_trials=7)))
    root = tmp_path / "outputs" / "tune" / "tiny"
    trials = _study(root).get_trials()
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 7
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "no trial was pruned"
    # Optuna's own pruner, fed the same values in the same order, decides the same at every evaluation
    replay = optuna.create_study(study_name="tiny", direction="maximize", pruner=make_pruner(pruner))
    steps = 0
    for trial in trials:
        run_dir = root / f"trial-{trial.number:04d}"
        logged = _val_acc(run_dir)  # what the run itself recorded after each evaluation
        assert [trial.intermediate_values[i + 1] for i in range(len(logged))] == pytest.approx(logged)
        twin, decisions = replay.ask(), []
        for i, value in enumerate(logged):
            twin.report(value, i + 1)
            decisions.append(twin.should_prune())
            if decisions[-1]:
                break
        assert decisions == [False] * (len(logged) - 1) + [trial.state == TrialState.PRUNED], trial.number
        summary = json.loads((run_dir / "summary.json").read_text())
        record = RunRecord.load(run_dir)
        if trial.state == TrialState.PRUNED:
            replay.tell(twin, state=TrialState.PRUNED)
            assert summary["status"] == summary["stop_reason"] == "pruned" and record.status == "pruned"
            assert summary["trial"]["state"] == "PRUNED"
        else:
            replay.tell(twin, trial.value)
            assert trial.value == pytest.approx(max(logged)) == record.best("val/acc")
            assert summary["trial"]["value"] == trial.value
        assert summary["steps"] == 4 * len(logged)  # 4 steps an epoch: stopped at the evaluation that pruned it
        steps += summary["steps"]
    assert steps < 7 * 12  # pruning saved training
    report = build_report(find_runs([str(root)]))
    assert f"{len(pruned)} pruned" in headline(report)[0]
    assert report.best is not None and report.best.path.name == f"trial-{_study(root).best_trial.number:04d}"
    results = yaml.safe_load((root / "optimization_results.yaml").read_text())
    assert results["best_overrides"] == [f"optimizer.lr={_study(root).best_trial.params['optimizer.lr']!r}"]


def test_without_a_pruner_every_trial_runs_to_the_end(tmp_path, monkeypatch):
    _tune(tmp_path, monkeypatch, "--space", str(_space(tmp_path, "none")), "--n-trials", "3")
    trials = _study(tmp_path / "outputs" / "tune" / "tiny").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert all(len(t.intermediate_values) == 3 for t in trials)


# --- interrupted studies continue ----------------------------------------------------------------------

def test_ctrl_c_fails_the_trial_and_the_next_session_asks_it_again(tmp_path, monkeypatch):
    from trainctl.commands import run as run_command

    space = _space(tmp_path, "none", n_trials=4)
    train_job, calls = run_command.train_job, []

    def interrupted_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return train_job(*args, **kwargs)
    monkeypatch.setattr(run_command, "train_job", interrupted_third)
    with pytest.raises(SystemExit) as stopped:
        _tune(tmp_path, monkeypatch, "--space", str(space))
    assert stopped.value.code == 130
    root = tmp_path / "outputs" / "tune" / "tiny"
    before = _study(root).get_trials()
    assert [t.state for t in before] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL, TrialState.WAITING]
    assert before[2].user_attrs["interrupted"] is True
    monkeypatch.setattr(run_command, "train_job", train_job)
    _tune(tmp_path, monkeypatch, "--space", str(space))
    after = _study(root).get_trials()
    assert [(t.number, t.params, t.value) for t in after[:2]] == [(t.number, t.params, t.value) for t in before[:2]]
    assert after[3].params == before[2].params  # the interrupted point is tried again
    assert sum(t.state == TrialState.COMPLETE for t in after) == 4 and len(after) == 5


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_study_stopped_after_five_trials_continues_at_the_sixth(tmp_path, sig):
    from conftest import trainctl

    space = _space(tmp_path, {"type": "median", "n_startup_trials": 3}, n_trials=8,
                   overrides=[*TINY, "trainer.max_epochs=6"])
    root = tmp_path / "outputs" / "tune" / "tiny"
    proc = subprocess.Popen([sys.executable, "-m", "trainctl", "tune", "--space", str(space)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            if len([t for t in _study(root).get_trials(deepcopy=False) if t.state.is_finished()]) >= 5:
                break
        except Exception:  # the study is not created yet
            continue
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else -9)
    before = _study(root).get_trials()
    kept = [(t.number, t.state, t.params, t.value) for t in before if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(kept) >= 5 and kept[:5] == [(t.number, t.state, t.params, t.value) for t in before[:5]]
    out = trainctl(["tune", "--space", str(space)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{len(kept)} of 8 trials finished, continuing" in out.stdout
    after = _study(root).get_trials()
    assert [(t.number, t.state, t.params, t.value) for t in after if t.number in {k[0] for k in kept}] == kept
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in after) == 8
    assert not any(t.state == TrialState.RUNNING for t in after)
    unfinished = [t for t in before if t.state in (TrialState.RUNNING, TrialState.FAIL)]
    for t in unfinished:  # the trial the signal cut short: failed, its point asked again
        assert after[t.number].state == TrialState.FAIL
        if t.params:  # (none when the process died between asking for the trial and sampling it)
            assert any(u.number > t.number and u.params == t.params for u in after)
    new = [t.number for t in after if t.number not in {k[0] for k in kept} and t.state != TrialState.FAIL]
    assert new and min(new) == sum(t.state != TrialState.WAITING for t in before)  # trial 6 after 5 and the cut one


def test_a_trial_left_unclaimed_by_a_dead_process_is_failed_after_a_grace_period(monkeypatch):
    """A process killed between asking for a trial and recording its pid leaves a RUNNING trial without
    attributes: failed once older than the grace period, left alone before."""
    import optuna
    from optuna.trial import TrialState

    from trainctl import tune

    study = optuna.create_study()
    trial = study.ask()
    monkeypatch.setattr(tune, "UNCLAIMED_SECONDS", 3600.0)
    assert tune.fail_stale(study) == [] and study.trials[0].state == TrialState.RUNNING
    monkeypatch.setattr(tune, "UNCLAIMED_SECONDS", -1.0)
    assert tune.fail_stale(study) == [trial.number] and study.trials[0].state == TrialState.FAIL
