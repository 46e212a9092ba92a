"""Processes: how a run's processes start and which of them owns its run directory.

- One process: the run directory's lock (:mod:`trainctl.rundir`) is taken before anything is written,
  and a new run never writes into another run's directory.
- Under torchrun (started by the user): every rank joins the process group; rank 0 decides the run
  directory, takes its lock and tells the others, so a job has one directory and one owner.
- Started by trainctl (`parallelism.nproc_per_node=N`): this process fixes the directory, refuses one
  in use, and runs torchrun through :mod:`trainctl.torchrun`, so torchrun and the ranks end with it; if
  rank 0 dies without recording the end of the run, this process records it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from trainctl import rundir
from trainctl.errors import ConfigError
from trainctl.parallel import ParallelismSpec, launched_world_size

if TYPE_CHECKING:
    from trainctl.parallel import Distributed
    from trainctl.spec import RunSpec

LAUNCHED_BY_TRAINCTL = "TRAINCTL_LAUNCHED"
"""Set in the environment of the ranks trainctl starts, so they do not start torchrun again."""
AGENT_PID = "TRAINCTL_AGENT_PID"
"""The pid of the torchrun agent trainctl started (the ranks' parent)."""


# --- who owns the run directory ---------------------------------------------------------------------

def check_fresh_run_dir(run_dir: Path) -> None:
    """A new run never writes into a directory that already holds another run's results (continuing
    one is `trainctl resume RUN_DIR` or `checkpoint.resume=auto`)."""
    if (run_dir / "summary.json").exists():
        raise ConfigError("hydra.run.dir", f"{run_dir} already holds a run (it has a summary.json)",
                          f"continue it with `trainctl resume {run_dir}` (or checkpoint.resume=auto), "
                          "or choose a new directory, e.g. hydra.run.dir=outputs/my-run-2")


def own_run_dir(run_dir: Path, spec: "RunSpec") -> bool:
    """Take the lock of the directory a run writes - refusing first, without creating anything, a
    directory that holds another run - and check it again under the lock. Returns whether the lock was
    taken here (False: this process held it already)."""
    fresh = spec.checkpoint.resume != "auto"
    if fresh:
        check_fresh_run_dir(run_dir)
    taken = rundir.acquire(run_dir)
    if fresh:
        check_fresh_run_dir(run_dir)  # a run that started meanwhile, now that nobody else can
    return taken


def discard_if_untouched(run_dir: Path) -> None:
    """Remove a run directory holding nothing but Hydra's `.hydra/` and the lock (a run that never
    started), unless another process owns it."""
    import contextlib
    import shutil

    if not run_dir.is_dir():
        return
    with contextlib.suppress(OSError, ConfigError), rundir.owning(run_dir, None):
        if rundir.is_untouched(run_dir):
            shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
            (run_dir / rundir.LOCK_NAME).unlink(missing_ok=True)
            run_dir.rmdir()


def join(spec: "RunSpec", run_dir: Optional[Path]) -> Tuple[Optional["Distributed"], Optional[Path]]:
    """Join the process group of a job launched under torchrun: (this rank's place, the run directory
    rank 0 decided and owns), or (None, ``run_dir``) for one process. A problem rank 0 finds with the
    directory reaches every rank, so none is left waiting."""
    from trainctl import parallel
    from trainctl.build import resolve_device

    dist = parallel.start(spec.parallelism, resolve_device(spec.trainer.device).type)
    if dist is None:
        return None, run_dir
    problem = None
    if dist.is_main:
        try:
            if run_dir is None:
                raise ConfigError("hydra.run.dir", "cannot be decided before the processes start",
                                  "set hydra.run.dir=outputs/NAME")
            own_run_dir(run_dir, spec)
        except ConfigError as error:
            problem = (error.key, error.message, error.fix)
    decided, problem = dist.broadcast((str(run_dir), problem))
    if problem is not None:
        dist.close()
        raise ConfigError(*problem)
    return dist, Path(decided)


# --- starting the processes ---------------------------------------------------------------------------

def check_launch(spec: ParallelismSpec) -> None:
    """Refuse a strategy that does not match how the process was started."""
    world = launched_world_size()
    if world > 1 and spec.name == "single":
        raise ConfigError("parallelism", f"started as one of {world} processes, but parallelism=single",
                          "add parallelism=ddp to the command")
    if world == 1 and spec.name != "single" and spec.nproc_per_node is None and "RANK" not in os.environ:
        raise ConfigError("parallelism", f"parallelism={spec.name} needs several processes",
                          f"launch with `torchrun --nproc_per_node=N -m trainctl run parallelism={spec.name} ...` "
                          "or set parallelism.nproc_per_node=N")


def should_self_launch(spec: ParallelismSpec) -> bool:
    return spec.nproc_per_node is not None and LAUNCHED_BY_TRAINCTL not in os.environ and "RANK" not in os.environ


def torchrun_command(spec: ParallelismSpec, overrides: Sequence[str], run_dir: str) -> List[str]:
    """The torchrun command that starts the ranks of a run whose directory is already decided (run through
    :mod:`trainctl.torchrun`, so it ends when this process does)."""
    resume = ["checkpoint.resume=auto"] if spec.max_restarts else []
    command = [sys.executable, "-m", "trainctl.torchrun", str(os.getpid()), f"--nproc_per_node={spec.nproc_per_node}",
               f"--nnodes={spec.nnodes}", f"--max_restarts={spec.max_restarts}"]
    if spec.nnodes > 1:
        command += [f"--node_rank={spec.node_rank}", f"--rdzv_endpoint={spec.rdzv_endpoint}", "--rdzv_backend=static"]
    else:
        host, port = spec.rdzv_endpoint.rsplit(":", 1) if spec.rdzv_endpoint else ("localhost", str(free_port()))
        command += [f"--master_addr={host}", f"--master_port={port}"]
    return command + ["-m", "trainctl", "run", *overrides, *resume, f"hydra.run.dir={run_dir}"]


def free_port() -> int:
    """A TCP port of this machine that nothing listens on (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return int(sock.getsockname()[1])


def self_launch(spec: ParallelismSpec, overrides: Sequence[str], run_dir: str) -> int:
    """Run torchrun as a child process and return its exit code. Ctrl-C from a terminal reaches the
    ranks directly; a SIGTERM sent to trainctl (a scheduler ending the job) is passed on to torchrun,
    which passes it to the ranks, and they stop together and save a checkpoint."""
    import subprocess

    command = torchrun_command(spec, overrides, run_dir)
    print(f"trainctl: starting {spec.nproc_per_node * spec.nnodes} processes in {run_dir}", file=sys.stderr)
    env = {**os.environ, LAUNCHED_BY_TRAINCTL: "1"}
    proc = subprocess.Popen(command, env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # the ranks got the terminal's SIGINT too; wait for their clean stop
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """Get ``sig`` when the process ``parent`` (this process's parent) ends, however it ends: the kernel's
    parent-death signal on Linux, a thread watching the parent elsewhere. If it has ended already, now."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            armed = ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if not armed:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), sig)
        threading.Thread(target=watch, name="trainctl-parent-watch", daemon=True).start()
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def follow_launcher() -> None:
    """A rank under torchrun stops (SIGTERM: a checkpoint at the next agreed step) when torchrun's agent
    dies, instead of training on unsupervised."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and AGENT_PID not in os.environ:
        return
    die_with_parent(int(os.environ.get(AGENT_PID) or os.getppid()))


def run_launched(spec: "RunSpec", run_dir: Path, overrides: Sequence[str]) -> Dict[str, Any]:
    """Run one job as torchrun processes in ``run_dir`` and return the summary rank 0 wrote (or, when
    rank 0 died without writing one, the failure this process records)."""
    from trainctl.checkpoint import committed
    from trainctl.resume import check_changes, find_resume_source
    from trainctl.runs import RunRecord
    from trainctl.sweep import record_failure

    par = spec.parallelism
    if spec.checkpoint.resume != "auto":
        check_fresh_run_dir(run_dir)
    rundir.check_free(run_dir)  # rank 0 takes the lock; refuse at once if another process has it
    source = find_resume_source(spec, run_dir)  # a checkpoint the ranks cannot use is refused here, once
    if source is not None:
        check_changes(source, spec, (par.nproc_per_node or 1) * par.nnodes)
    code = self_launch(par, overrides, str(run_dir))
    record = RunRecord.load(run_dir)
    if code != 0 and record.status in ("running", "unknown"):  # rank 0 died without writing its summary
        saved = committed(run_dir / "checkpoints")
        record_failure(run_dir, "failed", f"torchrun exited with code {code} before rank 0 recorded the end of "
                       f"the run (a process was killed or crashed); {run_dir / 'trainctl.log'} has its log",
                       steps=record.steps or 0, last_checkpoint=str(saved[-1]) if saved else None)
        record = RunRecord.load(run_dir)
    return record.summary or {"stop_reason": "failed", "best_metric": None, "error": f"torchrun exited with {code}"}
