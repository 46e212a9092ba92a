"""The `trainctl` command: `run` (a Hydra app), `show`, `recipes`.

Only the standard library and rich are imported up front, so `trainctl --help` answers at once;
Hydra is imported by the commands that compose configs, torch only by those that build a model.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

from trainctl import __version__
from trainctl.errors import EXIT_CONFIG, EXIT_INTERRUPTED, ConfigError, suggestion

USAGE = f"""trainctl {__version__}: a config-driven PyTorch training CLI

usage: trainctl COMMAND [ARGS...]

commands:
  run [OVERRIDES...]     train: `trainctl run optimizer=adamw scheduler=warmup_cosine`
                         (a Hydra app: -m/--multirun sweeps, --cfg job, --info, --help, hydra.run.dir=...)
  show [OVERRIDES...]    print the resolved run spec and the plan (parameters, batch, steps) without training
  recipes                list the curated experiments (`trainctl run +recipe=NAME`)

options:
  -h, --help             this help; `trainctl run --help` lists the config groups and their options
  --version              print the version

Exit codes: 0 finished, 1 failed or diverged, 2 bad command line or config, 130 interrupted.
Set TRAINCTL_DEBUG=1 (or HYDRA_FULL_ERROR=1) to see tracebacks.
"""

COMMANDS = ("run", "show", "recipes")


def _debug() -> bool:
    return any(os.environ.get(v) == "1" for v in ("TRAINCTL_DEBUG", "HYDRA_FULL_ERROR"))


def cmd_run(argv: Sequence[str]) -> None:
    from trainctl import config

    args = config.hydra_args(argv)
    if not (args.help or args.hydra_help or args.info or args.shell_completion or args.config_dir
            or args.config_path or args.experimental_rerun):
        config.preflight(args.overrides, args.multirun, os.getcwd(), args.config_name or config.CONFIG_NAME)
    config.run_hydra(argv)


def cmd_show(argv: Sequence[str]) -> None:
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.table import Table

    from trainctl import config
    from trainctl.spec import spec_yaml

    if any(a in ("-h", "--help") for a in argv):
        print("usage: trainctl show [OVERRIDES...]\n\nPrint the resolved run spec and the plan without training.")
        return
    _, spec = config.compose_spec(argv, os.getcwd())
    console = Console()
    console.print(Syntax(spec_yaml(spec), "yaml", theme="ansi_dark", background_color="default"))
    from trainctl.build import build_run, plan

    table = Table(title="plan", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in plan(build_run(spec, base_dir=os.getcwd())).items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)


def cmd_recipes(argv: Sequence[str]) -> None:
    from trainctl.spec import recipe_headers

    for name, header in recipe_headers().items():
        print(f"{name}\n" + "\n".join(f"    {line}" for line in header.splitlines()) + "\n")


def main(argv: Optional[List[str]] = None) -> None:
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
        {"run": cmd_run, "show": cmd_show, "recipes": cmd_recipes}[command](rest)
    except ConfigError as error:
        if _debug():
            raise
        from trainctl.config import report_config_error

        report_config_error(error)
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt:
        print("trainctl: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
