"""Untrusted input: `_target_` paths that try to reach code through an allowed module, crafted or
inconsistent checkpoints (re-sealed so their checksums verify), YAML with Python tags, files that are
not what they claim (a symlink to /dev/zero, a huge spec), and values that would make a run hang or
diverge silently. Each is refused with one message naming the key and exit code 2, and creates nothing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import List

import pytest
import torch

from conftest import build, compose, trainctl
from trainctl.errors import ConfigError
from trainctl.files import COMMIT_MARKER, commit_dir

QUIET = ["logging.progress=none", "logging.tensorboard=false"]

# Paths that start with an allowed prefix but reach other modules through attribute walks. Hydra
# 1.3.8's own blocklist stops os.system; it does not stop the other two.
BYPASSES = ["torch.nn.parallel.distributed.os.system", "trainctl.checkpoint.shutil.copy", "trainctl.files.os.makedirs"]


def _args(target: str, tmp_path: Path) -> list:
    return {"torch.nn.parallel.distributed.os.system": [f"touch {tmp_path / 'owned'}"],
            "trainctl.checkpoint.shutil.copy": [str(tmp_path / "secret"), str(tmp_path / "owned")],
            "trainctl.files.os.makedirs": [str(tmp_path / "owned")]}[target]


@pytest.mark.parametrize("target", BYPASSES)
@pytest.mark.parametrize("where", ["top", "nested"])
def test_a_target_reaching_another_module_is_refused_and_runs_nothing(tmp_path, target, where):
    from trainctl import targets

    (tmp_path / "secret").write_text("secret")
    node = {"_target_": target, "_args_": _args(target, tmp_path)}
    if where == "nested":
        node = {"_target_": "torch.nn.Sequential", "x": node}
    with pytest.raises(ConfigError) as error:
        import torch.nn as nn

        targets.build(node, "model", targets.BUILTIN_PREFIXES, nn.Module)
    assert "is the module" in error.value.message and "not a class" in error.value.message
    assert not (tmp_path / "owned").exists()


def test_the_cli_refuses_the_bypasses_from_show_and_run(tmp_path):
    (tmp_path / "secret").write_text("secret")
    for target in BYPASSES:
        args = ", ".join(f"'{a}'" for a in _args(target, tmp_path))
        extra = f"{{_target_: {target}, _args_: [{args}]}}"
        for command in ("show", "run"):
            out = trainctl([command, "model=custom", "model._target_=torch.nn.Module", f"+model.x={extra}",
                            f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=60)
            assert out.returncode == 2, out.stderr
            assert "model.x._target_" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "owned").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("target,words", [
    ("torch.nn.functional.relu", "is a function, not a class"),
    ("trainctl.metrics.MetricsWriter", "not a torch.nn.Module subclass"),
    ("trainctl.models", "is a module, not a class"),
    ("trainctl.models.mlp.Nope", "has no attribute 'Nope'"),
    ("nowhere.Net", "not under an allowed module prefix"),
    ("os.system", "not under an allowed module prefix"),
    ("torch.nn..Linear", "not a dotted Python path"),
])
def test_what_is_built_is_decided_by_what_the_target_is(target, words):
    with pytest.raises(ConfigError, match=words) as error:
        build(["model=custom", f"model._target_={target}"])
    assert error.value.key == "model._target_" and error.value.fix


def test_allowed_prefixes_cannot_widen_the_kind_of_object(tmp_path):
    # even a config that allows `subprocess.` cannot build Popen: a model target must be an nn.Module class
    with pytest.raises(ConfigError, match="not a torch.nn.Module subclass"):
        build(["model=custom", "model._target_=torch.nn.Linear", "+model.in_features=64", "+model.out_features=10",
               "+model.x={_target_: subprocess.Popen, _args_: [[touch, owned]]}", "allowed_target_prefixes=[subprocess.]"],
              base_dir=str(tmp_path))
    assert not (tmp_path / "owned").exists()
    for bad in ("['']", "[.]", "['a b']"):
        with pytest.raises(ConfigError, match="is not a module prefix"):
            compose([f"allowed_target_prefixes={bad}"])


def test_nested_module_targets_and_partials_are_built(tmp_path):
    run = build(["model=custom", "model._target_=torch.nn.Sequential",
                 "+model._args_=[{_target_: torch.nn.Flatten}, {_target_: torch.nn.Linear, in_features: 64, "
                 "out_features: 10}]"])
    assert isinstance(run.model[1], torch.nn.Linear) and run.model[1].out_features == 10
    from trainctl import targets

    norm = targets.build({"_target_": "torch.nn.Sequential", "_args_": [{"_target_": "torch.nn.Identity"}]},
                         "model", targets.BUILTIN_PREFIXES, torch.nn.Module)
    assert isinstance(norm[0], torch.nn.Identity)
    partial = targets._build({"_target_": "torch.nn.LayerNorm", "_partial_": True}, "model.norm",
                             targets.BUILTIN_PREFIXES, torch.nn.Module, None, {}, top=False)
    assert isinstance(partial(8), torch.nn.LayerNorm)
    with pytest.raises(ConfigError, match="_partial_"):
        compose(["model=custom", "model._target_=torch.nn.Linear", "+model._partial_=true"])


# --- crafted and inconsistent checkpoints ------------------------------------------------------------------

def _train(tmp_path: Path, name: str = "run", extra: List[str] = ()) -> Path:
    from trainctl.job import train

    run_dir = tmp_path / name
    train(compose([*QUIET, "trainer.max_epochs=2", "checkpoint.save_best=false", *extra]), run_dir, str(tmp_path))
    return run_dir


def _reseal(ckpt: Path) -> None:
    """Seal a checkpoint directory again after its files were changed, as someone rewriting it would."""
    (ckpt / COMMIT_MARKER).unlink()
    tmp = ckpt.with_name(".tmp-reseal")
    ckpt.rename(tmp)
    commit_dir(tmp, ckpt)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-epoch run with checkpoints at steps 23 and 46, and a run of another width."""
    root = tmp_path_factory.mktemp("finished")
    _train(root)
    _train(root, "wide", ["model.width=64"])
    return root


