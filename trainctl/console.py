"""What the user sees while a run trains: a live progress bar on a terminal, plain periodic lines
otherwise (also written to the run's log file), and a summary table at the end."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Dict, Optional

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

log = logging.getLogger("trainctl")
progress_log = logging.getLogger("trainctl.progress")
"""Periodic progress lines: always in the log file; on the console only when there is no live bar."""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def _speed(latest: Dict[str, float]) -> str:
    """The throughput readings of the progress line: samples (or tokens)/s, step time, data wait, memory, MFU."""
    if "train/samples_per_second" not in latest:
        return ""
    text = (f"  {latest['train/tokens_per_second']:,.0f} tokens/s" if "train/tokens_per_second" in latest
            else f"  {latest['train/samples_per_second']:,.0f} samples/s")
    text += f"  {latest['train/step_seconds'] * 1e3:.1f} ms/step  data {latest['train/data_wait']:.0%}"
    if "train/peak_memory_mib" in latest:
        text += f"  mem {latest['train/peak_memory_mib']:,.0f} MiB"
    if "train/mfu" in latest:
        text += f"  MFU {latest['train/mfu']:.1%}"
    return text


def _throughput_row(summary: Dict[str, Any]) -> str:
    parts = [f"{summary['samples_per_second']:,.0f} samples/s"]
    if summary.get("tokens_per_second") is not None:
        parts.append(f"{summary['tokens_per_second']:,.0f} tokens/s")
    if summary.get("step_seconds") is not None:
        parts.append(f"{summary['step_seconds'] * 1e3:.1f} ms/step")
    if summary.get("data_wait_share") is not None:
        parts.append(f"data wait {summary['data_wait_share']:.0%}")
    if summary.get("mfu") is not None:
        parts.append(f"MFU {summary['mfu']:.1%}")
    return ", ".join(parts)


class _TwoLineProgress(Progress):
    """The bar on one line, the latest readings on the next, so neither is squeezed."""

    info = ""

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        yield Text(self.info, overflow="ellipsis", no_wrap=True)


class _DropProgress(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(progress_log.name)


class Display:
    """Progress for one run; ``mode`` is auto, bar, plain or none (`logging.progress`).

    Plain lines come after every evaluation and at least every ``line_seconds`` in between.
    """

    def __init__(self, mode: str, total_steps: int, total_epochs: int, line_seconds: float = 10.0,
                 attach_log: bool = True) -> None:
        self.console = Console()
        interactive = self.console.is_terminal and not self.console.is_dumb_terminal
        self.mode = ("bar" if interactive else "plain") if mode == "auto" else mode
        self.total_steps = total_steps
        self.total_epochs = total_epochs
        self.line_seconds = line_seconds
        self._last_line = time.monotonic()
        self.latest: Dict[str, float] = {}
        self._bar: Optional[Progress] = None
        self._task: Any = None
        self._handler = self._console_handler() if attach_log else None
        if self._handler is not None:
            log.addHandler(self._handler)

    def _console_handler(self) -> logging.Handler:
        if self.mode == "bar":
            handler: logging.Handler = RichHandler(console=self.console, show_time=False, show_path=False,
                                                   show_level=False, markup=False)
            handler.addFilter(_DropProgress())
        else:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            if self.mode == "none":
                handler.addFilter(_DropProgress())
        handler.setLevel(logging.INFO)
        return handler

    def start(self, epoch: int, step: int) -> None:
        if self.mode != "bar":
            return
        self._bar = _TwoLineProgress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False)
        self._task = self._bar.add_task("train", total=self.total_steps, completed=step, epoch=self._epoch(epoch))
        self._bar.start()

    def _epoch(self, epoch: int) -> str:
        return f"{min(epoch + 1, self.total_epochs)}/{self.total_epochs}"

    def step(self, step: int, epoch: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, epoch=self._epoch(epoch))

    def report(self, step: int, epoch: int, values: Dict[str, float]) -> None:
        """New readings (training or validation): refresh the bar, or print a line when one is due."""
        self.latest.update(values)
        shown = {k: v for k, v in self.latest.items()
                 if k in ("train/loss", "train/acc", "train/penalty", "lr") or k.startswith("val/")}
        text = "  ".join(f"{k} {_fmt(v)}" for k, v in shown.items())
        text += _speed(self.latest)
        if self._bar is not None:
            self._bar.info = text
        now = time.monotonic()
        evaluated = any(k.startswith("val/") for k in values)
        if evaluated or now - self._last_line >= self.line_seconds:
            self._last_line = now
            progress_log.info("epoch %s  step %d/%d  %s", self._epoch(epoch - evaluated), step,
                              self.total_steps, text)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._handler is not None:
            log.removeHandler(self._handler)

    def summary(self, summary: Dict[str, Any]) -> None:
        table = Table(title=f"trainctl run: {summary['stop_reason']}", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        rows = [("run directory", summary.get("run_dir", "")),
                (f"best {summary['monitor']}", f"{_fmt(summary['best_metric'])} (step {summary['best_step']})"
                 if summary.get("best_metric") is not None else "-")]
        rows += [(k, _fmt(v)) for k, v in summary["final"].items()]
        rows += [("steps", f"{summary['steps']} ({summary['epochs_completed']} epochs)"),
                 ("wall time", f"{summary['wall_seconds']:.1f} s"),
                 ("throughput", _throughput_row(summary))]
        if summary.get("peak_memory_mib") is not None:
            rows.append(("peak memory", f"{summary['peak_memory_mib']:,.0f} MiB"))
        if summary.get("compile_seconds") is not None:
            rows.append(("compile time", f"{summary['compile_seconds']:.1f} s (not in the throughput)"))
        if summary.get("skipped_steps"):
            rows.append(("skipped steps", summary["skipped_steps"]))
        if summary.get("last_checkpoint"):
            rows.append(("last checkpoint", summary["last_checkpoint"]))
        if summary.get("checkpoint_error"):
            rows.append(("checkpoint error", summary["checkpoint_error"]))
        if summary["stop_reason"] == "interrupted" and summary.get("last_checkpoint"):
            world = summary.get("world_size", 1)
            rows.append(("continue with", f"trainctl resume {summary.get('run_dir', '')}" if world == 1 else
                         f"the same command with checkpoint.resume=auto hydra.run.dir={summary.get('run_dir', '')} "
                         f"({world} processes)"))
        for key, value in rows:
            table.add_row(key, str(value))
        self.console.print(table)
