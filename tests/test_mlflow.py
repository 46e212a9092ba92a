"""MLflow logging (`logging.mlflow=true`): runs logged into a real local MLflow store and read back through
MLflow's own client - params, metric histories against metrics.jsonl, artifacts, status, resuming, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose
from trainctl.errors import ConfigError

pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")

ARGS = ["data=synthetic", "data.n_samples=300", "data.batch_size=32", "model=mlp", "model.width=16",
        "trainer.max_epochs=2", "logging.log_every_n_steps=3", "logging.progress=none",
        "logging.tensorboard=false", "logging.mlflow=true", "checkpoint.every_n_epochs=1"]
"""8 optimizer steps per epoch (240 training samples), 16 in all; evaluated at steps 8 and 16."""


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _records(run_dir: Path, key: str):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


def _history(client, run_id: str, key: str):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _same(history, records) -> None:
    assert [s for s, _ in history] == [s for s, _ in records]
    assert [v for _, v in history] == pytest.approx([v for _, v in records], rel=1e-12)


def _train(args, run_dir: Path, base: Path):
    from trainctl.job import train

    return train(compose(args, str(base)), run_dir, str(base))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_a_run_is_logged_with_its_params_metrics_weights_and_status(tmp_path, store):
    run_dir = tmp_path / "outputs" / "run"
    summary = _train(ARGS, run_dir, tmp_path)  # the default store: mlflow.db where trainctl starts
    assert summary["stop_reason"] == "completed"
    client = _client(store)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "outputs/run"
    assert client.get_experiment(run.info.experiment_id).name == "trainctl"
    spec = compose(ARGS, str(tmp_path))
    assert float(run.data.params["optimizer.lr"]) == spec.optimizer.lr
    assert run.data.params["data.batch_size"] == "32" and run.data.params["logging.mlflow"] == "true"
    for key in ("train/loss", "val/acc"):  # every logged step, once, with the value of metrics.jsonl
        logged = _records(run_dir, key)
        assert [s for s, _ in logged] == ([3, 6, 9, 12, 15] if key == "train/loss" else [8, 16])
        _same(_history(client, run_id, key), logged)
    assert run.data.metrics["summary/steps"] == 16 and run.data.tags["trainctl.stop_reason"] == "completed"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"model.safetensors", "config.yaml", "summary.json"} <= artifacts
    local = Path(client.download_artifacts(run_id, "model.safetensors", str(tmp_path)))
    assert local.read_bytes() == (run_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "mlruns").is_dir()  # artifacts beside the database


def test_an_interrupted_run_resumes_into_the_same_mlflow_run(tmp_path, store, monkeypatch):
    """Stopped as by a signal after step 5 (KILLED, checkpoint at 5), resumed: one MLflow run, every step
    once. A record the MLflow run holds past the checkpoint (as from a session killed outright) is kept,
    not logged a second time."""
    from trainctl.runner import Runner

    step = Runner.train_step
    stop = {"at": 5}

    def interrupted(self, window):
        step(self, window)
        if self.state.step == stop["at"]:
            stop["at"] = -1
            self.state.request_stop("interrupted")
    monkeypatch.setattr(Runner, "train_step", interrupted)
    args = [*ARGS, f"hydra.run.dir={tmp_path / 'run'}", f"logging.mlflow_tracking_uri={store}",
            "logging.mlflow_experiment=resumed"]
    run_dir = tmp_path / "run"
    assert _train(args, run_dir, tmp_path)["stop_reason"] == "interrupted"
    client = _client(store)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric("train/loss", 123.0, 0, 6)])  # a killed session's record
    assert _train([*args, "checkpoint.resume=auto"], run_dir, tmp_path)["stop_reason"] == "completed"
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run_id
    experiment = client.get_experiment_by_name("resumed")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    history = _history(client, run_id, "train/loss")
    assert [s for s, _ in history] == [3, 6, 9, 12, 15]
    assert dict(history)[6] == 123.0
    _same(_history(client, run_id, "val/acc"), _records(run_dir, "val/acc"))
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize("on_error,reason", [("stop", "failed"), ("continue", "completed")])
def test_a_failing_store_follows_the_logging_error_policy(tmp_path, store, on_error, reason, caplog):
    (tmp_path / "file").write_text("")
    bad = f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}"  # its directory cannot be made: a file is in the way
    summary = _train([*ARGS, f"logging.mlflow_tracking_uri={bad}", f"checkpoint.on_error={on_error}"],
                     tmp_path / "run", tmp_path)
    assert summary["stop_reason"] == reason
    error = summary.get("error") or summary.get("logging_error")
    assert error.startswith(f"could not write the MLflow run at {bad}")
    assert summary["steps"] == (3 if on_error == "stop" else 16)  # stopped at the first log step


def test_params_are_the_flattened_spec_within_mlflows_limits():
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    from trainctl.mlflow_log import flat_params

    spec = compose(["data=synthetic", "optimizer.lr=0.0123", "trainer.max_steps=7"])
    spec.model.init_from = "x" * 7000  # longer than MLflow takes
    spec.optimizer.lr_multipliers = {"net.*": 0.1}  # a pattern is no valid param name: one JSON value
    params = flat_params(spec)
    assert params["optimizer.lr"] == "0.0123" and params["trainer.max_steps"] == "7"
    assert params["trainer.max_epochs"] in ("null", str(spec.trainer.max_epochs))
    assert params["model.init_from"] == "x" * MAX_PARAM_VAL_LENGTH
    assert json.loads(params["optimizer.lr_multipliers"]) == {"net.*": 0.1}


def test_a_missing_package_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    from trainctl.mlflow_log import tracking_for

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(ConfigError) as error:
        tracking_for(compose(["data=synthetic", "logging.mlflow=true"]), tmp_path / "run", str(tmp_path))
    assert error.value.key == "logging.mlflow" and "pip install 'trainctl[mlflow]'" in str(error.value)
    assert tracking_for(compose(["data=synthetic"]), tmp_path / "run", str(tmp_path)) is None


def test_the_cli_exits_2_naming_the_extra_when_mlflow_is_missing(tmp_path):
    code = "import sys; sys.modules['mlflow'] = None; from trainctl.cli import main; main(sys.argv[1:])"
    out = subprocess.run([sys.executable, "-c", code, "run", "data=synthetic", "logging.mlflow=true",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert "logging.mlflow" in out.stderr and "pip install 'trainctl[mlflow]'" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
