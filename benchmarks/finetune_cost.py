"""What fine-tuning the built-in GPT costs, full vs LoRA vs QLoRA, side by side in one run.

A GPT is first trained briefly (the "pretrained" weights); then each way fine-tunes it from those weights
in a fresh `trainctl run` process, the ways alternating over rounds so that machine noise falls on all of
them alike. From each run's summary.json: median ms per optimizer step, the training state (parameters
+ gradients + optimizer state, MiB), peak memory, and the size of one checkpoint's files.

    python benchmarks/finetune_cost.py [--rounds 3] [--steps 30] [--d-model 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_overhead import text_file  # noqa: E402

WAYS = {"full": [], "lora": ["peft=lora"], "qlora": ["peft=qlora"]}


def run(args: list, run_dir: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "trainctl", "run", *args, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = ["model=gpt", "data=text", f"data.path={text_file(root)}", "data.seq_len=128", "data.batch_size=16",
                  f"model.d_model={args.d_model}", f"model.n_layer={args.layers}", "trainer.max_epochs=null",
                  "trainer.eval_every_n_epochs=null", "logging.tensorboard=false", "logging.progress=none",
                  "checkpoint.every_n_epochs=null", "checkpoint.save_best=false"]
        run([*common, "trainer.max_steps=5"], root / "pretrained")
        tune = [*common, f"model.init_from={root / 'pretrained'}", f"trainer.max_steps={args.steps}"]
        results: dict = {name: [] for name in WAYS}
        for r in range(args.rounds):
            order = list(WAYS) if r % 2 == 0 else list(reversed(WAYS))
            for name in order:
                results[name].append(run([*tune, *WAYS[name]], root / f"{name}-{r}"))
        full = statistics.median(s["step_seconds"] for s in results["full"])
        print(f"GPT d_model={args.d_model}, {args.layers} layers, batch 16 x 128 tokens, {args.steps} steps, "
              f"{args.rounds} rounds (median)")
        print(f"{'':6s} {'ms/step':>8s} {'vs full':>8s} {'state MiB':>10s} {'(params/grads/optim)':>22s} "
              f"{'peak MiB':>9s} {'checkpoint':>11s}")
        for name, summaries in results.items():
            step = statistics.median(s["step_seconds"] for s in summaries)
            state = summaries[-1]["training_state_mib"]
            ckpt = Path(summaries[-1]["last_checkpoint"])
            size = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file())
            peak = statistics.median(s["peak_memory_mib"] for s in summaries)
            parts = f"{state['parameters']:.1f}/{state['gradients']:.1f}/{state['optimizer']:.1f}"
            print(f"{name:6s} {step * 1000:8.1f} {step / full:8.2f} {state['total']:10.1f} {parts:>22s} "
                  f"{peak:9.0f} {size / 2**20:10.2f}M")
    for tokens in (16, 2048):  # dequantising costs the same whatever the batch; the matmul grows with it
        layer_cost(tokens)


def layer_cost(tokens: int = 2048, width: int = 1024, repeats: int = 20) -> None:
    """One linear layer's forward + backward (to its input), fp32 vs a bitsandbytes NF4 copy of it."""
    import time

    import torch

    from trainctl.quantize import quantize_linears

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(width, width))
    quant = torch.nn.Sequential(torch.nn.Linear(width, width))
    quant.load_state_dict(plain.state_dict())
    quantize_linears(quant, ["0"], [], "nf4", True, torch.float32)
    for p in (*plain.parameters(), *quant.parameters()):
        p.requires_grad_(False)
    x = torch.randn(tokens, width, requires_grad=True)

    def timed(layer: torch.nn.Module) -> float:
        best = float("inf")
        for _ in range(3):
            tic = time.perf_counter()
            for _ in range(repeats):
                layer(x).sum().backward()
            best = min(best, (time.perf_counter() - tic) / repeats)
        return best

    fp32, nf4 = timed(plain), timed(quant)
    print(f"one {width}x{width} linear layer, {tokens} tokens, forward + backward: fp32 {fp32 * 1000:.1f} ms, "
          f"NF4 {nf4 * 1000:.1f} ms ({nf4 / fp32:.1f}x)")


if __name__ == "__main__":
    main()