def _copy(finished: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished / "run", run_dir, symlinks=True)
    return run_dir


@pytest.mark.parametrize("target", BYPASSES[1:])
def test_a_crafted_spec_in_a_sealed_checkpoint_is_refused_and_creates_nothing(finished, tmp_path, target):
    run_dir = _copy(finished, tmp_path)
    ckpt = run_dir / "checkpoints" / "step-00000046"
    (tmp_path / "secret").write_text("secret")
    spec = (ckpt / "spec.yaml").read_text()
    model = spec[spec.index("model:"):spec.index("data:")]
    args = _args(target, tmp_path)
    spec = spec.replace(model, "model:\n  _target_: torch.nn.Module\n  x:\n    _target_: " + target + "\n    _args_: "
                        + json.dumps(args) + "\n")
    (ckpt / "spec.yaml").write_text(spec)
    _reseal(ckpt)
    before = sorted(p.name for p in run_dir.iterdir())
    out = trainctl(["eval", str(ckpt)], cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "model.x._target_" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "owned").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == before, "nothing was written into the run"


def _summary_text(run_dir: Path) -> str:
    return (run_dir / "summary.json").read_text()


def test_a_state_from_another_model_is_refused_before_anything_changes(finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    ckpt = run_dir / "checkpoints" / "step-00000046"
    shutil.copy(finished / "wide" / "checkpoints" / "step-00000046" / "state.pt", ckpt / "state.pt")
    _reseal(ckpt)
    summary, metrics = _summary_text(run_dir), (run_dir / "metrics.jsonl").read_text()
    out = trainctl(["resume", str(run_dir), "trainer.max_epochs=3"], cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "does not fit this run" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "exp_avg" in out.stderr and "(64, 64)" in out.stderr
    assert _summary_text(run_dir) == summary and (run_dir / "metrics.jsonl").read_text() == metrics, \
        "the finished run's record is untouched"


@pytest.mark.parametrize("damage", ["meta_empty", "state_without_optimizer", "state_of_another_step"])
def test_an_inconsistent_checkpoint_falls_back_to_the_previous_one(finished, tmp_path, damage, caplog):
    import logging

    from trainctl.checkpoint import newest_valid, read_checkpoint
    from trainctl.files import CheckpointError

    run_dir = _copy(finished, tmp_path)
    ckpt = run_dir / "checkpoints" / "step-00000046"
    if damage == "meta_empty":
        (ckpt / "meta.json").write_text("{}")
    else:
        state = torch.load(ckpt / "state.pt", weights_only=True)
        if damage == "state_without_optimizer":
            del state["optimizer"]
        else:
            state["run"]["step"] = 7
        torch.save(state, ckpt / "state.pt")
    _reseal(ckpt)
    with pytest.raises(CheckpointError, match="not a usable checkpoint"):
        read_checkpoint(ckpt)
    with caplog.at_level(logging.WARNING, logger="trainctl"):
        assert newest_valid(run_dir / "checkpoints").step == 23
    assert "falling back" in caplog.text
    out = trainctl(["eval", str(ckpt)], cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "not a usable checkpoint" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("how", ["symlink_listed", "symlink_unlisted", "extra_file", "marker_path"])
def test_a_checkpoint_file_must_be_a_regular_file_its_marker_lists(finished, tmp_path, how):
    from trainctl.checkpoint import read_checkpoint
    from trainctl.files import CheckpointError

    run_dir = _copy(finished, tmp_path)
    ckpt = run_dir / "checkpoints" / "step-00000046"
    marker = json.loads((ckpt / COMMIT_MARKER).read_text())
    if how.startswith("symlink"):
        (ckpt / "spec.yaml").unlink()
        os.symlink("/dev/zero", ckpt / "spec.yaml")  # read until memory runs out, if anything read it
        if how == "symlink_listed":
            marker["files"]["spec.yaml"] = {"bytes": 0, "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}
        else:
            del marker["files"]["spec.yaml"]
    elif how == "extra_file":
        (ckpt / "notes.txt").write_text("hello")
    else:
        marker["files"]["../../config.yaml"] = marker["files"].pop("spec.yaml")
    (ckpt / COMMIT_MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(ckpt)
    words = {"symlink_listed": "not a regular file", "symlink_unlisted": "does not list spec.yaml",
             "extra_file": "notes.txt, which its commit marker does not list", "marker_path": "not a file name"}[how]
    assert words in str(error.value)


def test_spec_files_are_read_only_when_small_and_regular(finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    os.truncate(run_dir / "config.yaml", 64 << 20)  # sparse: costs nothing on disk, 64 MB if read
    out = trainctl(["resume", str(run_dir)], cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "is larger than" in out.stderr and "Traceback" not in out.stderr, out.stderr
    (run_dir / "config.yaml").unlink()
    os.symlink("/dev/zero", run_dir / "config.yaml")
    out = trainctl(["resume", str(run_dir)], cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "not a trainctl run directory" in out.stderr


@pytest.mark.parametrize("where", ["config", "checkpoint"])
def test_python_yaml_tags_are_refused_with_one_message(finished, tmp_path, where):
    run_dir = _copy(finished, tmp_path)
    payload = f"!!python/object/apply:os.system ['touch {tmp_path / 'owned'}']"
    if where == "config":
        text = (run_dir / "config.yaml").read_text().replace("lr: 0.001", f"lr: {payload}")
        (run_dir / "config.yaml").write_text(text)
        out = trainctl(["resume", str(run_dir)], cwd=tmp_path, timeout=60)
    else:
        ckpt = run_dir / "checkpoints" / "step-00000046"
        (ckpt / "spec.yaml").write_text((ckpt / "spec.yaml").read_text().replace("lr: 0.001", f"lr: {payload}"))
        _reseal(ckpt)
        out = trainctl(["eval", str(ckpt)], cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "not a plain YAML spec (line" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "owned").exists()


def test_python_yaml_tags_in_a_config_directory_are_refused(tmp_path):
    (tmp_path / "conf" / "extra").mkdir(parents=True)
    (tmp_path / "conf" / "extra" / "evil.yaml").write_text(
        f"trainer:\n  seed: !!python/object/apply:os.system ['touch {tmp_path / 'owned'}']\n")
    for args in (["run", "--config-dir", "conf", "+extra=evil"], ["show", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                                                                  "+extra=evil"]):
        out = trainctl(args, cwd=tmp_path, timeout=60)
        assert out.returncode == 2 and "evil.yaml, line 2" in out.stderr and "remove the !! tag" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "owned").exists() and not (tmp_path / "outputs").exists()


# --- values that would hang a run or mean nothing -----------------------------------------------------------

def test_a_batch_larger_than_the_data_with_drop_last_is_refused():
    with pytest.raises(ConfigError, match="leaves no training batch") as error:
        build(["data.batch_size=2000", "data.drop_last=true"])
    assert error.value.key == "data.batch_size" and "data.drop_last=false" in error.value.fix
    assert len(build(["data.batch_size=2000"]).data.train) == 1, "without drop_last the short batch is kept"


@pytest.mark.parametrize("override,key", [
    ("optimizer.lr=inf", "optimizer.lr"), ("optimizer.lr=nan", "optimizer.lr"),
    ("regularization.max_grad_norm=inf", "regularization.max_grad_norm"),
    ("optimizer.betas=[0.9,inf]", "optimizer.betas[1]"), ("scheduler.min_lr_ratio=-inf", "scheduler.min_lr_ratio"),
    ("+optimizer.lr_multipliers={head.*: inf}", "optimizer.lr_multipliers.head.*"),
    ("early_stopping.min_delta=inf", "early_stopping.min_delta"),
])
def test_every_float_setting_must_be_finite(override, key):
    with pytest.raises(ConfigError, match="must be a finite number") as error:
        compose([override])
    assert error.value.key == key and error.value.fix


def _csv(tmp_path: Path, text: str, name: str = "t.csv") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))
    return str(path)


ROWS = "".join(f"{i},{i * 2},{'pos' if i % 2 else 'neg'}\n" for i in range(30))


@pytest.mark.parametrize("text,key,words", [
    ("a,b,y\n" + ROWS + "5,6,\n", "data.missing", "t.csv has missing values in 1 row(s): column 'y' on 1 row(s) "
     "(line 32)"),
    ("a,b,y\n" + ROWS + "5,,pos\n", "data.missing", "column 'b' on 1 row(s) (line 32)"),
    ("a,a,y\n" + ROWS, "data.path", "has two columns named 'a'"),
    ("a,b,y\n" + ROWS + "5,6,caf\xe9\n", "data.path", "is not UTF-8 text (byte 0xe9"),
])
def test_csv_files_with_holes_or_bad_headers_are_refused_with_the_fix(tmp_path, text, key, words):
    with pytest.raises(ConfigError) as error:
        build(["data=csv", f"data.path={_csv(tmp_path, text)}", "data.target=y"])
    assert error.value.key == key and words in error.value.message and error.value.fix
    if key == "data.missing":
        assert "data.missing=drop" in error.value.fix and "data.missing=mean" in error.value.fix
    if "column 'b'" in words:
        assert error.value.fix.endswith("data.features=[a]")


def test_tensorboards_writer_thread_fails_quietly_and_other_threads_do_not():
    import threading

    from trainctl.metrics import _quiet_tensorboard_threads

    def failing() -> None:
        raise OSError(28, "No space left on device")

    class WriterThread(threading.Thread):
        pass
    WriterThread.__module__ = "tensorboard.summary.writer.event_file_writer"  # as TensorBoard's own thread
    previous, reported = threading.excepthook, []
    try:
        threading.excepthook = lambda args: reported.append(args.thread)  # what would print the traceback
        _quiet_tensorboard_threads()
        threads = [WriterThread(target=failing), threading.Thread(target=failing)]
        for thread in threads:
            thread.start()
            thread.join()
    finally:
        threading.excepthook = previous
    assert reported == [threads[1]], "only the other thread's exception reaches the hook that prints it"
