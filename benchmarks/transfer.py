"""Transfer on the bundled digits: train the CNN on digits 0-5, then fine-tune it on digits 6-9 with a
new head (6 classes before, 4 after: `model.init_strict=false` starts the head afresh) three ways - the
head alone (peft=freeze, a linear probe), LoRA adapters on the convolutions plus the head (peft=lora),
every weight (peft=none) - against the same CNN trained on 6-9 from scratch.

Every run on 6-9 trains on only `--fraction` of their samples (a few labelled samples per class is where
pretrained features matter), for the same number of epochs, and is evaluated on the rest (the validation
split). Prints accuracy (mean and range over seeds), trainable parameters, ms per step and the size of
the final weights file.

    python benchmarks/transfer.py [--seeds 0 1 2] [--epochs 10] [--fraction 0.1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

QUIET = ["logging.progress=none", "logging.tensorboard=false", "model=cnn", "data=digits"]
WAYS = {
    "scratch": ["optimizer.lr=0.002"],
    "freeze (head only)": ["peft=freeze", "model.init_strict=false", "optimizer.lr=0.01"],
    "lora r=4 + head": ["peft=lora", "peft.r=4", "model.init_strict=false", "optimizer.lr=0.005"],
    "full fine-tuning": ["model.init_strict=false", "optimizer.lr=0.002"],
}
"""Learning rates: the CNN recipe's for training every weight, higher for fewer trained weights (a linear
probe takes a large one)."""


def trainctl(args: list, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "trainctl", "run", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the 6-9 samples used for training")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        trainctl([*QUIET, "data.classes=[0,1,2,3,4,5]", "trainer.max_epochs=15", "optimizer.lr=0.002",
                  f"hydra.run.dir={root / 'pretrained'}"], root)
        pre = json.loads((root / "pretrained" / "summary.json").read_text())
        print(f"pretrained on digits 0-5: val/acc {pre['final']['val/acc']:.3f}\n")
        # a small labelled set: the validation share is the rest, so the first `fraction` trains
        target = ["data.classes=[6,7,8,9]", f"data.val_fraction={1 - args.fraction:g}",
                  f"trainer.max_epochs={args.epochs}", "data.batch_size=16"]
        print(f"on digits 6-9 with {args.fraction:.0%} of their samples, {args.epochs} epochs, "
              f"seeds {args.seeds}")
        print(f"{'':22s} {'val/acc':>16s} {'trainable':>18s} {'ms/step':>8s} {'weights file':>13s}")
        for name, extra in WAYS.items():
            accs, steps = [], []
            init = [f"model.init_from={root / 'pretrained'}"] if name != "scratch" else []
            for seed in args.seeds:
                run_dir = root / f"{name.split()[0]}-{seed}"
                trainctl([*QUIET, *target, *init, *extra, f"trainer.seed={seed}", f"data.seed={seed}",
                          f"hydra.run.dir={run_dir}"], root)
                summary = json.loads((run_dir / "summary.json").read_text())
                accs.append(summary["final"]["val/acc"])
                steps.append(summary["step_seconds"] * 1000)
            counts = _counts(run_dir, root)
            size = (run_dir / "model.safetensors").stat().st_size
            spread = f"{statistics.mean(accs):.3f} ({min(accs):.3f}-{max(accs):.3f})"
            print(f"{name:22s} {spread:>16s} {counts:>18s} {statistics.median(steps):8.2f} {size:>12,d}B")


def _counts(run_dir: Path, root: Path) -> str:
    import logging

    from trainctl.adapters import parameter_counts

    logging.getLogger("trainctl").setLevel(logging.ERROR)
    from trainctl.job import load_saved_run

    run, *_ = load_saved_run(run_dir, [], str(root))
    counts = parameter_counts(run.model)
    return f"{counts['trainable']:,} ({counts['percent']:.1f}%)"


if __name__ == "__main__":
    main()
