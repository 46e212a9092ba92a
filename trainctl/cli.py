"""The `trainctl` command: `run` (a Hydra app), `resume`, `eval`, `show`, `recipes`, `report`.

Only the standard library and rich are imported up front, so `trainctl --help` answers at once;
Hydra is imported by the commands that compose configs, torch only by those that build a model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from trainctl import __version__
from trainctl.errors import EXIT_CONFIG, EXIT_INTERRUPTED, ConfigError, suggestion

USAGE = f"""trainctl {__version__}: a config-driven PyTorch training CLI

usage: trainctl COMMAND [ARGS...]

commands:
  run [OVERRIDES...]     train: `trainctl run optimizer=adamw scheduler=warmup_cosine`
                         (a Hydra app: -m/--multirun sweeps, --cfg job, --info, --help, hydra.run.dir=...)
  resume RUN_DIR [KEY=VALUE...]
                         continue a run from its newest intact checkpoint (exactly, when nothing changed)
  eval PATH [KEY=VALUE...] [--json] [-o FILE]
                         evaluate a run's final weights (PATH = run directory) or a checkpoint's
                         (PATH = RUN_DIR/checkpoints/best, .../last, .../step-N) on the validation split
  show [OVERRIDES...]    print the resolved run spec and the plan (parameters, batch, steps) without training
  recipes                list the curated experiments (`trainctl run +recipe=NAME`)
  report PATH... [--format table|json] [-o DIR] [--metric M] [--no-plots]
                         compare the runs of a sweep (or run directories, or a glob) in one table,
                         sorted by the optimized metric; writes report.md and PNG plots

options:
  -h, --help             this help; `trainctl run --help` lists the config groups and their options
  --version              print the version

