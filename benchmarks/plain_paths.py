"""Plain PyTorch scripts for the four data paths of `paths.py`, written the way one would by hand: the
data loaded with the usual tools (scikit-learn's `load_digits` and `make_classification`, NumPy's
`loadtxt`, the file's bytes), the same network classes, AdamW with weight decay on matrices only,
linear warmup + cosine decay, optional clipping, a loss reading every 10 steps written to a JSON-lines
file, and an evaluation after every epoch, in batches of the training batch size as trainctl's default,
computing what trainctl reports (loss, accuracy and macro F1 for classes; loss and perplexity for text),
recorded as trainctl records it: a JSON line in the log file and a progress line on stdout. Nothing is imported from trainctl but the network classes.

    python benchmarks/plain_paths.py default|synthetic|csv|text [--csv FILE] [--text FILE] [--log FILE]

It prints one JSON object: seconds from process start to the end of the first optimizer step, the
seconds of the whole loop (training and evaluations), the evaluation seconds, samples trained on.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_loop import adamw_warmup_cosine, seconds_since_process_start  # noqa: E402

LOG_EVERY = 10
SETTINGS = {  # batch, epochs, lr, clip, width
    "default": (64, 30, 1e-3, None, 256),
    "synthetic": (256, 2, 1e-3, 1.0, 512),
    "csv": (128, 5, 1e-3, 1.0, 256),
    "text": (16, 2, 3e-3, 1.0, None),
}


def standardized(x_train: np.ndarray, x_val: np.ndarray):
    mean, std = x_train.mean(0), x_train.std(0)
    std = np.where(std > 0, std, 1.0)
    return (x_train - mean) / std, (x_val - mean) / std


def tabular(path: str, args: argparse.Namespace):
    from sklearn.model_selection import train_test_split

    if path == "default":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y = bunch.data / 16.0, bunch.target
    elif path == "synthetic":
        from sklearn.datasets import make_classification

        x, y = make_classification(n_samples=70000, n_features=64, n_informative=10, n_redundant=0, n_classes=10,
                                   flip_y=0.1, random_state=0)
    else:
        table = np.loadtxt(args.csv, delimiter=",", skiprows=1)
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
    train, val = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y)
    x_train, x_val = (x[train], x[val]) if path == "default" else standardized(x[train], x[val])
    as_tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x_train, y[train], x_val, y[val])]
    return as_tensors[0].float(), as_tensors[1].long(), as_tensors[2].float(), as_tensors[3].long()


def text(file: str):
    tokens = torch.from_numpy(np.frombuffer(Path(file).read_bytes(), dtype=np.uint8).copy())
    cut = int(len(tokens) * 0.9)

    def windows(part: torch.Tensor):
        starts = torch.arange(0, len(part) - 128, 128)
        chunk = part[starts.unsqueeze(1) + torch.arange(129)].long()
        return chunk[:, :-1], chunk[:, 1:]
    return (*windows(tokens[:cut]), *windows(tokens[cut:]))


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int, batch: int) -> dict:
    model.eval()
    loss, terms = torch.zeros(()), 0
    confusion = torch.zeros(classes * classes, dtype=torch.long) if classes else None
    with torch.inference_mode():
        for xb, yb in zip(x.split(batch), y.split(batch)):
            out = model(xb)
            loss += F.cross_entropy(out.reshape(-1, out.shape[-1]), yb.reshape(-1), reduction="sum")
            terms += yb.numel()
            if classes:
                confusion += torch.bincount(yb * classes + out.argmax(-1), minlength=classes * classes)
    model.train()
    result = {"loss": float(loss) / terms}
    if classes:
        c = confusion.view(classes, classes)
        tp, fp, fn = c.diag(), c.sum(0) - c.diag(), c.sum(1) - c.diag()
        present = (tp + fp + fn) > 0
        result["acc"] = float(tp.sum()) / float(c.sum())
        result["f1"] = float((2 * tp / (2 * tp + fp + fn).clamp(min=1))[present].float().mean())
    else:
        result["ppl"] = math.exp(result["loss"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", choices=sorted(SETTINGS))
    parser.add_argument("--csv")
    parser.add_argument("--text")
    parser.add_argument("--log", default=os.devnull, help="the JSON-lines file (default: nowhere)")
    args = parser.parse_args()
    batch, epochs, lr, clip, width = SETTINGS[args.path]
    torch.manual_seed(0)
    if args.path == "text":
        from trainctl.models.gpt import GPT

        x, y, x_val, y_val = text(args.text)
        model, classes = GPT(256, 128, n_layer=2, n_head=4, d_model=128), 0
    else:
        from trainctl.models.mlp import MLP

        x, y, x_val, y_val = tabular(args.path, args)
        classes = int(y.max()) + 1
        model = MLP(tuple(x.shape[1:]), classes, depth=2, width=width, dropout_p=0.1 if args.path == "default" else 0.0)
    optimizer, scheduler = adamw_warmup_cosine(model, lr, math.ceil(len(x) / batch) * epochs)
    generator = torch.Generator().manual_seed(0)
    first, step, samples, eval_seconds = None, 0, 0, 0.0
    loss_sum, terms = torch.zeros(()), 0
    tic = time.perf_counter()
    with open(args.log, "a") as log:
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=generator).split(batch):
                xb, yb = x[idx], y[idx]
                out = model(xb)
                loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), yb.reshape(-1), reduction="sum")
                (loss / yb.numel()).backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                terms += yb.numel()
                samples += len(xb)
                step += 1
                if first is None:
                    first = seconds_since_process_start()
                if step % LOG_EVERY == 0:
                    log.write(json.dumps({"step": step, "train/loss": float(loss_sum) / terms}) + "\n")
                    log.flush()
                    loss_sum.zero_()
                    terms = 0
            started = time.perf_counter()
            metrics = evaluate(model, x_val, y_val, classes, batch)
            log.write(json.dumps({"step": step, **metrics}) + "\n")
            log.flush()
            print(f"step {step}  " + "  ".join(f"val/{k} {v:.4f}" for k, v in metrics.items()), file=sys.stderr, flush=True)
            eval_seconds += time.perf_counter() - started
    json.dump({"time_to_first_step_seconds": first, "loop_seconds": time.perf_counter() - tic,
               "eval_seconds": eval_seconds, "evaluations": epochs, "samples": samples, "final": metrics}, sys.stdout)


if __name__ == "__main__":
    main()
