"""`trainctl lr-find [OVERRIDES] [--start-lr 1e-7] [--end-lr 10] [--steps 100] [--smooth 0.05]
[--diverge 4] [-o DIR]`: the learning-rate range test (:mod:`trainctl.lr_find`) on the run that
`trainctl run OVERRIDES` would train. It prints the suggested `optimizer.lr=...` overrides and writes
`lr_find.png` and `lr_find.json` (into DIR with ``-o``, else into the current directory); it creates no
run directory and saves no weights. Under torchrun (`parallelism=ddp|fsdp`) every rank trains its share
and rank 0 prints and writes."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

from trainctl.errors import ConfigError, check

PNG, JSON = "lr_find.png", "lr_find.json"


def _parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="trainctl lr-find", description="Learning-rate range test: train the run OVERRIDES describes for "
        "--steps optimizer steps with the lr rising exponentially from --start-lr to --end-lr, plot the smoothed "
        "loss against the lr and print the suggested optimizer.lr (steepest descent; minimum / 10). Nothing is "
        "saved but the plot and the curve.")
    parser.add_argument("overrides", nargs="*", help="the overrides of `trainctl run` (GROUP=OPTION, KEY=VALUE)")
    parser.add_argument("--start-lr", type=float, default=1e-7, help="lr of the first step (default 1e-7)")
    parser.add_argument("--end-lr", type=float, default=10.0, help="lr of the last step (default 10)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of the ramp (default 100)")
    parser.add_argument("--smooth", type=float, default=0.05,
                        help="weight of the newest loss in the moving average (default 0.05)")
    parser.add_argument("--diverge", type=float, default=4.0,
                        help="stop once the smoothed loss exceeds this many times its best (default 4)")
    parser.add_argument("--skip-start", type=int, default=10,
                        help="points at the start ignored by the steepest-descent suggestion (default 10)")
    parser.add_argument("--skip-end", type=int, default=5,
                        help="points at the end ignored by the steepest-descent suggestion (default 5)")
    parser.add_argument("-o", "--output", help=f"directory for {PNG} and {JSON} (default: the current directory)")
    return parser


def _check_args(args: Any) -> None:
    check(args.start_lr > 0, "--start-lr", f"must be > 0 (got {args.start_lr})", "pass --start-lr 1e-7")
    check(args.end_lr > args.start_lr, "--end-lr", f"must be larger than --start-lr (got {args.end_lr})",
          "pass --end-lr 10")
    check(args.steps >= 2, "--steps", f"must be >= 2 (got {args.steps})", "pass --steps 100")
    check(0 <= args.smooth < 1, "--smooth", f"must be in [0, 1) (got {args.smooth})", "pass --smooth 0.05")
    check(args.diverge > 1, "--diverge", f"must be > 1 (got {args.diverge})", "pass --diverge 4")
    check(args.skip_start >= 0 and args.skip_end >= 0, "--skip-start", "--skip-start and --skip-end must be >= 0",
          "pass --skip-start 10 --skip-end 5")


def main(argv: Sequence[str]) -> None:
    from trainctl import config, launch

    launch.follow_launcher()  # a rank under torchrun ends with its agent
    args = _parser().parse_intermixed_args(list(argv))  # options may come before, between or after overrides
    _check_args(args)
    base_dir = os.getcwd()
    with config.session():  # composed and validated exactly as `trainctl run` does
        cfg = config.compose_for_run(args.overrides)
        spec, _ = config.load_run(config.without_hydra(cfg), base_dir)
    launch.check_launch(spec.parallelism)
    if launch.should_self_launch(spec.parallelism):
        raise ConfigError("parallelism.nproc_per_node", "lr-find does not start processes itself",
                          f"drop parallelism.nproc_per_node and launch with `torchrun --nproc_per_node="
                          f"{spec.parallelism.nproc_per_node} -m trainctl lr-find parallelism={spec.parallelism.name} ...`")
    output = Path(args.output) if args.output else Path(base_dir)

    from trainctl import parallel
    from trainctl.build import build_run, resolve_device
    from trainctl.lr_find import range_test

    dist = parallel.start(spec.parallelism, resolve_device(spec.trainer.device).type)
    main_rank = dist is None or dist.is_main
    try:
        run = build_run(spec, base_dir=base_dir, dist=dist)  # no run directory: no checkpoints, no cache
        with _progress(args.steps, main_rank) as on_step:
            result = range_test(run, args.start_lr, args.end_lr, args.steps, args.smooth, args.diverge,
                                args.skip_start, args.skip_end, on_step=on_step)
        if main_rank:
            _report(result, args.overrides, output)
    finally:
        if dist is not None:
            dist.close()


class _progress:
    """A rich progress bar over the steps (rank 0), showing the lr and the smoothed loss."""

    def __init__(self, steps: int, show: bool) -> None:
        self.steps, self.show, self.bar = steps, show and sys.stderr.isatty(), None

    def __enter__(self) -> Any:
        if not self.show:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("lr-find"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                            TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task("", total=self.steps)

        def on_step(i: int, lr: float, value: Any) -> None:
            text = f"lr {lr:.2e}  loss {value:.4f}" if value is not None else f"lr {lr:.2e}"
            self.bar.update(task, completed=i, description=text)
        return on_step

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def _finite(values: List[Any]) -> List[Any]:
    return [v if v is not None and math.isfinite(v) else None for v in values]


def _report(result: Any, overrides: List[str], output: Path) -> None:
    """Print the suggestions as overrides (first, so they are not lost if a file cannot be written), then
    write the plot and the curve."""
    from trainctl.files import write_json
    from trainctl.lr_find import plot

    tried = len(result.lrs)
    ending = {"completed": "all steps ran", "diverged": f"stopped once the smoothed loss passed {result.diverge:g}x "
              "its best", "nonfinite": "stopped at a non-finite loss"}[result.stop_reason]
    print(f"lr-find: {tried} steps from lr {result.start_lr:.3g} to {result.lrs[-1]:.3g} ({ending})")
    hints = {"steepest": "steepest descent of the smoothed loss", "min_over_10": "minimum of the smoothed loss / 10"}
    first = None
    for key, text in hints.items():
        lr = result.suggestions.get(key)
        if lr is not None:
            first = first or lr
            print(f"  optimizer.lr={lr:.3g}    # {text}")
    if first is None:
        print("  no suggestion: no finite loss was recorded")
    else:
        kept = [o for o in overrides if not o.startswith(("optimizer.lr=", "+optimizer.lr=", "++optimizer.lr="))]
        print("run: trainctl run " + " ".join([*kept, f"optimizer.lr={first:.3g}"]))
    data: Dict[str, Any] = {**result.as_dict(), "overrides": list(overrides)}
    data["losses"], data["smooth_losses"] = _finite(result.losses), _finite(result.smooth_losses)
    import importlib.util

    drawn = importlib.util.find_spec("matplotlib") is not None
    try:
        output.mkdir(parents=True, exist_ok=True)
        write_json(output / JSON, data)
        if drawn:
            plot(result, output / PNG)
    except OSError as exc:
        raise ConfigError("-o", f"could not write into {output}: {exc.strerror or exc} (the suggestions are printed "
                          "above)", "pass -o DIR with a directory you can write to") from None
    print(f"plot: {output / PNG}" if drawn else "plot: skipped, matplotlib is not installed "
          "(pip install 'trainctl[report]')")
    print(f"curve: {output / JSON}")
