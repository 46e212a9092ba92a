"""Peak memory and speed of the GPT with and without activation checkpointing.

Each setting trains in a fresh `trainctl run` process (peak RSS on CPU, CUDA max allocated on a GPU is
a per-process high-water mark), alternating the settings over rounds, and the figures come from each
run's summary.json. The baseline is the same process training with batch size 1, so the difference
is, to a good approximation, the memory that scales with the batch (activations).

On Linux the runs use a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_=65536), so large tensors
are returned to the system when freed and peak RSS follows the live tensors. With glibc's default
(dynamic) threshold, memory freed during backward stays in the heap and is reused in fragments, which
hides most of the saving from RSS; `--glibc-default` measures that too.

    python benchmarks/activation_memory.py [--batch-size 64] [--steps 6] [--rounds 2] [--text FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_overhead import text_file  # noqa: E402

SETTINGS = {"none": ["performance.activation_checkpointing=none"],
            "blocks": ["performance.activation_checkpointing=blocks"]}


def run(text: str, batch_size: int, steps: int, setting: str, run_dir: Path, env: dict) -> dict:
    command = [sys.executable, "-m", "trainctl", "run", "model=gpt", "data=text", f"data.path={text}",
               "data.seq_len=128", f"data.batch_size={batch_size}", f"trainer.max_steps={steps}",
               "trainer.max_epochs=null", "trainer.eval_every_n_epochs=null", "checkpoint=off",
               "logging.tensorboard=false", "logging.progress=none", *SETTINGS[setting], f"hydra.run.dir={run_dir}"]
    subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"peak_memory_mib": summary["peak_memory_mib"], "tokens_per_second": summary["tokens_per_second"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--text", help="a text file (default: a generated one)")
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold")
    args = parser.parse_args()
    env = dict(os.environ)
    if not args.glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        text = args.text or text_file(scratch)
        readings = {name: [] for name in ("baseline", *SETTINGS)}
        for r in range(args.rounds):
            order = list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]
            readings["baseline"].append(run(text, 1, args.steps, "none", scratch / f"baseline-{r}", env))
            for name in order:
                readings[name].append(run(text, args.batch_size, args.steps, name, scratch / f"{name}-{r}", env))
    result = {"batch_size": args.batch_size, "seq_len": 128, "model": "gpt (4 layers, d_model 128)",
              "malloc": "glibc default" if args.glibc_default else "MALLOC_MMAP_THRESHOLD_=65536"}
    base = statistics.median(x["peak_memory_mib"] for x in readings["baseline"])
    result["baseline_peak_memory_mib"] = round(base, 1)
    for name in SETTINGS:
        peak = statistics.median(x["peak_memory_mib"] for x in readings[name])
        result[name] = {"peak_memory_mib": round(peak, 1), "above_baseline_mib": round(peak - base, 1),
                        "tokens_per_second": round(statistics.median(x["tokens_per_second"] for x in readings[name]))}
    none, blocks = result["none"], result["blocks"]
    result["activation_memory_ratio"] = round(blocks["above_baseline_mib"] / max(none["above_baseline_mib"], 1e-9), 3)
    result["speed_ratio"] = round(blocks["tokens_per_second"] / none["tokens_per_second"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