Exit codes: 0 finished (also early-stopped), 1 failed, diverged or checkpoint failure,
2 bad command line, config or checkpoint, 130 interrupted by Ctrl-C (SIGINT), 143 by SIGTERM.
Set TRAINCTL_DEBUG=1 (or HYDRA_FULL_ERROR=1) to see tracebacks.
"""

COMMANDS = ("run", "resume", "eval", "show", "recipes", "report")


def _debug() -> bool:
    return any(os.environ.get(v) == "1" for v in ("TRAINCTL_DEBUG", "HYDRA_FULL_ERROR"))


def _collect_garbage_after_start_up() -> None:
    """Start-up (torch, Hydra, building the run) creates ~600k long-lived objects that the cyclic
    garbage collector would scan again and again: about half a second. It stays off until training
    starts, when `job.train` freezes what start-up built and switches it back on."""
    import gc

    gc.disable()


def cmd_run(argv: Sequence[str]) -> None:
    from trainctl import config, parallel

    parallel.follow_launcher()  # a rank under torchrun ends with its agent

    args = config.hydra_args(argv)
    if not (args.help or args.hydra_help or args.info or args.shell_completion or args.config_path
            or args.experimental_rerun):
        overrides = list(args.overrides)
        if args.config_dir:  # the user's own config directory joins the search path, as Hydra does
            overrides.append(f"hydra.searchpath=[file://{os.path.abspath(args.config_dir)}]")
        elif not (args.multirun or args.cfg or args.run):
            _collect_garbage_after_start_up()
            config.run_single(overrides, os.getcwd(), args.config_name or config.CONFIG_NAME)
            return
        config.preflight(overrides, args.multirun, os.getcwd(), args.config_name or config.CONFIG_NAME)
    config.run_hydra(argv)


def _log_to_file(path: Path) -> None:
    """The run's log file, as `trainctl run` configures it through Hydra (appended to)."""
    import logging

    handler = logging.FileHandler(path, mode="a", delay=True)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def cmd_resume(argv: Sequence[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: trainctl resume RUN_DIR [KEY=VALUE...]\n\nContinue a run in place from its newest intact "
              "checkpoint (older ones are tried if it is damaged; with none, it starts over in place).\nOverrides may change the length, evaluation, "
              "logging and optimizer settings; changes to the model or data are refused.")
        sys.exit(0 if argv else EXIT_CONFIG)
    from trainctl.errors import exit_code
    from trainctl.resume import load_saved_spec

    run_dir = Path(argv[0]).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(None, f"{run_dir} is not a trainctl run directory (it has no config.yaml)",
                          "pass the directory `trainctl run` printed, e.g. outputs/2026-01-31/12-00-00")
    from trainctl import rundir

    rundir.acquire(run_dir, None)  # before anything is written; refused while another process runs there
    _collect_garbage_after_start_up()
    spec = load_saved_spec(run_dir / "config.yaml", argv[1:], os.getcwd())
    spec.checkpoint.resume = "auto"
    _log_to_file(run_dir / "trainctl.log")
    from trainctl.job import train

    summary = train(spec, run_dir, os.getcwd())
    code = exit_code(summary)
    if code:
        sys.exit(code)


def cmd_eval(argv: Sequence[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="trainctl eval", description="Evaluate saved weights on the "
                                     "validation split of the run's data (overrides such as data.path=... or "
                                     "trainer.device=cpu apply).")
    parser.add_argument("path", help="a run directory or a checkpoint directory")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE changes to the saved spec")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("-o", "--output", help="write the result here (default: eval.json in the run "
                        "directory, or eval-<checkpoint>.json for a checkpoint)")
    args = parser.parse_args(argv)
    from trainctl.job import evaluate_saved

    path = Path(args.path)
    result = evaluate_saved(path, args.overrides, os.getcwd())
    output = Path(args.output) if args.output else None
    if output is None and result["run_dir"]:
        name = "eval.json" if result["step"] is None else f"eval-{path.absolute().name}.json"
        output = Path(result["run_dir"]) / name
    if output is not None:
        result["output"] = str(output)
    _print_eval(result, args.json)  # first: the metrics are not lost if the file cannot be written
    if output is not None:
        _write_eval(result, output, in_run_dir=not args.output)


def _print_eval(result: dict, as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps(result, indent=2), flush=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"trainctl eval: {result['weights']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("data", f"{result['data']} ({result['val_samples']} validation samples)")
    if result["step"] is not None:
        table.add_row("step", str(result["step"]))
    for key, value in result["metrics"].items():
        table.add_row(key, f"{value:.4f}")
    if result.get("output"):
        table.add_row("written to", result["output"])
    Console().print(table)


def _write_eval(result: dict, output: Path, in_run_dir: bool) -> None:
    """Write the result; into a run directory only while no other process owns it."""
    from trainctl import rundir
    from trainctl.files import write_json

    try:
        if in_run_dir:
            with rundir.owning(output.parent, None):
                write_json(output, result)
        else:
            write_json(output, result)
    except rundir.RunDirBusy as busy:
        print(f"trainctl: note: the result was not written to {output}: {busy.message}\n"
              "  fix: pass -o FILE to save it elsewhere", file=sys.stderr)
    except ConfigError as exc:  # the run directory cannot be written (read-only, permissions)
        raise ConfigError(None, f"{exc.message} (the metrics are printed above)",
                          "pass -o FILE to write the result somewhere you can write to") from None
    except OSError as exc:
        raise ConfigError(None, f"could not write {output}: {exc.strerror or exc} (the metrics are printed above)",
                          "pass -o FILE to write the result somewhere you can write to") from None


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


def cmd_report(argv: Sequence[str]) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="trainctl report", description="Compare runs: a sweep directory "
                                     "(`trainctl run -m` prints it), run directories or a glob such as "
                                     "'outputs/2026-*/*'. One row per run, sorted by the optimized metric, the best "
                                     "highlighted; report.md and PNG plots are written next to the runs. A single "
                                     "run gets its summary and curves; runs still in progress are included.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="sweep directory, run directory or glob")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="table (default) or json")
    parser.add_argument("-o", "--output", help="where report.md and the plots go (default: the directory "
                        "given, or the directory that holds all the runs)")
    parser.add_argument("--metric", help="sort by this instead of the runs' optimized_metric, e.g. val/loss "
                        "or final:val/acc")
    parser.add_argument("--no-plots", action="store_true", help="write report.md only")
    args = parser.parse_args(argv)
    from trainctl import report as reporting

    dirs = reporting.find_runs(args.paths)
    report = reporting.build_report(dirs, args.metric)
    given = Path(args.paths[0])
    out_dir = Path(args.output) if args.output else given if len(args.paths) == 1 and given.is_dir() else report.root
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        files, note = reporting.write_report(report, out_dir, plots=not args.no_plots)
    except OSError as exc:
        raise ConfigError(None, f"cannot write the report into {out_dir}: {exc.strerror or exc}",
                          "choose a directory you can write to with -o DIR") from None
    if args.format == "json":
        print(json.dumps(reporting.to_json(report, files, note), indent=2))
    else:
        reporting.print_table(report, files, note)


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
        {"run": cmd_run, "resume": cmd_resume, "eval": cmd_eval, "show": cmd_show,
         "recipes": cmd_recipes, "report": cmd_report}[command](rest)
    except ConfigError as error:
        if _debug():
            raise
        from trainctl.config import report_config_error

        report_config_error(error)
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt:
        print("trainctl: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
