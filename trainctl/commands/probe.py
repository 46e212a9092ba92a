"""`trainctl probe [OVERRIDES] [--steps K] [--accum A] [--warmup-steps N] [--memory-limit-mib M]`: the
largest per-device batch that fits and the gradient noise scale of the run the overrides describe,
measured on trainctl's own model, loss, precision and data; prints the `data.batch_size` and
`trainer.grad_accum_steps` to use. Nothing is written and no run directory is made."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional, Sequence

from trainctl.errors import ConfigError

DESCRIPTION = """Measure (a) the largest per-device batch for which one training step fits (CUDA memory;
on CPU the peak memory of a step in a child process against --memory-limit-mib) and (b) the gradient noise
scale B_simple (McCandlish et al. 2018) from gradient norms of micro-batches and of their accumulation
window, and print a recommended data.batch_size and trainer.grad_accum_steps (effective batch ~ B_simple)."""


def main(argv: Sequence[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="trainctl probe", description=DESCRIPTION)
    parser.add_argument("overrides", nargs="*", help="the run's overrides, as for `trainctl run`")
    parser.add_argument("--steps", type=int, default=30,
                        help="accumulation windows measured for the noise scale (default 30)")
    parser.add_argument("--accum", type=int, default=4,
                        help="micro-batches of data.batch_size per window: B_small = data.batch_size, "
                        "B_big = accum x data.batch_size (default 4)")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="train this many steps of the run first and measure there (default 0: at the "
                        "initial weights, where the noise scale is smallest)")
    parser.add_argument("--memory-limit-mib", type=float, default=None,
                        help="CPU: the memory a training process may use (default 80%% of the available RAM)")
    parser.add_argument("--resolution", type=float, default=None,
                        help="stop the batch search once the bracket is narrower than this fraction of the "
                        "batch that fits (default 0.125 on CPU, 0 = exact on CUDA)")
    parser.add_argument("--skip-memory", action="store_true", help="do not search for the largest batch")
    parser.add_argument("--skip-noise", action="store_true", help="do not measure the gradient noise scale")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_intermixed_args(argv)
    _check_args(args)
    result = probe(args)
    if args.json:
        print(json.dumps(result, indent=2), flush=True)


def _check_args(args) -> None:
    if args.steps < 3:
        raise ConfigError("--steps", f"{args.steps} windows cannot give a noise scale and its error", "pass --steps 30")
    if args.accum < 2:
        raise ConfigError("--accum", "B_big must be larger than B_small: the window needs at least 2 micro-batches",
                          "pass --accum 4")
    if args.warmup_steps < 0:
        raise ConfigError("--warmup-steps", "must be >= 0", "pass --warmup-steps 0")
    if args.memory_limit_mib is not None and not args.memory_limit_mib > 0:
        raise ConfigError("--memory-limit-mib", "must be > 0", "pass --memory-limit-mib 4000")
    if args.resolution is not None and not 0 <= args.resolution < 1:
        raise ConfigError("--resolution", "must be in [0, 1)", "pass --resolution 0.125")


def probe(args) -> dict:
    from trainctl import config
    from trainctl import probe as gns

    base_dir = os.getcwd()
    _, spec = config.compose_spec(args.overrides, base_dir)
    say = (lambda text: None) if args.json else (lambda text: print(text, flush=True))
    world = spec.parallelism.nproc_per_node or 1
    result: dict = {"overrides": list(args.overrides), "world_size": world}
    from trainctl.build import build_run

    run = build_run(spec, base_dir=base_dir)
    n_train = len(run.data.train.source)
    cap = max(1, n_train // world)
    result["n_train"] = n_train
    largest: Optional[int] = None
    if not args.skip_memory:
        search = _search(args, spec, run, base_dir, cap, say)
        largest = search.largest
        result["memory"] = {"largest_batch": search.largest, "capped_by_train_split": search.capped,
                            "seconds": round(search.seconds, 2), "device": run.device.type,
                            "trials": [vars(t) for t in search.trials], "limit_mib": search.limit_mib}
        if run.device.type == "cuda":  # the search stepped this run's weights: measure the noise on fresh ones
            del run
            run = build_run(spec, base_dir=base_dir)
    if not args.skip_noise:
        batch = spec.data.batch_size if largest is None else min(spec.data.batch_size, max(1, largest))
        run.data.train.batch_size = batch
        where = f"after {args.warmup_steps} training steps" if args.warmup_steps else "at the initial weights"
        say(f"gradient noise scale: {args.steps} windows of {args.accum} x {batch} samples, {where}")
        began = time.perf_counter()
        estimate = gns.run_noise_scale(run, args.steps, args.accum, args.warmup_steps, say)
        result["noise"] = {**estimate.summary(), "seconds": round(time.perf_counter() - began, 2),
                           "warmup_steps": args.warmup_steps}
        chosen = gns.recommend(estimate.b_simple, largest, n_train, world, spec.data.batch_size)
        result["recommended"] = None if chosen is None else {"data.batch_size": chosen[0],
                                                             "trainer.grad_accum_steps": chosen[1]}
        _report(result, estimate, chosen, say)
    return result


def _search(args, spec, run, base_dir: str, cap: int, say):
    from trainctl import probe as gns

    start = min(spec.data.batch_size, cap)
    if run.device.type == "cuda":
        measure, resolution, limit = gns.cuda_measure(run), args.resolution or 0.0, None
        say(f"largest batch: one training step per candidate on {run.device} (doubling from {start}, then bisection)")
    else:
        limit = args.memory_limit_mib or round(0.8 * gns.available_mib())
        resolution = 0.125 if args.resolution is None else args.resolution
        measure = gns.cpu_measure(spec, base_dir, limit)
        say(f"largest batch: one training step per candidate in a child process, peak memory against "
            f"{limit:.0f} MiB (doubling from {start}, then bisection to {resolution:.0%})")

    def shown(trial) -> None:
        say(f"  batch {trial.batch}: {'fits' if trial.fits else 'does not fit'}"
            f"{' (' + trial.note + ')' if trial.note else ''}")
    search = gns.largest_batch(measure, start, cap, resolution, shown, gns.extrapolate(limit) if limit else None)
    search.limit_mib = limit
    if search.largest == 0:
        say("largest batch: not even one sample fits" + (f" in {limit:.0f} MiB" if limit else ""))
    else:
        capped = " (all of the training split)" if search.capped else ""
        say(f"largest batch: {search.largest}{capped}, {len(search.trials)} candidates in {search.seconds:.1f} s")
    return search


def _report(result: dict, estimate, chosen, say) -> None:
    noise = result["noise"]
    b, err = noise["b_simple"], noise["b_simple_stderr"]
    if math.isfinite(b):
        say(f"B_simple = {b:.1f} +- {err:.1f} (jackknife), moving average {noise['b_simple_ema']:.1f}; "
            f"|G|^2 = {noise['grad_sq_norm']:.4g}, tr(Sigma) = {noise['trace_cov']:.4g}")
        say(f"critical batch size B_crit ~ B_simple ~ {max(1, round(b))} samples per optimizer step")
    else:
        say("B_simple: not resolved - the averaged |G|^2 is not positive (the gradient is lost in the noise); "
            "pass more --steps or a larger --accum")
    if chosen is None:
        return
    batch, accum = chosen
    world = result["world_size"]
    per = f" x {world} processes" if world > 1 else ""
    say(f"recommended: data.batch_size={batch} trainer.grad_accum_steps={accum}"
        f"   (effective batch {batch * accum * world} = {batch} x {accum}{per})")
    if b > result["n_train"]:
        say(f"  note: B_simple exceeds the training split ({result['n_train']} samples): full-batch steps")
