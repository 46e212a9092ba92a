"""Start-up and whole-loop cost of `trainctl run` against plain scripts (`plain_paths.py`) doing the same
work, for the four data paths: the embedded default (digits), synthetic data, a CSV file and a text file.

Each repeat starts both as fresh processes, alternating which goes first, and reads from each:
- the seconds from process start to the end of the first optimizer step;
- the whole loop, training and every evaluation: samples per second over it;
- one epoch-end evaluation, its result recorded (averaged over the run): trainctl writes metrics.jsonl and
  a progress line in its log; the plain script a JSON line and a line on stderr.
trainctl runs as a user would, with `checkpoint=off logging.tensorboard=false` since the plain scripts
save nothing. Printed: medians, and the spread (min-max) of each repeat's difference or ratio.

    python benchmarks/paths.py [--repeats 5] [--only default|synthetic|csv|text]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import numpy as np

HERE = Path(__file__).resolve().parent
COMMON = ["optimizer=adamw", "scheduler=warmup_cosine", "checkpoint=off", "logging.tensorboard=false",
          "logging.progress=none"]
OVERRIDES = {
    "default": [],
    "synthetic": ["model.width=512", "model.dropout=0", "data=synthetic", "data.n_samples=70000", "data.n_features=64",
                  "data.n_classes=10", "data.batch_size=256", "trainer.max_epochs=2", "regularization.max_grad_norm=1.0"],
    "csv": ["model.dropout=0", "data=csv", "data.target=label", "data.batch_size=128", "trainer.max_epochs=5",
            "regularization.max_grad_norm=1.0"],
    "text": ["model=gpt", "model.n_layer=2", "data=text", "data.seq_len=128", "data.batch_size=16", "trainer.max_epochs=2",
             "optimizer.lr=3e-3", "regularization.max_grad_norm=1.0"],
}


def files(scratch: Path) -> Dict[str, Path]:
    """A 20,000-row CSV (32 features, 10 classes) and 256 KiB of seeded pseudo-words."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 32))
    label = (x[:, :4] @ rng.normal(size=4) * 2).round().clip(-5, 4).astype(int) + 5
    csv = scratch / "table.csv"
    header = ",".join(f"f{i}" for i in range(32)) + ",label\n"
    csv.write_text(header + "\n".join(",".join(f"{v:.5f}" for v in row) + f",{c}" for row, c in zip(x, label)) + "\n")
    words = ["".join(rng.choice(list("etaoinshrdlucmfwypvbgk"), rng.integers(1, 9))) for _ in range(3000)]
    text = scratch / "text.txt"
    text.write_text(" ".join(rng.choice(words, 60000))[: 256 * 1024])
    return {"csv": csv, "text": text}


def trainctl(path: str, data: Dict[str, Path], run_dir: Path) -> Dict[str, float]:
    extra = {"csv": [f"data.path={data['csv']}"], "text": [f"data.path={data['text']}"]}.get(path, [])
    subprocess.run([sys.executable, "-m", "trainctl", "run", *COMMON, *OVERRIDES[path], *extra,
                    f"hydra.run.dir={run_dir}"], check=True, capture_output=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    evaluations = sum(1 for line in lines if '"val/loss"' in line)
    return {"first_step": summary["time_to_first_step_seconds"], "loop": summary["wall_seconds"],
            "samples": summary["samples_seen"], "eval_pass": summary["eval_seconds"] / evaluations}


def plain(path: str, data: Dict[str, Path], log: Path) -> Dict[str, float]:
    out = subprocess.run([sys.executable, str(HERE / "plain_paths.py"), path, "--csv", str(data["csv"]),
                          "--text", str(data["text"]), "--log", str(log)], check=True, capture_output=True,
                         text=True).stdout
    result = json.loads(out)
    return {"first_step": result["time_to_first_step_seconds"], "loop": result["loop_seconds"],
            "samples": result["samples"], "eval_pass": result["eval_seconds"] / result["evaluations"]}


def spread(values: List[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)} to {format(max(values), fmt)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=sorted(OVERRIDES))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        data = files(scratch)
        for path in OVERRIDES:
            if args.only and path != args.only:
                continue
            ours: List[Dict[str, float]] = []
            theirs: List[Dict[str, float]] = []
            for r in range(args.repeats):
                order = ("trainctl", "plain") if r % 2 == 0 else ("plain", "trainctl")
                for name in order:
                    if name == "trainctl":
                        ours.append(trainctl(path, data, scratch / f"{path}-{r}"))
                    else:
                        theirs.append(plain(path, data, scratch / f"{path}-{r}-plain.jsonl"))
            start = [a["first_step"] - b["first_step"] for a, b in zip(ours, theirs)]
            loop = [(a["samples"] / a["loop"]) / (b["samples"] / b["loop"]) for a, b in zip(ours, theirs)]
            evals = [a["eval_pass"] / b["eval_pass"] for a, b in zip(ours, theirs)]
            results[path] = {
                "first_step_seconds": {"trainctl": statistics.median(a["first_step"] for a in ours),
                                       "plain": statistics.median(b["first_step"] for b in theirs)},
                "first_step_difference": start, "loop_ratio": loop, "eval_pass_ratio": evals,
                "loop_samples_per_second": {"trainctl": statistics.median(a["samples"] / a["loop"] for a in ours),
                                            "plain": statistics.median(b["samples"] / b["loop"] for b in theirs)}}
            first = results[path]["first_step_seconds"]
            print(f"{path}: first optimizer step {first['trainctl']:.2f} s vs {first['plain']:.2f} s, difference "
                  f"{spread(start, '+.2f')} s; whole loop samples/s ratio {spread(loop, '.3f')}; evaluation pass "
                  f"ratio {spread(evals, '.2f')}", flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
