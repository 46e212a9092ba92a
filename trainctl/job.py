"""One training job in its run directory: find what to resume from, build, write the resolved spec (and a
table's encoding, `data_encoding.json`), train, summarise; and the evaluation of saved weights on the
validation or test split."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from trainctl.build import Run, build_run
from trainctl.checkpoint import Checkpoint, newest_valid, read_checkpoint
from trainctl.console import Display
from trainctl.errors import ConfigError
from trainctl.files import CheckpointError, failure_text, load_weights, write_json, write_text
from trainctl.metrics import MetricsWriter
from trainctl.mlflow_log import MlflowTracking, tracking_for
from trainctl.parallel import Distributed
from trainctl.plan import plan
from trainctl.resume import check_changes, find_resume_source, load_saved_spec, restore_checkpoint
from trainctl.runner import Runner
from trainctl.spec import RunSpec, spec_yaml
from trainctl.state import RunState
from trainctl.tables import ENCODING_FILE, check_test_split

log = logging.getLogger("trainctl")


def train(spec: RunSpec, run_dir: Path, base_dir: str, dist: Optional[Distributed] = None,
          callbacks: Sequence[Any] = ()) -> Dict[str, Any]:
    """Everything that can be wrong with the spec or the checkpoint to resume from - including a sealed
    checkpoint whose contents do not fit the model - fails before a file is written. Under DDP every
    rank calls this with the same directory; rank 0 writes. ``callbacks`` run after the spec's own."""
    main = dist is None or dist.is_main
    source = find_resume_source(spec, run_dir)
    changes = check_changes(source, spec, dist.world_size if dist else 1) if source is not None else []
    tracking = tracking_for(spec, run_dir, base_dir) if main else None  # a missing package fails first
    run = build_run(spec, run_dir=run_dir, base_dir=base_dir, dist=dist)
    run.callbacks.extend(callbacks)
    state = RunState()
    if source is not None:
        restore_checkpoint(run, state, source, changes)
    display = Display(spec.logging.progress if main else "none", run.horizon.total_steps, run.horizon.total_epochs)
    try:
        writer = _open_outputs(run, source, run_dir, tracking) if main else None
        runner = Runner(run, display, state, writer)
        if main:
            _write_or_refuse(run_dir, lambda: write_json(run_dir / "summary.json", {
                **runner.summary(), "status": "running", "stop_reason": None}))
    except BaseException:
        display.stop()
        raise
    log.info("run directory: %s", run_dir)
    if source is not None:
        log.info("resuming from %s: step %d, epoch %d, batch %d of the epoch", source.path, state.step,
                 state.epoch, state.batch_in_epoch)
        for line in changes:
            log.warning("changed on resume: %s", line)
    elif spec.checkpoint.resume == "auto":
        log.info("no checkpoint in %s: starting from the beginning", run_dir / "checkpoints")
    for key, value in plan(run).items():
        log.info("  %-26s %s", key, f"{value:,}" if isinstance(value, int) else value)
    if not gc.isenabled():  # switched off for the start-up of a single run (commands/run.py, resume.py)
        gc.freeze()  # later collections skip what start-up built (its few cyclic leftovers stay)
        gc.enable()
    try:
        summary = runner.fit()
    finally:
        if tracking is not None:  # the summary, the final weights and the status, however the session ended
            tracking.finish(run_dir)
    if main:
        display.summary(summary)
    log.info("summary: %s", {k: summary[k] for k in ("stop_reason", "best_metric", "steps", "wall_seconds")})
    return summary


def _open_outputs(run: Run, source: Optional[Checkpoint], run_dir: Path,
                  tracking: Optional[MlflowTracking] = None) -> MetricsWriter:
    """The run's first writes (rank 0): the resolved spec, the metrics writer (dropping records a killed
    session wrote after its last checkpoint; logging to MLflow with ``tracking``), handed to the callbacks
    that write through it, and clearing what a killed save left behind."""
    spec = run.spec

    def write() -> MetricsWriter:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.yaml", spec_yaml(spec))
        if run.data.info.encoding is not None:  # data=csv: `trainctl eval` applies the same encoding
            write_json(run_dir / ENCODING_FILE, run.data.info.encoding)
        continuing = source is not None or spec.checkpoint.resume == "auto"
        writer = MetricsWriter(run_dir, spec.logging.tensorboard,
                               resume_step=(source.step if source else 0) if continuing else None, mlflow=tracking)
        for callback in run.callbacks:  # e.g. the weight and gradient histograms
            if hasattr(callback, "attach_writer"):
                callback.attach_writer(writer)
        if run.checkpoints is not None:
            run.checkpoints.store.clean_stale()
        return writer
    return _write_or_refuse(run_dir, write)


def _write_or_refuse(run_dir: Path, write: Callable[[], Any]) -> Any:
    try:
        return write()
    except OSError as exc:
        raise ConfigError(None, f"cannot write into {run_dir}: {failure_text(exc, run_dir)}",
                          "free space on that disk, or choose another run directory") from None


