"""Run the trainctl CLI with a fault injected, as a separate process the tests can kill.

    python tests/faults.py kill-after-step K  -- run ARGS...   # SIGKILL itself right after optimizer step K
    python tests/faults.py term-after-step K  -- run ARGS...   # SIGTERM itself right after optimizer step K
                                                               # (before that step's evaluation and checkpoint)
    python tests/faults.py term-after-boundary K -- run ARGS... # SIGTERM itself once step K's boundary is done
                                                               # (after its checkpoint decision)
    python tests/faults.py stall-save N FLAG  -- run ARGS...   # the N-th state.pt write stops half-way,
                                                               # touches FLAG and hangs (the test kills it)
    torchrun ... tests/faults.py raise-once K RANK FLAG -- run ARGS...
                                  # rank RANK raises after optimizer step K unless FLAG exists (it creates it)
"""

from __future__ import annotations

import os
import signal
import sys
import time


def signal_after(method: str, step: int, sig: int) -> None:
    """Send ``sig`` to this process once ``Runner.<method>`` returns with the run at ``step``."""
    from trainctl.runner import Runner

    original = getattr(Runner, method)

    def wrapped(self, *args):
        original(self, *args)
        if self.state.step == step:
            os.kill(os.getpid(), sig)

    setattr(Runner, method, wrapped)


def stall_save(nth: int, flag: str) -> None:
    import io

    import torch

    original = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] < nth:
            return original(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(f, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        open(flag, "w").close()
        while True:
            time.sleep(1)

    torch.save = save


def raise_once(step: int, rank: int, flag: str) -> None:
    from trainctl.runner import Runner

    original = Runner.train_step

    def train_step(self, window):
        original(self, window)
        if self.state.step == step and int(os.environ.get("RANK", "0")) == rank and not os.path.exists(flag):
            open(flag, "w").close()
            raise RuntimeError(f"simulated failure of rank {rank} after step {step}")

    Runner.train_step = train_step


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--")
    fault, params, cli = args[0], args[1:split], args[split + 1:]
    if fault == "kill-after-step":
        signal_after("train_step", int(params[0]), signal.SIGKILL)
    elif fault == "term-after-step":
        signal_after("train_step", int(params[0]), signal.SIGTERM)
    elif fault == "term-after-boundary":
        signal_after("_after_step", int(params[0]), signal.SIGTERM)
    elif fault == "stall-save":
        stall_save(int(params[0]), params[1])
    elif fault == "raise-once":
        raise_once(int(params[0]), int(params[1]), params[2])
    else:
        raise SystemExit(f"unknown fault {fault}")
    from trainctl.cli import main as cli_main

    cli_main(cli)


if __name__ == "__main__":
    main()
