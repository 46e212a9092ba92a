"""`trainctl export PATH [-o DIR] [--merge] [--json]`: a run's trained weights in the layouts other tools
load (see :mod:`trainctl.export`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from trainctl.errors import ConfigError


def main(argv: Sequence[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="trainctl export", description="Export a run's weights: the adapter in the PEFT layout "
        "(adapter_config.json + adapter_model.safetensors), with --merge the weights with the adapters merged "
        "in, or a run without adapters' whole weights (model.safetensors; save_pretrained for model=hf).")
    parser.add_argument("path", help="a run directory or a checkpoint directory (e.g. RUN_DIR/checkpoints/best)")
    parser.add_argument("-o", "--output", help="a new directory to write (default: RUN_DIR/export, or "
                        "RUN_DIR/export-merged with --merge)")
    parser.add_argument("--merge", action="store_true", help="merge the adapters into the base weights")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    from trainctl.export import export_run
    from trainctl.job import load_saved_run

    path = Path(args.path)
    run, weights, ckpt, run_dir = load_saved_run(path, [], os.getcwd())
    output = Path(args.output) if args.output else None
    step = ckpt.step if ckpt is not None else None
    if output is None and run_dir is not None:  # into the run directory: only while no other process owns it
        from trainctl import rundir

        try:
            with rundir.owning(Path(run_dir), None):
                result = export_run(run, weights, step, run_dir, path, None, args.merge)
        except rundir.RunDirBusy as busy:
            raise ConfigError(None, f"not exported into {run_dir}: {busy.message}",
                              "pass -o DIR to export elsewhere") from None
    else:
        result = export_run(run, weights, step, run_dir, path, output, args.merge)
    if args.json:
        import json

        print(json.dumps(result, indent=2), flush=True)
        return
    print(f"exported {result['kind']} ({result['peft']} run, {result['bytes']:,} bytes) to {result['output']}:\n  "
          + "\n  ".join(result["files"]), flush=True)
