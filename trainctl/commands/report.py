"""`trainctl report PATH...`: compare runs (a sweep, run directories or a glob) in one table sorted by
the optimized metric, and write report.md and PNG plots next to them. Reads files only: no torch, no
Hydra."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from trainctl.errors import ConfigError


def main(argv: Sequence[str]) -> None:
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
