"""One owner per run directory.

A command that writes a run directory (`run`, `resume`, a sweep job, rank 0 of a multi-process job)
first takes an exclusive lock on `RUN_DIR/.trainctl.lock` and holds it until the process ends. The
kernel releases it when the process dies, however it dies, so a killed run can be resumed at once; a
second command on the same directory is refused (exit code 2) with the holder's pid, host and command.
Nothing is written into the directory before the lock is held, except the lock file itself.

The lock is re-entrant within a process: the job code can ask for the lock that `trainctl run` took
before Hydra created the directory's `.hydra/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, Optional

from trainctl.errors import ConfigError

LOCK_NAME = ".trainctl.lock"
_HELD: Dict[str, int] = {}
"""Run directories this process holds, by resolved path -> the lock file's descriptor. A module-level
table because it mirrors what the kernel holds for the process, which outlives any one object."""


class RunDirBusy(ConfigError):
    """The run directory is held by another process."""


def _key(run_dir: Path) -> str:
    return str(Path(run_dir).resolve())


def holds(run_dir: Path) -> bool:
    """Whether this process holds the lock of ``run_dir``."""
    return _key(run_dir) in _HELD


def _holder_text(fd: int) -> str:
    """Who holds a lock, from what the holder wrote into the lock file (bounded read)."""
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8"))
        where = f"pid {int(info['pid'])} on {info.get('host', '?')}"
        if info.get("rank") is not None:
            where += f", rank {info['rank']}"
        since = f", since {info['started']}" if info.get("started") else ""
        return f"{where}{since}: {str(info.get('command', '?'))[:300]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not said which yet)"


def _describe() -> str:
    argv = [os.path.basename(sys.argv[0]) if sys.argv else "trainctl", *sys.argv[1:]]
    if argv[0] in ("__main__.py", "-m", "trainctl", "cli.py"):
        argv[0] = "trainctl"
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "rank": int(os.environ["RANK"]) if "RANK" in os.environ else None,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(argv)})


def _open(run_dir: Path, key: Optional[str], create: bool) -> Optional[int]:
    try:
        if create:
            run_dir.mkdir(parents=True, exist_ok=True)
        elif not run_dir.is_dir():
            return None
        return os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise ConfigError(key, f"cannot write into {run_dir}: {exc.strerror or exc}",
                          "choose a directory you can write to" + (f", e.g. {key}=outputs/NAME" if key else "")) from None


def _try_lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _busy(run_dir: Path, fd: int, key: Optional[str]) -> RunDirBusy:
    holder = _holder_text(fd)
    os.close(fd)
    return RunDirBusy(key, f"{run_dir} is in use by another trainctl process ({holder})",
                      "wait until it ends (or stop it), or use another directory")


def acquire(run_dir: Path, key: Optional[str] = "hydra.run.dir") -> bool:
    """Take the lock of ``run_dir`` (creating the directory) for the rest of this process's life.
    Returns False when this process held it already; raises :class:`RunDirBusy` when another does."""
    if holds(run_dir):
        return False
    fd = _open(Path(run_dir), key, create=True)
    assert fd is not None
    if not _try_lock(fd):
        raise _busy(Path(run_dir), fd, key)
    os.ftruncate(fd, 0)
    os.pwrite(fd, _describe().encode("utf-8"), 0)
    _HELD[_key(run_dir)] = fd
    return True


def release(run_dir: Path) -> None:
    """Give the lock back (closing the descriptor releases it)."""
    fd = _HELD.pop(_key(run_dir), None)
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def owning(run_dir: Path, key: Optional[str] = "hydra.run.dir") -> Iterator[None]:
    """Hold the lock of ``run_dir`` for the block (or longer, if this process held it before)."""
    taken = acquire(run_dir, key)
    try:
        yield
    finally:
        if taken:
            release(run_dir)


def check_free(run_dir: Path, key: Optional[str] = "hydra.run.dir") -> None:
    """Refuse (RunDirBusy) if another process holds ``run_dir``; creates nothing. A launcher checks
    this before it starts the processes of a job, whose rank 0 then takes the lock itself."""
    if holds(run_dir) or not (Path(run_dir) / LOCK_NAME).exists():
        return
    fd = _open(Path(run_dir), key, create=False)
    if fd is None:
        return
    if not _try_lock(fd):
        raise _busy(Path(run_dir), fd, key)
    os.close(fd)  # closing drops the probe's lock


def is_untouched(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds nothing but Hydra's `.hydra/` and the lock file (a run that never started)."""
    try:
        return set(os.listdir(run_dir)) <= {".hydra", LOCK_NAME}
    except OSError:
        return False
