"""Sweeps: `optimized_metric`, the checks before a sweep starts (every value, Optuna's search space and
direction, missing plugins), failed jobs (recorded, the sweep goes on, Optuna marks the trial failed),
and end to end: a grid sweep and its report, an Optuna study, the joblib and submitit launchers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from conftest import compose, trainctl
from trainctl import config, sweep
from trainctl.preflight import preflight
from trainctl.errors import ConfigError
from trainctl.spec import RunSpec, spec_yaml

TINY = ["checkpoint=off", "logging.tensorboard=false", "logging.progress=none"]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _jobs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def _report_json(sweep_dir: Path, cwd: Path) -> dict:
    out = trainctl(["report", str(sweep_dir), "--format", "json"], cwd=cwd)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# --- optimized_metric -------------------------------------------------------------------------------

def test_optimized_metric_composes_but_stays_out_of_the_saved_spec():
    cfg, spec = config.compose_spec(["optimized_metric=final:val/loss"], os.getcwd())
    assert cfg.optimized_metric == "final:val/loss"
    assert type(spec) is RunSpec, "config.yaml and checkpoints hold the plain run spec (resume reads them)"
    assert "optimized_metric" not in spec_yaml(spec)
    assert compose().trainer.monitor == "auto"


@pytest.mark.parametrize("metric", ["val/mse", "train/loss", "val/accuracy"])
def test_an_optimized_metric_the_run_does_not_report_is_refused(metric):
    with pytest.raises(ConfigError) as error:
        compose([f"optimized_metric={metric}"])
    assert error.value.key == "optimized_metric" and "val/acc" in str(error.value)


# --- before the sweep starts ------------------------------------------------------------------------

def test_the_optuna_sweep_config_checks_out(tmp_path):
    preflight(["+sweep=optuna_digits"], True, str(tmp_path))
    cfg, _ = config.compose_spec(["+sweep=optuna_digits"], str(tmp_path))
    assert cfg.optimized_metric == "val/acc" and cfg.trainer.max_epochs == 10
    with pytest.raises(ConfigError) as error:
        preflight(["+sweep=optuna_digits", "optimized_metric=val/loss"], True, str(tmp_path))
    assert error.value.key == "hydra.sweeper.direction" and error.value.fix == "set hydra.sweeper.direction=minimize"
    preflight(["+sweep=optuna_digits", "optimized_metric=val/loss", "hydra.sweeper.direction=minimize"],
                     True, str(tmp_path))
    assert not (tmp_path / "multirun").exists()


@pytest.mark.parametrize("overrides, key, needle", [
    (["optimizer=adamw,sgdd"], "optimizer", "Did you mean 'sgd'"),
    (["optimizer.lr=0.001,-1"], "optimizer.lr", "must be > 0"),
    (["+sweep=optuna_digits", "optimizer=choice(adamw,lionn)"], "optimizer", "Did you mean 'lion'"),
    (["+sweep=optuna_digits", "optimizer.lr=tag(log, interval(-1, 0.1))"], "optimizer.lr", "must be > 0"),
    (["+sweep=optuna_digits", "trainer.max_epoch=choice(1,2)"], "trainer.max_epoch", "max_epochs"),
])
def test_every_swept_value_is_checked_before_the_sweep(tmp_path, overrides, key, needle):
    with pytest.raises(ConfigError) as error:
        preflight(overrides, True, str(tmp_path))
    assert error.value.key == key and needle in str(error.value)


def test_a_new_sweep_never_writes_into_an_earlier_sweeps_directory(tmp_path):
    (tmp_path / "old" / "0").mkdir(parents=True)
    (tmp_path / "old" / "0" / "summary.json").write_text('{"status": "done"}')
    with pytest.raises(ConfigError) as error:
        preflight(["optimizer=adamw,sgd", "hydra.sweep.dir=old"], True, str(tmp_path))
    assert error.value.key == "hydra.sweep.dir" and "already holds the runs of a sweep" in error.value.message
    preflight(["optimizer=adamw,sgd", "hydra.sweep.dir=new"], True, str(tmp_path))


def test_a_missing_plugin_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(config.PLUGINS, ("hydra/launcher", "fancy_cluster"), "hydra-fancy-cluster-launcher")
    with pytest.raises(ConfigError) as error:
        preflight(["hydra/launcher=fancy_cluster", "optimizer=adamw,sgd"], True, str(tmp_path))
    assert error.value.key == "hydra/launcher" and "hydra-fancy-cluster-launcher" in error.value.message
    assert error.value.fix.startswith('pip install "trainctl[sweep]"')
    with pytest.raises(ConfigError, match="Available: basic, joblib, submitit_local, submitit_slurm"):
        preflight(["hydra/launcher=jobllib", "optimizer=adamw,sgd"], True, str(tmp_path))


# --- failed jobs ------------------------------------------------------------------------------------

def test_a_failed_job_is_recorded_and_returned_as_a_failure(tmp_path):
    def config_error():
        raise ConfigError("model", "model=cnn needs image inputs", "set model=mlp")

    result = sweep.run_job(config_error, tmp_path / "0")
    assert isinstance(result, sweep.FailedJob)
    with pytest.raises(ValueError, match="needs image inputs"):
        float(result)
    summary = _summary(tmp_path / "0")
    assert summary["status"] == "failed" and summary["stop_reason"] == "config_error"
    assert summary["error"] == "model: model=cnn needs image inputs\n  fix: set model=mlp"

    def crash():
        raise RuntimeError("shapes do not match")

    assert "RuntimeError: shapes do not match" in repr(sweep.run_job(crash, tmp_path / "1"))
    assert _summary(tmp_path / "1")["error"] == "RuntimeError: shapes do not match"

    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "summary.json").write_text(json.dumps({"status": "failed", "stop_reason": "diverged"}))
    result = sweep.run_job(lambda: ({"status": "failed", "stop_reason": "diverged"}, "auto"), tmp_path / "2")
    assert isinstance(result, sweep.FailedJob) and "diverged" in repr(result)
    with pytest.raises(SystemExit) as stop:
        sweep.run_job(lambda: ({"stop_reason": "interrupted", "signal_number": 2}, "auto"), tmp_path / "3")
    assert stop.value.code == 130, "Ctrl-C ends the whole sweep"


def test_a_failure_record_never_replaces_a_finished_runs_summary(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"status": "done", "stop_reason": "completed"}))
    sweep.record_failure(tmp_path, "config_error", "hydra.run.dir: already holds a run")
    assert _summary(tmp_path) == {"status": "done", "stop_reason": "completed"}


@pytest.mark.filterwarnings("ignore:.*declarative_base")  # optuna 2.x importing SQLAlchemy 2
def test_optuna_records_a_failed_job_as_a_failed_trial_and_goes_on(tmp_path):
    """The real Optuna sweeper, with a launcher that returns what trainctl's jobs return."""
    from hydra.core.utils import JobReturn, JobStatus
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
    from omegaconf import OmegaConf
    from optuna.samplers import RandomSampler

    class Launcher:
        launched: list = []

        def launch(self, overrides, initial_job_idx):
            returns = []
            for i, job in enumerate(overrides):
                x = float(dict(o.split("=") for o in job)["x"])
                ret = JobReturn(overrides=list(job), status=JobStatus.COMPLETED)
                ret.return_value = sweep.FailedJob(str(initial_job_idx + i), "diverged") if x > 2 else x
                returns.append(ret)
                self.launched.append(x)
            return returns

    impl = OptunaSweeperImpl(RandomSampler(seed=1), "maximize", None, "test", 8, 1, 0.0, None, None,
                             OmegaConf.create({"x": "choice(1, 2, 3, 4)"}))
    impl.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    impl.launcher, impl.hydra_context, impl.job_idx = Launcher(), object(), 0
    impl.sweep([])
    assert len(Launcher.launched) == 8 and {3.0, 4.0} & set(Launcher.launched), "failed trials came and went"
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["best_value"] == 2.0 and results["best_params"] == {"x": 2}


