"""The `trainctl` command: a table from command name to the module that implements it
(:mod:`trainctl.commands`), and the one place that turns a ConfigError into a message and exit code 2.

Only the standard library is imported up front, so `trainctl --help` answers at once; each command
imports what it needs.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import List, Optional

from trainctl import __version__
from trainctl.errors import EXIT_CONFIG, EXIT_INTERRUPTED, ConfigError, suggestion

COMMANDS = {
    "run": "trainctl.commands.run",
    "resume": "trainctl.commands.resume",
    "eval": "trainctl.commands.eval",
    "export": "trainctl.commands.export",
    "merge": "trainctl.commands.merge",
    "show": "trainctl.commands.show",
    "recipes": "trainctl.commands.recipes",
    "report": "trainctl.commands.report",
    "prepare-tokens": "trainctl.commands.prepare_tokens",
    "lr-find": "trainctl.commands.lr_find",
    "probe": "trainctl.commands.probe",
    "tune": "trainctl.commands.tune",
}

USAGE = f"""trainctl {__version__}: a config-driven PyTorch training CLI

usage: trainctl COMMAND [ARGS...]

commands:
  run [OVERRIDES...]     train: `trainctl run optimizer=adamw scheduler=warmup_cosine`
                         (a Hydra app: -m/--multirun sweeps, --cfg job, --info, --help, hydra.run.dir=...)
  resume RUN_DIR [KEY=VALUE...]
                         continue a run from its newest intact checkpoint (exactly, when nothing changed)
  eval PATH [KEY=VALUE...] [--split val|test] [--json] [-o FILE]
                         evaluate a run's final weights (PATH = run directory) or a checkpoint's
                         (PATH = RUN_DIR/checkpoints/best, .../last, .../step-N) on the validation split
  export PATH [-o DIR] [--merge]
                         a run's weights for other tools: the adapter in the PEFT layout, with --merge
                         the adapters merged into the base (model.safetensors / save_pretrained)
  merge RUN_DIR... --method METHOD -o OUT [--t T] [--base RUN_DIR] [--weights W,...] [--density D]
                         combine runs of one model (average | greedy_soup | slerp | task_arithmetic | ties |
                         dare | dare_ties | magnitude_prune); evaluates every input and the result
  show [OVERRIDES...]    print the resolved run spec and the plan (parameters, batch, steps) without training
  recipes                list the curated experiments (`trainctl run +recipe=NAME`)
  report PATH... [--format table|json] [-o DIR] [--metric M] [--no-plots]
                         compare the runs of a sweep (or run directories, or a glob) in one table,
                         sorted by the optimized metric; writes report.md and PNG plots
  prepare-tokens INPUT -o DIR [--tokenizer DIR | --tiktoken NAME] [--val-fraction F] [--field F]
                         tokenise a text or .jsonl file into DIR/train.bin, val.bin and meta.json
                         for `trainctl run data=tokens data.path=DIR` (byte-level without a tokenizer)
  probe [OVERRIDES...] [--steps K] [--accum A] [--warmup-steps N] [--memory-limit-mib M]
                         the largest per-device batch that fits and the gradient noise scale; prints
                         the data.batch_size and trainer.grad_accum_steps to use
  lr-find [OVERRIDES...] [--start-lr 1e-7] [--end-lr 10] [--steps 100] [-o DIR]
                         learning-rate range test on the run's own training step: prints the suggested
                         optimizer.lr=..., writes lr_find.png and lr_find.json (no run directory)
  tune --space FILE [OVERRIDES...] [-o ROOT] [--n-trials N]
                         Optuna study with pruning: each trial a run in ROOT/trial-NNNN, the study in
                         ROOT/study.db (run it again to continue; several processes may share it)

options:
  -h, --help             this help; `trainctl run --help` lists the config groups and their options
  --version              print the version

Exit codes: 0 finished (also early-stopped), 1 failed, diverged or checkpoint failure,
2 bad command line, config, checkpoint or run directory, 130 interrupted by Ctrl-C (SIGINT), 143 by SIGTERM.
Set TRAINCTL_DEBUG=1 (or HYDRA_FULL_ERROR=1) to see tracebacks.
"""


def _debug() -> bool:
    return any(os.environ.get(v) == "1" for v in ("TRAINCTL_DEBUG", "HYDRA_FULL_ERROR"))


def main(argv: Optional[List[str]] = None) -> None:
    import logging

    # A log handler that cannot write (a full disk) must not print a traceback into the console; trainctl
    # reports failed writes itself.
    logging.raiseExceptions = False
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else EXIT_CONFIG)
    if argv[0] == "--version":
        print(f"trainctl {__version__}")
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"trainctl: error: unknown command '{command}'.{suggestion(command, COMMANDS)} "
              f"Commands: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    try:
        importlib.import_module(COMMANDS[command]).main(rest)
    except ConfigError as error:
        if _debug():
            raise
        from trainctl.config import report_config_error

        report_config_error(error)
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt:
        print("trainctl: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # the reader of the output went away (`trainctl recipes | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
