"""The step-time cost of EMA weight averaging (updated every step) on the built-in GPT, measured side by
side in one process: no averaging vs `averaging=ema` (one foreach lerp per device/dtype group), and, for
reference, the same average through AveragedModel.update_parameters (a Python walk over the parameters
and a read of its counter each call).

Each variant is a built run (GPT 4 layers, d_model 128, seq 128 on a generated text file, batch 16,
AdamW); the variants take turns, a few optimizer steps each per round (``Runner.train_step`` on the same
window, which calls the EMA update after the step), and the median step time per variant is compared
with the plain one. The update alone is also timed many times over and put against the plain step: that
figure holds even when other processes share the CPU and the whole-step medians are noisy.

    python benchmarks/averaging_cost.py [--rounds 7] [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from loop_overhead import text_file  # noqa: E402

COMMON = ["model=gpt", "data=text", "data.seq_len=128", "data.batch_size=16", "optimizer=adamw",
          "scheduler=constant", "trainer.max_epochs=null", "trainer.max_steps=1000",
          "trainer.eval_every_n_epochs=null", "checkpoint=off", "logging.tensorboard=false", "logging.progress=none"]
VARIANTS = {"none": [], "ema": ["averaging=ema"], "ema via update_parameters": ["averaging=ema"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    args = parser.parse_args()

    import torch

    from trainctl.averaging import EMA
    from trainctl.batches import windows_of
    from trainctl.build import build_run
    from trainctl.config import compose_spec
    from trainctl.runner import Runner

    class UpdateParameters(EMA):
        """The same average, through torch's own AveragedModel.update_parameters."""

        def on_step_end(self, run, state):
            self.averaged.update_parameters(run.model)

    with tempfile.TemporaryDirectory() as scratch:
        text = text_file(Path(scratch))
        runners, windows = {}, {}
        for name, extra in VARIANTS.items():
            _, spec = compose_spec([*COMMON, f"data.path={text}", *extra], base_dir=".")
            run = build_run(spec)
            if name == "ema via update_parameters":
                run.callbacks = [UpdateParameters(spec.averaging) if c.name == "averaging" else c
                                 for c in run.callbacks]
            runners[name] = Runner(run)
            runners[name]._call("on_fit_start")
            windows[name] = next(windows_of(run.data.train.epoch(0), 1))
        params = sum(p.numel() for p in runners["none"].run.model.parameters())
        tensors = len(list(runners["none"].run.model.parameters()))
        times = {name: [] for name in VARIANTS}
        for name, runner in runners.items():  # warm-up: allocator, first-call paths, the first (copying) update
            runner.train_step(windows[name])
            runner.train_step(windows[name])
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                tic = time.perf_counter()
                for _ in range(args.steps):
                    runners[name].train_step(windows[name])
                times[name].append((time.perf_counter() - tic) / args.steps)
        update = {}  # the update alone, many times: robust when other processes share the CPU
        for name in ("ema", "ema via update_parameters"):
            runner = runners[name]
            callback = next(c for c in runner.run.callbacks if c.name == "averaging")
            samples = []
            for _ in range(args.rounds * 20):
                tic = time.perf_counter()
                callback.on_step_end(runner.run, runner.state)
                samples.append(time.perf_counter() - tic)
            update[name] = statistics.median(samples)
    base = statistics.median(times["none"])
    print(f"GPT ({params / 1e6:.2f} M parameters in {tensors} tensors) step time, median of {args.rounds} rounds "
          f"x {args.steps} steps (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for name in VARIANTS:
        median = statistics.median(times[name])
        print(f"  {name:26s} {median * 1000:8.1f} ms   {100 * (median / base - 1):+6.1f}%")
    for name, seconds in update.items():
        print(f"  the update alone, {name:17s} {seconds * 1000:8.3f} ms = {100 * seconds / base:5.2f}% of the plain step")


if __name__ == "__main__":
    main()
