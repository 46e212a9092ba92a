"""`trainctl lr-find` against an independent implementation, torch-lr-finder's LRFinder, on the same
model initialisation, the same batches in the same order, the same optimizer (AdamW, weight decay
groups as trainctl builds them), the exponential ramp from 1e-7 to 10 over 100 steps, smoothing 0.05 and
divergence at 4x the best smoothed loss. Prints both suggestions (steepest descent, minimum / 10) and
their ratios; the target is a ratio within a factor of 2.

torch-lr-finder is not a dependency of trainctl; install it for this script only:

    pip install torch-lr-finder==0.2.2      # check first with --dry-run that it keeps your torch

Run: python benchmarks/lr_find_compare.py [OVERRIDES...]   (default: digits, the default MLP)

The two smooth differently at the start: trainctl corrects the moving average's bias (fastai's
``avg / (1 - beta**(i+1))``), torch-lr-finder starts the average at the first loss. Its raw losses are
recovered from its smoothed curve (``raw_i = (s_i - (1 - f) * s_{i-1}) / f``) to compare the two loops
step by step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

START, END, STEPS, SMOOTH, DIVERGE = 1e-7, 10.0, 100, 0.05, 4.0


def _build(overrides):
    from trainctl.build import build_run
    from trainctl.config import compose_spec

    spec = compose_spec(list(overrides), os.getcwd())[1]
    return build_run(spec, base_dir=os.getcwd())


def trainctl_side(overrides):
    from trainctl.lr_find import range_test

    run = _build(overrides)
    return range_test(run, START, END, STEPS, SMOOTH, DIVERGE), run.spec.optimizer.name


def reference_side(overrides):
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from torch_lr_finder import LRFinder, TrainDataLoaderIter

    from trainctl.optim import build_optimizer
    from trainctl.regularization import param_groups

    run = _build(overrides)  # the same seed: the same initial weights and the same batches
    spec, train = run.spec, run.data.train
    # A fresh optimizer over the same parameter groups (the run's own is attached to its schedule).
    optimizer = build_optimizer(spec.optimizer, param_groups(run.model, spec.regularization), None)

    class Batches:
        def __iter__(self):
            epoch = 0
            while True:
                yield from train.epoch(epoch)
                epoch += 1

    def criterion(outputs, targets):  # trainctl's loss is a sum over its terms
        return run.loss(outputs, targets) / run.loss.count(targets)

    finder = LRFinder(run.model, optimizer, criterion, device=run.device)
    finder.range_test(TrainDataLoaderIter(Batches()), start_lr=START, end_lr=END, num_iter=STEPS,
                      smooth_f=SMOOTH, diverge_th=DIVERGE, step_mode="exp")
    lrs, losses = finder.history["lr"], finder.history["loss"]
    fig = Figure()
    FigureCanvasAgg(fig)
    _, steepest = finder.plot(skip_start=10, skip_end=5, suggest_lr=True, ax=fig.add_subplot())
    raw = [losses[0]] + [(losses[i] - (1 - SMOOTH) * losses[i - 1]) / SMOOTH for i in range(1, len(losses))]
    return {"lrs": lrs, "smooth": losses, "raw": raw, "steepest": steepest,
            "min_over_10": lrs[int(np.argmin(losses))] / 10}


def main() -> None:
    overrides = sys.argv[1:]
    ours, optimizer = trainctl_side(overrides)
    ref = reference_side(overrides)
    n = min(len(ours.lrs), len(ref["lrs"]))
    lr_gap = max(abs(a / b - 1) for a, b in zip(ours.lrs[:n], ref["lrs"][:n]))
    early = min(n, 50)
    raw_gap = max(abs(a - b) for a, b in zip(ours.losses[:early], ref["raw"][:early]))
    print(f"data/model: {' '.join(overrides) or 'digits, default MLP'}; optimizer {optimizer}; ramp {START:g} -> {END:g} over "
          f"{STEPS} steps, smooth {SMOOTH}, diverge {DIVERGE:g}x")
    print(f"steps run: trainctl {len(ours.lrs)} ({ours.stop_reason}), torch-lr-finder {len(ref['lrs'])}")
    print(f"lr of each step: largest relative difference {lr_gap:.1e}")
    print(f"raw loss of steps 1-{early}: largest absolute difference {raw_gap:.1e}")
    print(f"{'suggestion':<14}{'trainctl':>12}{'torch-lr-finder':>18}{'ratio':>9}")
    worst = 1.0
    for key in ("steepest", "min_over_10"):
        a, b = ours.suggestions[key], ref[key]
        ratio = a / b
        worst = max(worst, ratio, 1 / ratio)
        print(f"{key:<14}{a:>12.3g}{b:>18.3g}{ratio:>9.2f}")
    print(f"within a factor of 2: {'yes' if worst <= 2 else 'NO'} (largest factor {worst:.2f})")


if __name__ == "__main__":
    main()
