"""How a run answers SIGINT and SIGTERM: it stops at the next step boundary (under DDP/FSDP at the next
one all ranks agree on) and saves a checkpoint; a second SIGINT stops at once."""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger("trainctl")


@contextmanager
def stop_on_signals(runner: Any) -> Iterator[None]:
    """SIGINT/SIGTERM stop ``runner`` (a :class:`trainctl.runner.Runner`) at the next step boundary; a
    second SIGINT stops at once. The handlers are those of the main thread only, restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if runner.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        runner.signal = runner.signal or signum
        # Only noted here: the runner turns it into a stop at a step boundary, before it decides on that
        # boundary's evaluation and checkpoint, so a signal arriving at any moment stops with a checkpoint.
        runner._stop_pending = runner._stop_pending or "interrupted"
        if runner.run.dist is not None:
            log.warning("%s received: every process stops at the next log step or epoch end and a "
                        "checkpoint is saved (press Ctrl-C again to stop now)", signal.Signals(signum).name)
            return
        log.warning("%s received: stopping after the current step and saving a checkpoint "
                    "(press Ctrl-C again to stop now)", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