# --- end to end ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_grid_sweep_and_its_report(tmp_path):
    from PIL import Image

    from trainctl import plots
    from trainctl.report import build_report, find_runs

    out = trainctl(["run", "-m", "optimizer.lr=0.001,0.01", "regularization.weight_decay=0.0,0.1",
                    "trainer.max_epochs=2", "logging.log_every_n_steps=5", *TINY, "hydra.sweep.dir=grid"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "sweep finished: 4 jobs" in out.stderr and "0 failed" in out.stderr
    jobs = _jobs(tmp_path / "grid")
    assert len(jobs) == 4 and all(_summary(j)["stop_reason"] == "completed" for j in jobs)
    combos = [("0.001", "0.0"), ("0.001", "0.1"), ("0.01", "0.0"), ("0.01", "0.1")]
    best = {j.name: _summary(j)["best_metric"] for j in jobs}
    top = max(best.values())

    data = _report_json(tmp_path / "grid", tmp_path)
    assert data["varying"] == ["optimizer.lr", "regularization.weight_decay"]
    assert data["common"]["trainer.max_epochs"] == "2"
    rows = {row["run"]: row for row in data["runs"]}
    assert sorted(rows) == ["0", "1", "2", "3"]
    for job, (lr, wd) in zip(sorted(rows), combos):
        assert rows[job]["varying"] == {"optimizer.lr": lr, "regularization.weight_decay": wd}
        assert rows[job]["best"] == pytest.approx(best[job]) and rows[job]["steps"] == 46
    assert best[data["best_run"]] == top and data["runs"][0]["run"] == data["best_run"]
    assert [r["objective"] for r in data["runs"]] == sorted(best.values(), reverse=True)

    table = trainctl(["report", "grid"], cwd=tmp_path).stdout
    for job, (lr, wd) in zip(sorted(rows), combos):
        assert any(job in line.split()[:2] and " ".join([lr, wd]) in " ".join(line.split())
                   for line in table.splitlines())
    assert f"best: {data['best_run']} (best val/acc {top:.4f})" in table

    assert set(data["files"]) == {"report.md", "curves.png", "lr.png", "heatmap.png"}
    for name in ("curves.png", "lr.png", "heatmap.png"):
        with Image.open(tmp_path / "grid" / name) as image:
            assert image.format == "PNG" and image.width > 400 and len(image.getcolors(100000) or []) > 20
    report = build_report(find_runs([str(tmp_path / "grid")]))
    # per run: the validation curve (solid) and its training twin (dashed) on each panel
    assert [len(ax.get_lines()) for ax in plots.curves_figure(report).axes] == [8, 8]
    assert len(plots.lr_figure(report).axes[0].get_lines()) == 4
    grid = plots.heatmap_figure(report).axes[0].images[0].get_array()
    assert grid[0, 0] == pytest.approx(best["0"]) and grid[1, 1] == pytest.approx(best["3"])


@pytest.mark.slow
def test_a_failing_job_is_reported_and_the_others_finish(tmp_path):
    out = trainctl(["run", "-m", "model=mlp,cnn", "data=digits,synthetic", "trainer.max_steps=5", *TINY,
                    "hydra.sweep.dir=s"], cwd=tmp_path)
    assert out.returncode == 1, "a sweep with a failed job ends with 1, after every job ran"
    assert "trainctl: job 3 failed: model: model=cnn needs image inputs" in out.stderr
    assert "sweep finished: 4 jobs" in out.stderr and "1 failed" in out.stderr
    jobs = _jobs(tmp_path / "s")
    assert [_summary(j)["stop_reason"] for j in jobs] == ["completed", "completed", "completed", "config_error"]
    assert "fix: set model=mlp" in _summary(jobs[3])["error"]
    data = _report_json(tmp_path / "s", tmp_path)
    assert data["runs"][-1]["run"] == "3" and data["runs"][-1]["status"] == "failed"
    assert "needs image inputs" in data["runs"][-1]["reason"]
    table = trainctl(["report", "s", "--no-plots"], cwd=tmp_path).stdout
    assert "3 config_error: model: model=cnn needs image inputs" in table and "1 failed" in table


@pytest.mark.slow
def test_an_optuna_study_survives_diverging_trials_and_its_best_appears_in_the_report(tmp_path):
    out = trainctl(["run", "-m", "+sweep=optuna_digits", "hydra.sweeper.n_trials=4", "optimizer.lr=choice(0.003,1e9)",
                    "trainer.max_epochs=null", "trainer.max_steps=20", *TINY, "hydra.sweep.dir=opt"], cwd=tmp_path)
    jobs = _jobs(tmp_path / "opt")
    reasons = [_summary(j)["stop_reason"] for j in jobs]
    assert len(jobs) == 4 and "diverged" in reasons and "completed" in reasons, out.stderr
    assert out.returncode == 1 and "Best parameters" in out.stdout
    results = yaml.safe_load((tmp_path / "opt" / "optimization_results.yaml").read_text())
    assert results["best_params"]["optimizer.lr"] == 0.003
    assert set(results["best_params"]) == {"optimizer", "scheduler", "optimizer.lr", "regularization.weight_decay"}

    data = _report_json(tmp_path / "opt", tmp_path)
    assert data["optimized_metric"] == "val/acc" and data["optuna"]["best_params"] == results["best_params"]
    best = data["runs"][0]
    assert data["optuna"]["best_run"] == best["run"] == data["best_run"]
    assert best["objective"] == pytest.approx(results["best_value"])
    assert {k: best["overrides"][k] for k in results["best_params"]} == {
        k: str(v) for k, v in results["best_params"].items()}
    assert [r["status"] for r in data["runs"] if r["stop_reason"] == "diverged"] == ["failed"] * reasons.count("diverged")
    table = trainctl(["report", "opt", "--no-plots"], cwd=tmp_path).stdout
    assert "optuna best trial:" in table and f"optimizer={results['best_params']['optimizer']}" in table


@pytest.mark.slow
def test_the_joblib_launcher_runs_jobs_in_parallel(tmp_path):
    out = trainctl(["run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optimizer.lr=0.001,0.003",
                    "trainer.max_epochs=4", *TINY, "hydra.sweep.dir=par"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    jobs = _jobs(tmp_path / "par")
    assert [_summary(j)["stop_reason"] for j in jobs] == ["completed", "completed"]
    # a job starts when Hydra writes its .hydra/ record and ends with its final summary
    spans = [((j / ".hydra" / "overrides.yaml").stat().st_mtime, (j / "summary.json").stat().st_mtime) for j in jobs]
    (start_a, end_a), (start_b, end_b) = spans
    assert start_a < end_b and start_b < end_a, f"the two jobs ran one after the other: {spans}"


@pytest.mark.slow
def test_the_submitit_local_launcher_runs_a_job(tmp_path):
    out = trainctl(["run", "-m", "hydra/launcher=submitit_local", "optimizer.lr=0.003", "trainer.max_steps=10",
                    *TINY, "hydra.sweep.dir=sub"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (job,) = _jobs(tmp_path / "sub")
    summary = _summary(job)
    assert summary["stop_reason"] == "completed" and summary["steps"] == 10 and not math.isnan(summary["best_metric"])
    logs = list((tmp_path / "sub" / ".submitit").glob("*/*_log.out"))
    assert logs and "run directory" in logs[0].read_text(), "the job ran in submitit's own process"
