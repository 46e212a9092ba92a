"""A plain hand-written PyTorch training loop: the reference that trainctl's loop is measured against.

It does the same math as `trainctl run` for the two workloads of `loop_overhead.py`: the same network
classes, data, batch order scheme, AdamW with weight decay on matrices only, linear warmup + cosine
decay, gradient clipping, gradient accumulation (loss sums divided by the window's term count), and a
loss reading every 10 optimizer steps written to a JSON-lines file. It imports nothing from trainctl
but the network definitions.

Run alone it reports the time from process start to the first optimizer step:
    python benchmarks/plain_loop.py mlp --steps 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

LOG_EVERY = 10


def seconds_since_process_start() -> float:
    with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
        start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        return float(uptime.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")


def digits_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.from_numpy((bunch.data / 16.0).astype(np.float32))
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train, _ = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=bunch.target)
    return x[train], y[train]


def text_windows(path: str, seq_len: int, stride: int):
    tokens = torch.from_numpy(np.frombuffer(Path(path).read_bytes(), dtype=np.uint8).copy())
    train = tokens[: int(len(tokens) * 0.9)]
    starts = torch.arange(0, len(train) - seq_len, stride)
    windows = train[starts.unsqueeze(1) + torch.arange(seq_len + 1)].long()
    return windows[:, :-1], windows[:, 1:]


def adamw_warmup_cosine(model: torch.nn.Module, lr: float, steps: int):
    """AdamW with weight decay 0.01 on matrices only, and a 5% linear warmup then cosine decay."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr)
    warmup = int(0.05 * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t, period = step - warmup, max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(t, period) / period))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Workload:
    """Model, data, optimizer and schedule for ``steps`` optimizer steps."""

    def __init__(self, name: str, steps: int, text_path: str | None = None, seed: int = 0) -> None:
        torch.manual_seed(seed)
        if name == "mlp":
            from trainctl.models.mlp import MLP

            self.x, self.y = digits_data()
            self.model = MLP((64,), 10, depth=2, width=512)
            self.batch_size, self.accum, self.lr = 256, 1, 1e-3
        else:
            from trainctl.models.gpt import GPT

            self.x, self.y = text_windows(text_path, 128, 64)
            self.model = GPT(256, 128, n_layer=4, n_head=4, d_model=128)
            self.batch_size, self.accum, self.lr = 16, 2, 3e-3
        self.steps = steps
        self.optimizer, self.scheduler = adamw_warmup_cosine(self.model, self.lr, steps)
        self.generator = torch.Generator().manual_seed(seed)

    def batches(self):
        """Reshuffled every epoch, the last (smaller) batch kept."""
        while True:
            for idx in torch.randperm(len(self.x), generator=self.generator).split(self.batch_size):
                yield self.x[idx], self.y[idx]

    def train(self, log_path: str, on_first_step=None) -> int:
        """Run the optimizer steps; returns the number of samples trained on."""
        model, optimizer = self.model, self.optimizer
        model.train()
        batches = self.batches()
        loss_sum, terms, samples = torch.zeros(()), 0, 0
        with open(log_path, "a") as log:
            for step in range(1, self.steps + 1):
                window = [next(batches) for _ in range(self.accum)]
                window_terms = sum(y.numel() for _, y in window)
                for x, y in window:
                    out = model(x)
                    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")
                    (loss / window_terms).backward()
                    loss_sum += loss.detach()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
                optimizer.step()
                self.scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                terms += window_terms
                samples += sum(len(x) for x, _ in window)
                if step == 1 and on_first_step is not None:
                    on_first_step()
                if step % LOG_EVERY == 0:
                    log.write(json.dumps({"step": step, "train/loss": float(loss_sum) / terms}) + "\n")
                    log.flush()
                    loss_sum.zero_()
                    terms = 0
        return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workload", choices=("mlp", "gpt"))
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--text", help="text file for the gpt workload")
    args = parser.parse_args()
    first = {}
    workload = Workload(args.workload, args.steps, args.text)
    tic = time.perf_counter()
    samples = workload.train(os.devnull, on_first_step=lambda: first.setdefault("t", seconds_since_process_start()))
    json.dump({"time_to_first_step_seconds": first["t"],
               "samples_per_second": samples / (time.perf_counter() - tic)}, sys.stdout)


if __name__ == "__main__":
    main()
