"""Start-up: nothing is imported or computed before the first optimizer step that the step does not
need - no scikit-learn for synthetic data, no TensorBoard when it is off, no metrics library at all -
the command line is composed and validated once, and `--help` imports neither torch nor Hydra.
(How long each takes is measured by `benchmarks/paths.py`, not by tests.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose

HEAVY = ("sklearn", "torchmetrics", "tensorboard", "matplotlib", "scipy", "pandas")


def _imported(args: list, cwd: Path) -> set:
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "trainctl", *args], cwd=cwd, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("data", ["digits", "synthetic", "text"])
def test_a_run_imports_nothing_heavy(tmp_path, text_file, data):
    extra = {"synthetic": ["data=synthetic"], "text": ["data=text", f"data.path={text_file}", "model=gpt",
                                                       "model.n_layer=1", "data.seq_len=16"]}.get(data, [])
    modules = _imported(["run", *extra, "trainer.max_steps=2", "trainer.max_epochs=null", "trainer.eval_every_n_steps=2",
                         "trainer.eval_every_n_epochs=null", "logging.tensorboard=false", "logging.progress=none",
                         f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert "torch" in modules and not modules & set(HEAVY), modules & set(HEAVY)


def test_help_imports_neither_torch_nor_hydra(tmp_path):
    modules = _imported(["--help"], tmp_path)
    assert not modules & {"torch", "hydra", "omegaconf", "numpy", "rich"}


def test_a_plain_run_is_composed_and_validated_once(tmp_path):
    code = ("import atexit, trainctl.spec as s, trainctl.config as c\n"
            "counts = {'validate': 0, 'compose': 0}\n"
            "validate, compose = s.RunSpec.validate, c.compose_for_run\n"
            "def counted_validate(self):\n    counts['validate'] += 1\n    validate(self)\n"
            "def counted_compose(*a, **k):\n    counts['compose'] += 1\n    return compose(*a, **k)\n"
            "s.RunSpec.validate, c.compose_for_run = counted_validate, counted_compose\n"
            "atexit.register(lambda: print('COUNTS', counts))\n"
            "from trainctl.cli import main\n"
            f"main(['run', 'trainer.max_steps=1', 'trainer.max_epochs=null', 'logging.progress=none', "
            f"'logging.tensorboard=false', 'hydra.run.dir={tmp_path / 'run'}'])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "COUNTS {'validate': 1, 'compose': 1}" in out.stdout


def test_tensorboards_set_up_is_not_training_time(tmp_path):
    from trainctl.job import train

    summary = train(compose(["logging.progress=none", "trainer.max_steps=20", "trainer.max_epochs=null",
                             "checkpoint=off"]), tmp_path / "run", str(tmp_path))
    assert summary["setup_seconds"] > 0, "creating the TensorBoard writer at the first record is set-up"
    parts = sum(summary[k] for k in ("train_seconds", "eval_seconds", "checkpoint_seconds", "setup_seconds"))
    assert parts <= summary["wall_seconds"] + 0.005
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["setup_seconds"] == summary["setup_seconds"]
