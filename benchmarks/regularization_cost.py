"""The step-time cost of the optimizer-step wrappers on the built-in GPT: plain vs SAM vs ASAM vs AGC vs
L1 (+ coupled L2), measured side by side in one process.

Each variant is a built run (GPT 4 layers, d_model 128, seq 64 on a generated text file, batch 16,
AdamW, clip 1.0); the variants take turns, a few optimizer steps each per round (``Runner.train_step``
on the same window), and the median step time per variant is compared with the plain one. Torch runs
on one thread and the process CPU time is reported next to wall time: on a machine shared with other
jobs the CPU time is the steadier of the two.

    python benchmarks/regularization_cost.py [--rounds 7] [--steps 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMMON = ["model=gpt", "data=text", "data.seq_len=64", "data.stride=32", "data.batch_size=16", "optimizer=adamw",
          "optimizer.lr=3e-3", "scheduler=constant", "regularization.max_grad_norm=1.0", "trainer.max_epochs=null",
          "trainer.max_steps=1000", "trainer.eval_every_n_epochs=null", "checkpoint=off",
          "logging.tensorboard=false", "logging.progress=none"]
VARIANTS = {
    "plain": [],
    "sam": ["regularization.sam_rho=0.05"],
    "asam": ["regularization.sam_rho=0.5", "regularization.sam_adaptive=true"],
    "agc": ["regularization.agc_clipping=0.01"],  # the GPT's head is tied to the token embedding
    "l1": ["regularization.l1=1e-5"],
    "l1+l2": ["regularization.l1=1e-5", "regularization.l2=1e-4"],
}


def text_file(directory: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["the cat sat on the mat.", "a dog ran in the park.", "birds sing at dawn.",
             "rain falls on the roof.", "the sun rises in the east."]
    path = directory / "corpus.txt"
    path.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 4000)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    import torch

    from trainctl.batches import windows_of
    from trainctl.build import build_run
    from trainctl.config import compose_spec
    from trainctl.runner import Runner

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        text = text_file(Path(scratch))
        runners, windows = {}, {}
        for name, extra in VARIANTS.items():
            _, spec = compose_spec([*COMMON, f"data.path={text}", *extra], base_dir=".")
            run = build_run(spec)
            runners[name] = Runner(run)
            windows[name] = next(windows_of(run.data.train.epoch(0), 1))
        times = {name: [] for name in VARIANTS}
        cpu = {name: [] for name in VARIANTS}
        for name, runner in runners.items():  # warm-up: allocator, first-call paths
            runner.train_step(windows[name])
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                tic, cpu_tic = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    runners[name].train_step(windows[name])
                times[name].append((time.perf_counter() - tic) / args.steps)
                cpu[name].append((time.process_time() - cpu_tic) / args.steps)
    base, cpu_base = statistics.median(times["plain"]), statistics.median(cpu["plain"])
    print(f"GPT step time, median of {args.rounds} rounds x {args.steps} steps (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    print(f"  {'variant':8s} {'CPU ms':>8s} {'ratio':>7s} {'wall ms':>9s} {'ratio':>7s}")
    for name in VARIANTS:
        c, w = statistics.median(cpu[name]), statistics.median(times[name])
        print(f"  {name:8s} {c * 1000:8.1f} {c / cpu_base:7.3f} {w * 1000:9.1f} {w / base:7.3f}")


if __name__ == "__main__":
    main()
