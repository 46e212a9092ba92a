"""The run's metrics writer: one JSON object per record in `metrics.jsonl`, mirrored to TensorBoard (the
scalars, and the weight and gradient histograms of :mod:`trainctl.histograms`) and to MLflow
(:mod:`trainctl.mlflow_log`); and reading `metrics.jsonl` back.

Importing this module imports neither torch, TensorBoard nor MLflow: each is set up at the first record.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional


class MetricsWriter:
    """Appends one JSON object per event to `metrics.jsonl` and mirrors its values to TensorBoard and MLflow.

    A write that fails (a full disk, a file system gone read-only, an MLflow store that refuses) is not
    raised into the training loop: the writer stops writing, keeps the reason in :attr:`error`, and the
    runner decides what the run does about it (`checkpoint.on_error`).
    """

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: Optional[int] = None,
                 mlflow: Any = None) -> None:
        """With ``resume_step``, records after that step (written by a session that was then killed)
        are dropped from `metrics.jsonl` and TensorBoard, so no step appears twice (MLflow, which cannot
        drop them, skips the steps it holds). ``mlflow``: a :class:`trainctl.mlflow_log.MlflowTracking`."""
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        self.file: Any = open(self.path, "a", encoding="utf-8")
        self.tb_dir = run_dir / "tb" if tensorboard else None
        self.purge_step = resume_step + 1 if resume_step is not None else None
        self._tb: Any = None
        self.error: Optional[str] = None
        """Why writing stopped (None while it works)."""
        self.setup_seconds = 0.0
        """Seconds spent setting up TensorBoard and MLflow at the first record (kept out of training time)."""
        self.mlflow = mlflow
        if mlflow is not None:
            mlflow.continuing = resume_step is not None
        self.histograms: List[Any] = []
        """Histograms taken since the last record (:mod:`trainctl.histograms`), written with the next one."""

    def write(self, step: int, epoch: int, values: Dict[str, float]) -> None:
        if self.error is not None:
            return
        record = {"step": step, "epoch": epoch, **{k: _finite_or_str(v) for k, v in values.items()}}
        target = self.path
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.tb_dir is not None:
                target = self.tb_dir
                tb = self._tensorboard()
                for key, value in values.items():
                    tb.add_scalar(key, value, step)
                self._write_histograms()
            if self.mlflow is not None:
                target = self.mlflow.where
                self.setup_seconds += self.mlflow.log(step, values)
        except Exception as exc:  # OSError, TensorBoard's writer thread re-raising one, MLflow's errors
            self._failed(target, exc)

    def _tensorboard(self) -> Any:
        if self._tb is None:  # importing tensorboard takes ~1 s: at the first log, not before the first step
            tic = time.perf_counter()
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_threads()
            self._tb = SummaryWriter(log_dir=str(self.tb_dir), purge_step=self.purge_step)
            self.setup_seconds += time.perf_counter() - tic
        return self._tb

    def _write_histograms(self) -> None:
        if self.histograms:
            from trainctl.histograms import write_histograms

            pending, self.histograms = self.histograms, []
            write_histograms(self._tensorboard(), pending)

    def _failed(self, target: Any, exc: BaseException) -> None:
        from trainctl.files import failure_text

        self.error = f"could not write {target}: {failure_text(exc, self.path.parent)}"
        self.close()

    def take_setup_seconds(self) -> float:
        """The setup seconds since the last call."""
        seconds, self.setup_seconds = self.setup_seconds, 0.0
        return seconds

    def close(self) -> None:
        if self.error is None and self.histograms and self.tb_dir is not None:  # taken after the last record
            try:
                self._write_histograms()
            except Exception as exc:
                self._failed(self.tb_dir, exc)
                return
        self.histograms = []
        for closer in (self.file.close, self._tb.close if self._tb is not None else None):
            if closer is None:
                continue
            try:
                closer()
            except Exception as exc:  # flushing the last records can fail the same way
                from trainctl.files import failure_text

                self.error = self.error or f"could not write {self.path.parent}: {failure_text(exc, self.path.parent)}"
        self._tb = None


def _quiet_tensorboard_threads() -> None:
    """TensorBoard writes from a thread of its own; a failed write (a full disk) ends that thread with a
    traceback on stderr before the writer re-raises it to the caller, which reports it. Keep the
    thread's traceback off the console; exceptions of every other thread still print."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "_trainctl", False):
        return

    def hook(args: Any) -> None:
        if not type(args.thread).__module__.startswith("tensorboard."):
            previous(args)
    hook._trainctl = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _finite_or_str(value: float) -> Any:
    return value if math.isfinite(value) else str(value)


def read_metrics(path: Path) -> list:
    """The records of a `metrics.jsonl`, read line by line; a line cut short by a crash is ignored, and a
    path that is not a regular file holds none."""
    import os
    import stat

    records: list = []
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return records
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except OSError:
        pass
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records up to ``step`` (atomically)."""
    from trainctl.files import write_text

    if path.exists():
        kept = [r for r in read_metrics(path) if isinstance(r.get("step", 0), int) and r.get("step", 0) <= step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
