"""`trainctl eval PATH [KEY=VALUE...] [--split val|test] [--json] [-o FILE]`: evaluate a run's final
weights or a checkpoint's on the validation split (or the test split of `data=csv`); print the result
first, then write it (into the run directory only while no other process owns it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from trainctl.errors import ConfigError


def main(argv: Sequence[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="trainctl eval", description="Evaluate saved weights on the "
                                     "validation split of the run's data, or its test split (overrides such as "
                                     "data.path=... or trainer.device=cpu apply).")
    parser.add_argument("path", help="a run directory or a checkpoint directory")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE changes to the saved spec")
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="the validation split (default) or the test split: data=csv with data.test_fraction, "
                        "or data.test_path (which may be given here as an override)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("-o", "--output", help="write the result here (default: eval.json in the run "
                        "directory, or eval-<checkpoint>.json for a checkpoint; eval-test... for the test split)")
    args = parser.parse_intermixed_args(argv)  # options may come before, between or after the overrides
    from trainctl.job import evaluate_saved

    path = Path(args.path)
    result = evaluate_saved(path, args.overrides, os.getcwd(), args.split)
    output = Path(args.output) if args.output else None
    if output is None and result["run_dir"]:
        prefix = "eval" if args.split == "val" else f"eval-{args.split}"
        name = f"{prefix}.json" if result["step"] is None else f"{prefix}-{path.absolute().name}.json"
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
    split = "validation" if result["split"] == "val" else result["split"]
    table.add_row("data", f"{result['data']} ({result['samples']} {split} samples)")
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
