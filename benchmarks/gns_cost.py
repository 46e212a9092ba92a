"""Cost of logging.gradient_noise_scale: trainctl's step time with it on and off, side by side, alternating
within rounds (medians). GPT (4 layers, d_model 128, seq 128, batch 16, accumulation 2: compute-bound) and
the digits MLP with accumulation 2 (tiny steps: the per-step overhead shows most there).

    python benchmarks/gns_cost.py [--rounds 7]   (run from the repository root)
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path("benchmarks").resolve()))
import loop_overhead as lo  # noqa: E402

BASE = list(lo.COMMON)


def trainctl(workload, steps, text, scratch, on):
    extra = [] if workload == "gpt" else ["trainer.grad_accum_steps=2"]  # the GPT workload accumulates already
    lo.COMMON = BASE + extra + [f"logging.gradient_noise_scale={'true' if on else 'false'}"]
    return lo.time_trainctl(workload, steps, text, scratch)


def reduction_ms(workload, text, repeats=50):
    """The measured steps' own work, timed alone (robust to a busy machine): the two squared-norm
    reductions over the workload's gradients, in ms per step."""
    import time

    from trainctl.build import build_run
    from trainctl.config import compose_spec
    from trainctl.noise_scale import squared_norm

    _, spec = compose_spec(lo.overrides(workload, 1, text), base_dir=".")
    run = build_run(spec)
    x, y = run.data.train.first()
    run.loss(run.model(x), y).backward()
    grads = [p.grad for p in run.clipper.params if p.grad is not None]
    squared_norm(grads)
    began = time.perf_counter()
    for _ in range(repeats):
        float(squared_norm(grads)) + float(squared_norm(grads))
    return 1000 * (time.perf_counter() - began) / repeats, sum(g.numel() for g in grads)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mlp-steps", type=int, default=300)
    parser.add_argument("--gpt-steps", type=int, default=12)
    parser.add_argument("--workloads", default="gpt,mlp")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        text = lo.text_file(scratch)
        for workload in args.workloads.split(","):
            steps = args.mlp_steps if workload == "mlp" else args.gpt_steps
            batch = 16 * 2 if workload == "gpt" else 256 * 2  # samples per optimizer step
            runs = {"on": lambda: trainctl(workload, steps, text, scratch, True),
                    "off": lambda: trainctl(workload, steps, text, scratch, False)}
            for fn in runs.values():  # warm up
                fn()
            got = {k: [] for k in runs}
            for r in range(args.rounds):
                for name in (("on", "off") if r % 2 else ("off", "on")):
                    got[name].append(runs[name]())
            ms = {k: 1000 * batch / statistics.median(v) for k, v in got.items()}  # median step time
            ratio = statistics.median(b / a for a, b in zip(got["on"], got["off"]))  # on/off step time
            extra_ms, numel = reduction_ms(workload, text)
            print(f"{workload}: the two reductions over {numel / 1e6:.2f} M gradient values: {extra_ms:.3f} ms per "
                  f"measured step ({100 * extra_ms / ms['off']:.2f}% of the step)", flush=True)
            print(f"{workload}: step time off {ms['off']:.2f} ms, on {ms['on']:.2f} ms; on/off {ratio:.3f} "
                  f"(rounds {[round(b / a, 3) for a, b in zip(got['on'], got['off'])]})", flush=True)


if __name__ == "__main__":
    main()
