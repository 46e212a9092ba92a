"""Peak memory and start-up of `data=tokens` on a corpus far larger than the batches: a 2 GiB uint16 token
file (1 Gi tokens), the built-in GPT trained for a few dozen steps in a fresh `trainctl run` process.

Reported per setting: the peak resident set of the training process (summary.json's peak_memory_mib,
ru_maxrss of that process) and of the largest process of the run including DataLoader workers
(ru_maxrss of the waited-for descendants, measured by a wrapper process), the time from process start to
the end of the first optimizer step (summary.json; it includes the check of every token id when no
meta.json vouches for the file), and the step time. The baseline is the same run on a 4 MiB file: the
difference is what the corpus's size costs. The token file is written once, in chunks;
it sits in the page cache afterwards (warm reads: a cold disk adds its read time to the first scan).

A second part reads random windows straight from the file with :class:`trainctl.tokens_data.TokenReader`
and reports the process's file-backed resident set, with and without handing the pages back to the
kernel every few windows (why the reader does it).

    python benchmarks/token_memory.py [--gib 2] [--steps 50] [--vocab 8192] [--seq-len 64] [--batch-size 8]
                                      [--dir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB = 8192
"""The default vocabulary: with GPT-2's 50,257 (--vocab 50257) the logits of a batch of 8 x 64 and their
gradients alone take ~0.6 GiB, which says nothing about the data."""
SEQ_LEN = 64
BATCH = 8
SETTINGS = {  # name: (overrides, whether a meta.json vouches for the files: no scan at start)
    "baseline: 4 MiB file": (["data.sampling=random", "+small"], True),
    "random, scan at start": (["data.sampling=random"], False),
    "random": (["data.sampling=random"], True),
    "random, 2 workers": (["data.sampling=random", "data.num_workers=2"], True),
    "sequential": (["data.sampling=sequential"], True),
    "sequential, 2 workers": (["data.sampling=sequential", "data.num_workers=2"], True),
}


def write_tokens(path: Path, n_tokens: int, seed: int = 0) -> None:
    """Random tokens below VOCAB, written 32 Mi tokens at a time (a shifted copy of one random block)."""
    block = np.random.default_rng(seed).integers(0, VOCAB, 1 << 25, dtype=np.uint32)
    with open(path, "wb") as handle:
        for i, start in enumerate(range(0, n_tokens, len(block))):
            part = (block[: min(len(block), n_tokens - start)] + i * 7919) % VOCAB
            part.astype(np.uint16).tofile(handle)


def write_meta(directory: Path, train_tokens: int, val_tokens: int) -> None:
    """meta.json as `trainctl prepare-tokens` writes it (its token counts let the run skip the scan)."""
    splits = {s: {"file": f"{s}.bin", "tokens": n, "max_token_id": VOCAB - 1}
              for s, n in (("train", train_tokens), ("val", val_tokens))}
    (directory / "meta.json").write_text(json.dumps({"vocab_size": VOCAB, "dtype": "uint16", "splits": splits}))


def child(command: list) -> None:
    """Run ``command`` and print the peak RSS (KiB) of the largest process under it."""
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stderr[-3000:])
    print(json.dumps({"returncode": out.returncode,
                      "tree_peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))


def train(data: Path, overrides: list, meta: bool, steps: int, run_dir: Path) -> dict:
    if "+small" in overrides:  # the same run on a corpus of 2 Mi tokens: what the model alone costs
        overrides = [o for o in overrides if o != "+small"]
        data = data.parent / "small"
        if not data.is_dir():
            data.mkdir()
            write_tokens(data / "train.bin", 1 << 21)
            write_tokens(data / "val.bin", 1 << 20, seed=1)
    (data / "meta.json").unlink(missing_ok=True)
    if meta:
        write_meta(data, (data / "train.bin").stat().st_size // 2, (data / "val.bin").stat().st_size // 2)
    command = [sys.executable, "-m", "trainctl", "run", "model=gpt", "data=tokens", f"data.path={data}",
               "data.dtype=uint16", f"data.vocab_size={VOCAB}", f"data.seq_len={SEQ_LEN}", f"data.batch_size={BATCH}",
               "data.max_val_windows=256", f"trainer.max_steps={steps}", "trainer.max_epochs=null",
               "checkpoint=off", "logging.tensorboard=false", "logging.progress=none",
               *overrides, f"hydra.run.dir={run_dir}"]
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(command)], capture_output=True, text=True)
    wrapper = json.loads(out.stdout.strip().splitlines()[-1])
    if wrapper["returncode"]:
        raise SystemExit(f"trainctl run failed:\n{out.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    scans = re.findall(r"checked the [\d,]+ tokens of \S+ in ([\d.]+) s", (run_dir / "trainctl.log").read_text())
    return {"range_scan_s": sum(float(s) for s in scans),"peak_rss_mib": summary["peak_memory_mib"], "tree_peak_rss_mib": wrapper["tree_peak_kib"] / 1024,
            "time_to_first_step_s": summary["time_to_first_step_seconds"],
            "step_ms": summary["step_seconds"] * 1e3, "steps": summary["steps"]}


def resident_file_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reader_only(path: Path, batches: int) -> dict:
    """File-backed RSS after reading ``batches`` batches of random windows, with and without releasing."""
    from trainctl import tokens_data

    n = path.stat().st_size // 2
    file = tokens_data.TokenFile(str(path), "uint16", 0, n)
    found = {}
    for name, every in (("released every 16 windows", 16), ("never released", 1 << 62)):
        tokens_data.RELEASE_EVERY_WINDOWS = every
        reader = tokens_data.TokenReader(file)
        rng = np.random.default_rng(0)
        before, started = resident_file_mib(), time.perf_counter()
        for _ in range(batches):
            reader.windows(rng.integers(0, n - SEQ_LEN, BATCH), SEQ_LEN)
        found[name] = {"rss_file_growth_mib": round(resident_file_mib() - before, 1),
                       "us_per_batch": round((time.perf_counter() - started) / batches * 1e6, 1)}
        del reader
    tokens_data.RELEASE_EVERY_WINDOWS = 16
    return found


def main() -> None:
    global VOCAB, SEQ_LEN, BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="size of train.bin (GiB)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the token files go (needs the space)")
    parser.add_argument("--keep", action="store_true", help="keep the token files")
    parser.add_argument("--vocab", type=int, default=VOCAB, help=f"vocabulary (default {VOCAB})")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    VOCAB, SEQ_LEN, BATCH = args.vocab, args.seq_len, args.batch_size
    n_tokens = int(args.gib * 2**30) // 2
    free = shutil.disk_usage(args.dir).free
    if free < n_tokens * 2 + (1 << 30):
        raise SystemExit(f"{args.dir} has {free / 2**30:.1f} GiB free; {args.gib + 1:.1f} GiB are needed (--dir)")
    scratch = Path(tempfile.mkdtemp(prefix="token-memory-", dir=args.dir))
    try:
        data = scratch / "data"
        data.mkdir()
        started = time.perf_counter()
        write_tokens(data / "train.bin", n_tokens)
        write_tokens(data / "val.bin", 1 << 20, seed=1)
        print(f"wrote {n_tokens:,} tokens ({n_tokens * 2 / 2**30:.2f} GiB) in {time.perf_counter() - started:.1f} s; "
              f"GPT d_model 128, 4 layers, vocab {VOCAB}, seq_len {SEQ_LEN}, batch {BATCH}, {args.steps} steps", flush=True)
        results = {}
        for name, (overrides, meta) in SETTINGS.items():
            results[name] = train(data, overrides, meta, args.steps, scratch / name.replace(" ", "_").replace(",", ""))
            r = results[name]
            print(f"{name:24s} peak RSS {r['peak_rss_mib']:5.0f} MiB (largest process incl. workers "
                  f"{r['tree_peak_rss_mib']:5.0f} MiB)  first step after {r['time_to_first_step_s']:4.1f} s "
                  f"(range scan {r['range_scan_s']:.1f} s)  {r['step_ms']:5.0f} ms/step", flush=True)
        results["reader only, 2000 batches"] = reader_only(data / "train.bin", 2000)
        for name, r in results["reader only, 2000 batches"].items():
            print(f"reader only, 2000 batches of {BATCH} random windows, {name:26s}: file-backed RSS "
                  f"+{r['rss_file_growth_mib']:.0f} MiB, {r['us_per_batch']:.0f} us/batch", flush=True)
        print(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"kept {scratch}")


if __name__ == "__main__":
    main()
