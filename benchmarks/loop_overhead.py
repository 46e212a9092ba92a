"""trainctl's training loop against a plain hand-written PyTorch loop doing the same math.

Two workloads, each run through both loops in alternating order within this one process (so drift of
the machine affects both alike), reporting samples/s of each and their ratio (median over rounds):

  mlp  overhead-bound: MLP 64-512-512-10 on digits, batch 256, AdamW, warmup + cosine, clip 1.0
  gpt  compute-bound:  GPT 4 layers, d_model 128, seq 128 on a text file, batch 16, accumulation 2

Both loops read the loss every 10 steps and write it to a JSON-lines file; trainctl runs its full loop
(meter, throughput readings, metrics.jsonl) with checkpoints, evaluation, TensorBoard and the training
accuracy off, since the plain loop has none. Then the time from process start to the first optimizer step of
`trainctl run` and of `python benchmarks/plain_loop.py` (fresh processes, alternating).

    python benchmarks/loop_overhead.py [--rounds 5] [--mlp-steps 300] [--gpt-steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_loop import Workload  # noqa: E402

COMMON = ["scheduler=warmup_cosine", "optimizer=adamw", "regularization.max_grad_norm=1.0", "trainer.max_epochs=null",
          "trainer.eval_every_n_epochs=null", "checkpoint=off", "logging.tensorboard=false", "logging.progress=none",
          "logging.train_metrics=false"]
"""The plain loop computes no training accuracy; benchmarks/train_metrics_cost.py measures that cost."""


def overrides(workload: str, steps: int, text: str) -> list[str]:
    if workload == "mlp":
        specific = ["model=mlp", "model.depth=2", "model.width=512", "model.dropout=0", "data=digits",
                    "data.batch_size=256"]
    else:
        specific = ["model=gpt", "data=text", f"data.path={text}", "data.seq_len=128", "data.stride=64",
                    "data.batch_size=16", "trainer.grad_accum_steps=2", "optimizer.lr=3e-3"]
    return specific + COMMON + [f"trainer.max_steps={steps}"]


def time_trainctl(workload: str, steps: int, text: str, scratch: Path) -> float:
    """samples/s of trainctl's Runner.fit() (build excluded)."""
    from trainctl.build import build_run
    from trainctl.config import compose_spec
    from trainctl.metrics import MetricsWriter
    from trainctl.runner import Runner

    _, spec = compose_spec(overrides(workload, steps, text), base_dir=".")
    run = build_run(spec)
    runner = Runner(run, writer=MetricsWriter(scratch, tensorboard=False))
    tic = time.perf_counter()
    summary = runner.fit()
    seconds = time.perf_counter() - tic
    return summary["samples_seen"] / seconds


def time_plain(workload: str, steps: int, text: str, scratch: Path) -> float:
    job = Workload(workload, steps, text)
    tic = time.perf_counter()
    samples = job.train(str(scratch / "plain.jsonl"))
    return samples / (time.perf_counter() - tic)


def throughput(workload: str, steps: int, rounds: int, text: str, scratch: Path) -> dict:
    ours, plain = [], []
    time_trainctl(workload, max(2, steps // 10), text, scratch)  # warm both paths (imports, allocator)
    time_plain(workload, max(2, steps // 10), text, scratch)
    for r in range(rounds):
        order = (("trainctl", ours), ("plain", plain)) if r % 2 == 0 else (("plain", plain), ("trainctl", ours))
        for name, into in order:
            fn = time_trainctl if name == "trainctl" else time_plain
            into.append(fn(workload, steps, text, scratch))
    ratios = [a / b for a, b in zip(ours, plain)]
    return {"trainctl_samples_per_second": statistics.median(ours),
            "plain_samples_per_second": statistics.median(plain),
            "ratio_median": statistics.median(ratios), "ratios": [round(r, 3) for r in ratios]}


def startup(workload: str, text: str, repeats: int, scratch: Path) -> dict:
    """Seconds from process start to the first optimizer step, fresh processes, alternating."""
    ours, plain = [], []
    for r in range(repeats):
        run_dir = scratch / f"startup-{workload}-{r}"
        commands = [("trainctl", [sys.executable, "-m", "trainctl", "run", *overrides(workload, 1, text),
                                  f"hydra.run.dir={run_dir}"]),
                    ("plain", [sys.executable, str(Path(__file__).with_name("plain_loop.py")), workload,
                               "--steps", "1", "--text", text])]
        for name, command in commands if r % 2 == 0 else commands[::-1]:
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            if name == "trainctl":
                ours.append(json.loads((run_dir / "summary.json").read_text())["time_to_first_step_seconds"])
            else:
                plain.append(json.loads(out)["time_to_first_step_seconds"])
    return {"trainctl_seconds": statistics.median(ours), "plain_seconds": statistics.median(plain),
            "difference_seconds": statistics.median(ours) - statistics.median(plain)}


def text_file(scratch: Path) -> str:
    """64 KiB of seeded pseudo-words: the benchmark needs no download and no particular file."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("etaoinshrdlucmfwypvbgk"), rng.integers(1, 9))) for _ in range(2000)]
    path = scratch / "text.txt"
    path.write_text(" ".join(rng.choice(words, 12000))[: 64 * 1024])
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mlp-steps", type=int, default=300)
    parser.add_argument("--gpt-steps", type=int, default=12)
    parser.add_argument("--startup-repeats", type=int, default=3)
    parser.add_argument("--only", choices=("mlp", "gpt"), help="run one workload")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        text = text_file(scratch)
        results = {}
        for workload, steps in (("mlp", args.mlp_steps), ("gpt", args.gpt_steps)):
            if args.only and workload != args.only:
                continue
            result = throughput(workload, steps, args.rounds, text, scratch)
            result["startup"] = startup(workload, text, args.startup_repeats, scratch)
            results[workload] = result
            s = result["startup"]
            print(f"{workload}: trainctl {result['trainctl_samples_per_second']:,.1f} samples/s, plain "
                  f"{result['plain_samples_per_second']:,.1f} samples/s, ratio {result['ratio_median']:.3f} "
                  f"(rounds {result['ratios']}); first optimizer step after {s['trainctl_seconds']:.2f} s vs "
                  f"{s['plain_seconds']:.2f} s ({s['difference_seconds']:+.2f} s)", flush=True)
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