def _saved_weights(path: Path) -> Tuple[Path, Optional[Checkpoint], Optional[Path]]:
    """(spec file, checkpoint or None, run directory or None) for a run or checkpoint directory."""
    if (path / "config.yaml").is_file():
        if (path / "model.safetensors").is_file():
            return path / "config.yaml", None, path
        found = newest_valid(path / "checkpoints")
        if found is None:
            raise ConfigError(None, f"{path} has neither model.safetensors nor a complete checkpoint")
        return found.path / "spec.yaml", found, path
    if (path / "spec.yaml").is_file() or (path / "state.pt").is_file():
        ckpt = read_checkpoint(path)
        run_dir = path.resolve().parent.parent
        return path / "spec.yaml", ckpt, run_dir if (run_dir / "config.yaml").is_file() else None
    raise ConfigError(None, f"{path} is neither a run directory (with config.yaml) nor a checkpoint directory",
                      "pass outputs/DATE/TIME or outputs/DATE/TIME/checkpoints/best")


def load_saved_run(path: Path, overrides: Sequence[str], base_dir: str, split: str = "val"
                   ) -> Tuple[Run, Path, Optional[Checkpoint], Optional[Path]]:
    """(run built from the saved spec with the saved weights loaded, the weights' path, the checkpoint or
    None, the run directory or None) for a run directory, a checkpoint directory or an export. A run's
    `data_encoding.json` becomes its `data.encoding` (unless overridden). ``split="test"``: the spec must
    have a test split (checked before anything is built)."""
    from trainctl.export import is_export, load_exported

    if is_export(path):
        return load_exported(path, list(overrides), base_dir), path, None, None
    try:
        spec_file, ckpt, run_dir = _saved_weights(path)
    except CheckpointError as exc:
        raise ConfigError(None, str(exc)) from None
    spec = load_saved_spec(spec_file, overrides, base_dir, text=ckpt.spec_yaml if ckpt is not None else None)
    if split == "test":
        check_test_split(spec.data)
    _use_saved_encoding(spec, run_dir)
    run = build_run(spec, base_dir=base_dir)
    weights = ckpt.weights if ckpt is not None else path / "model.safetensors"
    try:
        if ckpt is not None and ckpt.sharded:  # an FSDP checkpoint: the shards, gathered in this process
            from trainctl.sharding import load_sharded_weights

            weights = ckpt.path
            load_sharded_weights(run.model, ckpt.path)
        else:
            load_weights(run.model, weights)
    except CheckpointError as exc:
        raise ConfigError(None, str(exc)) from None
    if ckpt is not None:  # averaging.use_for_eval: the checkpoint's averaged weights (a run's own are final)
        from trainctl.averaging import use_averaged

        use_averaged(run, ckpt.state)
    if ckpt is not None and run.optimizer_has_modes and not ckpt.sharded:  # schedule-free: the averaged weights
        from trainctl.optim import load_optimizer_state

        try:
            load_optimizer_state(run.optimizer, run.scheduler, ckpt.state["optimizer"], ckpt.state["scheduler"])
        except Exception as exc:  # an optimizer state that does not fit this model
            raise ConfigError(None, f"{ckpt.path} does not fit its model: {type(exc).__name__}: {exc}") from None
        run.optimizer.eval()
    return run, weights, ckpt, run_dir


def _use_saved_encoding(spec: RunSpec, run_dir: Optional[Path]) -> None:
    """`data=csv`: apply the encoding the run was trained with (RUN_DIR/data_encoding.json) to whatever file
    it is evaluated on, unless `data.encoding` is overridden. Runs from before the file existed refit it on
    the same train split, which gives the same encoding for the same file."""
    if run_dir is None or not hasattr(spec.data, "encoding") or spec.data.encoding is not None:
        return
    saved = run_dir / ENCODING_FILE
    if saved.is_file():
        spec.data.encoding = str(saved.resolve())


def evaluate_saved(path: Path, overrides: Sequence[str], base_dir: str, split: str = "val") -> Dict[str, Any]:
    """Evaluate a run's final weights, a checkpoint's or an export's on the validation split of its data, or
    on its test split (`data=csv` with `data.test_fraction` or `data.test_path`)."""
    run, weights, ckpt, run_dir = load_saved_run(path, overrides, base_dir, split)
    spec = run.spec
    batches, samples = (run.data.val, run.data.info.n_val) if split == "val" else _test_batches(run)
    metrics = run.evaluator(run.model, batches, run.precision.autocast)
    if split != "val":  # the evaluator names its metrics val/...
        metrics = {f"{split}/{k[4:]}" if k.startswith("val/") else k: v for k, v in metrics.items()}
    result = {"weights": str(weights.resolve()), "step": ckpt.step if ckpt else None,
              "data": spec.data.name, "split": split, "samples": samples}
    if split == "val":
        result["val_samples"] = samples
    return {**result, "metrics": metrics, "run_dir": str(run_dir) if run_dir else None}


def _test_batches(run: Run) -> Tuple[Any, int]:
    """The test split's batches, encoded as in training. Read only here: training never loads it."""
    from trainctl.arrays import Arrays
    from trainctl.batches import build_batches
    from trainctl.tables import load_test

    check_test_split(run.spec.data)
    x, y = load_test(run.spec.data)
    arrays = Arrays(run.data.info, x, y, x, y)
    return build_batches(run.spec.data, arrays, run.device).val, len(y)
