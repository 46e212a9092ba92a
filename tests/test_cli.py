"""The CLI end to end, in subprocesses: the embedded default, user CSVs, errors, show, sweeps, Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_then_signal, trainctl


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_default_run_trains_digits_to_96_percent(tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    out = trainctl(["run", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    assert elapsed < 60
    summary = _summary(run_dir)
    assert summary["status"] == "done" and summary["stop_reason"] == "completed"
    assert summary["final"]["val/acc"] >= 0.96 and summary["best_metric"] >= 0.96
    assert summary["steps"] == 690 and summary["samples_per_second"] > 0 and summary["wall_seconds"] < 60
    # the contract of the run directory
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "trainctl.log", "model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    # Hydra's own record of the job, as `hydra.main` writes it
    hydra_dir = run_dir / ".hydra"
    assert (hydra_dir / "config.yaml").is_file() and "name: trainctl" in (hydra_dir / "hydra.yaml").read_text()
    assert f"hydra.run.dir={run_dir}" in (hydra_dir / "hydra.yaml").read_text()
    assert (hydra_dir / "overrides.yaml").read_text().strip() == "[]", "the task itself had no overrides"
    records = _metrics(run_dir)
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/acc" in r]
    assert len(val) == 30 and [r["epoch"] for r in val] == list(range(1, 31))
    assert all({"step", "epoch", "lr"} <= set(r) for r in train) and train[0]["lr"] < train[5]["lr"]
    assert train[-1]["train/loss"] < train[0]["train/loss"] / 10
    assert "val/acc" in out.stdout and "run directory" in out.stdout
    # the saved weights, evaluated independently of trainctl, give the reported accuracy
    from safetensors.torch import load_file

    from trainctl.data import DigitsSpec, load
    from trainctl.models.mlp import MLP

    arrays = load(DigitsSpec())
    model = MLP((1, 8, 8), 10, depth=2, width=256, dropout_p=0.1)
    model.load_state_dict(load_file(run_dir / "model.safetensors"))
    with torch.no_grad():
        preds = model.eval()(torch.from_numpy(arrays.x_val)).argmax(-1).numpy()
    assert np.mean(preds == arrays.y_val) == pytest.approx(summary["final"]["val/acc"], abs=1e-6)


@pytest.mark.slow
def test_user_csv_classification_end_to_end(tmp_path, csv_classification):
    out = trainctl(["run", "data=csv", f"data.path={csv_classification.name}", "data.target=label",
                    "trainer.max_epochs=15", f"hydra.run.dir={tmp_path / 'run'}"], cwd=csv_classification.parent)
    assert out.returncode == 0, out.stderr
    summary = _summary(tmp_path / "run")
    assert summary["final"]["val/acc"] >= 0.9
    assert f"path: {csv_classification}" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.slow
def test_user_tsv_regression_end_to_end(tmp_path, tsv_regression):
    out = trainctl(["run", "data=csv", f"data.path={tsv_regression}", "data.target=y", "trainer.max_epochs=40",
                    "optimizer.lr=3e-3", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    final = _summary(tmp_path / "run")["final"]
    # y has variance 13 in its own units; the model should explain nearly all of it
    assert final["val/mse"] < 0.5 and final["val/mae"] < 0.6 and "val/acc" not in final


@pytest.mark.parametrize("args,needle", [
    (["optimizer.lrr=0.1"], "Did you mean 'optimizer.lr'"),
    (["optimizer=adamx"], "Did you mean 'adam' or 'adamw'"),
    (["optimizer.lr=-1"], "optimizer.lr: must be > 0"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs"),
    (["data=csv", "data.path=nope.csv", "data.target=y"], "no such file"),
    (["-m", "optimizer=adamw,sgdd"], "Did you mean 'sgd'"),
    (["checkpoint.resume=no/such/run"], "checkpoint.resume"),
    (["early_stopping.patience=0"], "early_stopping.patience: must be >= 1"),
    (["checkpoint.every_n_step=5"], "Did you mean 'checkpoint.every_n_steps'"),
    (["+trainer.fast=true"], "trainer.fast: no such key"),
    (["model=custom", "model._target_=torch.nn.Flatten"], "has no trainable parameters"),
    (["performance.activation_checkpointing=modules", "performance.checkpoint_modules=[nothing*]"],
     "performance.checkpoint_modules"),
])
def test_config_errors_exit_2_without_traceback_or_run_dir(tmp_path, args, needle):
    out = trainctl(["run", *args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                   cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    assert needle in out.stderr and "fix:" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()
    assert not (tmp_path / "outputs").exists()


def test_bad_csv_column_exits_2(tmp_path, csv_classification):
    out = trainctl(["run", "data=csv", f"data.path={csv_classification}", "data.target=lable"], cwd=tmp_path)
    assert out.returncode == 2 and "Did you mean" not in out.stderr and "x1, x2, noise, label" in out.stderr
    assert not (tmp_path / "outputs").exists()


def test_unknown_command_and_help():
    out = trainctl(["rn"], cwd=Path.cwd())
    assert out.returncode == 2 and "Did you mean 'run'" in out.stderr
    out = trainctl(["--help"], cwd=Path.cwd())
    assert out.returncode == 0 and "show" in out.stdout
    out = trainctl(["run", "--help"], cwd=Path.cwd())
    assert out.returncode == 0 and "optimizer: adafactor, adagrad" in out.stdout


def test_show_prints_the_spec_and_the_plan(tmp_path):
    out = trainctl(["show", "trainer.grad_accum_steps=3", "data.batch_size=16", "trainer.max_epochs=2"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "grad_accum_steps: 3" in out.stdout
    plan = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.stdout.splitlines()
            if line.count("│") == 3}
    assert plan["effective batch size"] == "48" and plan["batches per epoch"] == "90"
    assert plan["optimizer steps per epoch"] == "30" and plan["total optimizer steps"] == "60"
    assert plan["parameters"] == "85,002" and plan["device"] == "cpu" and plan["precision"] == "fp32"
    assert not (tmp_path / "outputs").exists()


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = trainctl(["run", "--cfg", "job", "optimizer=sgd", "optimizer.lr=0.2"], cwd=tmp_path)
    assert out.returncode == 0 and "name: sgd" in out.stdout and "lr: 0.2" in out.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_multirun_sweep_gives_one_directory_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    out = trainctl(["run", "-m", "optimizer=adamw,sgd", "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}",
                    "logging.progress=none"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert [p.name for p in jobs] == ["0", "1"]
    assert [_summary(p)["stop_reason"] for p in jobs] == ["completed", "completed"]
    assert "name: sgd" in (jobs[1] / "config.yaml").read_text()


def test_recipes_are_listed_and_applied(tmp_path):
    out = trainctl(["recipes"], cwd=tmp_path)
    assert out.returncode == 0 and "digits_cnn" in out.stdout and "trainctl run +recipe=digits_cnn" in out.stdout
    out = trainctl(["show", "+recipe=digits_cnn"], cwd=tmp_path)
    assert out.returncode == 0 and "name: cnn" in out.stdout and "lr: 0.002" in out.stdout


@pytest.mark.slow
def test_text_gpt_recipe_on_a_small_file(tmp_path, text_file):
    out = trainctl(["run", "+recipe=text_gpt", f"data.path={text_file}", "data.seq_len=32", "model.n_layer=2",
                    "model.d_model=64", "trainer.max_epochs=8", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    final = _summary(tmp_path / "run")["final"]
    raw = np.frombuffer(text_file.read_bytes(), dtype=np.uint8)
    cut = int(len(raw) * 0.9)
    unigram = np.bincount(raw[:cut], minlength=256) + 0.5
    unigram_ppl = float(np.exp(-np.log(unigram[raw[cut:]] / unigram.sum()).mean()))  # about 14.5
    assert final["val/ppl"] < unigram_ppl / 2, "the model uses context, not just byte frequencies"
    assert final["val/loss"] == pytest.approx(np.log(final["val/ppl"]), rel=1e-3)


@pytest.mark.slow
def test_ctrl_c_stops_at_a_step_boundary_and_keeps_the_results(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_then_signal(["trainer.max_epochs=1000", "logging.progress=plain"], run_dir, tmp_path,
                           signal.SIGINT, after_lines=20)
    stdout, stderr = proc.stdout_text, proc.stderr_text
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    summary = _summary(run_dir)
    assert summary["status"] == "interrupted" and 0 < summary["steps"] < 23000
    assert (run_dir / "model.safetensors").stat().st_size > 0
    steps = [r["step"] for r in _metrics(run_dir) if "train/loss" in r]
    assert steps == sorted(set(steps))
    assert (run_dir / "checkpoints" / "last").resolve().name == f"step-{summary['steps']:08d}"
    assert "trainctl resume" in stdout, "the summary says how to continue"


def test_python_dash_m_is_the_same_program():
    out = subprocess.run([sys.executable, "-m", "trainctl", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("trainctl ")


def test_a_new_run_never_writes_into_another_runs_directory(tmp_path):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"status": "done"}')
    out = trainctl(["run", f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "already holds a run" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["summary.json"], "nothing of the old run was touched"
