"""`trainctl resume RUN_DIR [KEY=VALUE...]`: continue a run in place from its newest intact checkpoint,
owning the directory for as long as it trains."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Sequence

from trainctl.errors import EXIT_CONFIG, ConfigError, exit_code

USAGE = ("usage: trainctl resume RUN_DIR [KEY=VALUE...]\n\nContinue a run in place from its newest intact "
         "checkpoint (older ones are tried if it is damaged; with none, it starts over in place).\nOverrides may "
         "change the length, evaluation, logging and optimizer settings; changes to the model or data are refused.")


def main(argv: Sequence[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else EXIT_CONFIG)
    from trainctl import rundir
    from trainctl.resume import load_saved_spec

    run_dir = Path(argv[0]).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(None, f"{run_dir} is not a trainctl run directory (it has no config.yaml)",
                          "pass the directory `trainctl run` printed, e.g. outputs/2026-01-31/12-00-00")
    rundir.acquire(run_dir, None)  # before anything is written; refused while another process runs there
    gc.disable()  # start-up builds ~600k long-lived objects; job.train freezes them and re-enables
    spec = load_saved_spec(run_dir / "config.yaml", [*argv[1:], "checkpoint.resume=auto"], os.getcwd())
    _log_to_file(run_dir / "trainctl.log")
    from trainctl.job import train

    code = exit_code(train(spec, run_dir, os.getcwd()))
    if code:
        sys.exit(code)


def _log_to_file(path: Path) -> None:
    """The run's log file, as `trainctl run` configures it through Hydra (appended to)."""
    import logging

    handler = logging.FileHandler(path, mode="a", delay=True)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
