"""Cost of logging.train_metrics: trainctl with it on and off against the plain PyTorch loop of
benchmarks/plain_loop.py (same math), alternating within rounds; median samples/s and ratios.

    python benchmarks/train_metrics_cost.py [--rounds 7]   (run from the repository root)
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path("benchmarks").resolve()))
import loop_overhead as lo  # noqa: E402

BASE = [o for o in lo.COMMON if not o.startswith("logging.train_metrics=")]


def trainctl(workload, steps, text, scratch, on):
    lo.COMMON = BASE + [f"logging.train_metrics={'true' if on else 'false'}"]
    return lo.time_trainctl(workload, steps, text, scratch)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mlp-steps", type=int, default=300)
    parser.add_argument("--gpt-steps", type=int, default=12)
    parser.add_argument("--workloads", default="mlp,gpt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        text = lo.text_file(scratch)
        for workload, steps in [(w, args.mlp_steps if w == "mlp" else args.gpt_steps) for w in args.workloads.split(",")]:
            runs = {"on": lambda: trainctl(workload, steps, text, scratch, True),
                    "off": lambda: trainctl(workload, steps, text, scratch, False),
                    "plain": lambda: lo.time_plain(workload, steps, text, scratch)}
            for fn in runs.values():  # warm up
                fn()
            got = {k: [] for k in runs}
            order = list(runs)
            for r in range(args.rounds):
                for name in order[r % 3:] + order[:r % 3]:
                    got[name].append(runs[name]())
            med = {k: statistics.median(v) for k, v in got.items()}
            on_off = statistics.median(a / b for a, b in zip(got["on"], got["off"]))
            print(f"{workload}: samples/s on {med['on']:.0f} off {med['off']:.0f} plain {med['plain']:.0f}; "
                  f"trainctl/plain on {statistics.median(a / b for a, b in zip(got['on'], got['plain'])):.3f} "
                  f"off {statistics.median(a / b for a, b in zip(got['off'], got['plain'])):.3f}; "
                  f"on/off {on_off:.3f} (rounds {[round(a / b, 3) for a, b in zip(got['on'], got['off'])]})",
                  flush=True)


if __name__ == "__main__":
    main()
