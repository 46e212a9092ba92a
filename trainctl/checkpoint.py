"""The `checkpoint` config group and checkpoint files: how a checkpoint is written and committed, where
`last` and `best` point, which old checkpoints are pruned, and how one is found, verified and read.

Layout inside a run directory::

    checkpoints/step-00000460/   model.safetensors  state.pt  spec.yaml  meta.json  COMMITTED
    checkpoints/last -> step-00000460
    checkpoints/best -> step-00000391

`state.pt` holds the optimizer, scheduler, precision (grad scaler), callback and run states, the
training-loss meter and the RNG states; it is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from trainctl.errors import check, check_choice
from trainctl.files import (COMMIT_MARKER, SMALL_FILE_BYTES, SPEC_FILE_BYTES, CheckpointError, commit_dir,
                            failure_text, point, read_bounded, read_text_bounded, safe_torch_load, save_weights,
                            verify_dir, write_json, write_text)

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("trainctl")

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class CheckpointSpec:
    """When checkpoints are saved, how many are kept, and where a run resumes from."""

    every_n_epochs: Optional[int] = 1
    """Save when every N-th epoch ends; null disables."""
    every_n_steps: Optional[int] = None
    """Save every N optimizer steps; null disables."""
    save_last: bool = True
    """Save when training ends and when it is interrupted (SIGINT/SIGTERM), so it can resume."""
    save_best: bool = True
    """Save whenever the monitored validation metric improves; `checkpoints/best` points to it."""
    monitor: str = "auto"
    """Metric that defines `best` (auto: trainer.monitor)."""
    mode: str = "auto"
    """min or max for `checkpoint.monitor` (auto: from the metric, as for trainer.mode)."""
    keep_last_k: Optional[int] = 2
    """Step checkpoints kept (the newest k, plus the one `best` points to); null keeps all."""
    resume: Optional[str] = None
    """null: start fresh; auto: continue from this run directory's newest valid checkpoint if it has one;
    PATH: start from a checkpoint directory (or a run directory's newest checkpoint)."""
    on_error: str = "stop"
    """When a save fails (disk full, permissions): stop (end the run cleanly, keeping the previous
    checkpoint) or continue (report it and train on)."""

    def validate(self, key: str = "checkpoint") -> None:
        for name in ("every_n_epochs", "every_n_steps", "keep_last_k"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{key}.{name}", f"must be >= 1 or null (got {value})",
                  f"set {key}.{name}=null")
        check_choice(self.mode, ("auto", "min", "max"), f"{key}.mode")
        check_choice(self.on_error, ("stop", "continue"), f"{key}.on_error")
        if self.resume not in (None, "auto"):
            path = Path(self.resume)
            check(path.exists(), f"{key}.resume", f"{path} does not exist",
                  f"point {key}.resume at a run directory or a checkpoints/step-N directory, or use auto")

    def resolve_paths(self, base_dir: str) -> None:
        if self.resume not in (None, "auto"):
            self.resume = os.path.normpath(os.path.join(base_dir, os.path.expanduser(self.resume)))

    @property
    def enabled(self) -> bool:
        return bool(self.every_n_epochs or self.every_n_steps or self.save_last or self.save_best)


# --- finding and reading checkpoints -----------------------------------------------------------------

def step_of(path: Path) -> int:
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def committed(directory: Path) -> List[Path]:
    """Step checkpoints that carry a commit marker, oldest first (contents not yet verified)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if STEP_DIR.match(p.name) and (p / COMMIT_MARKER).is_file()]
    return sorted(found, key=step_of)


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: Dict[str, Any]
    spec_yaml: str
    meta: Dict[str, Any]

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def sharded(self) -> bool:
        """Saved by FSDP: one shard of weights and optimizer state per rank (torch.distributed.checkpoint)."""
        return bool(self.meta.get("sharded"))


STATE_KEYS = {"run": dict, "scheduler": dict, "precision": dict, "checkpointer": dict, "callbacks": dict,
              "meter": dict}
"""What every `state.pt` holds (plus `rng`, and `optimizer` unless the checkpoint is sharded)."""


def _meta(path: Path) -> Dict[str, Any]:
    meta = json.loads(read_bounded(path / "meta.json", SMALL_FILE_BYTES, follow_symlinks=False))
    if not isinstance(meta, dict):
        raise ValueError("meta.json is not a JSON object")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"meta.json has no step (got {step!r})")
    world = meta.get("world_size", 1)
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"meta.json has an invalid world_size ({world!r})")
    if not isinstance(meta.get("sharded", False), bool):
        raise ValueError("meta.json has an invalid 'sharded' flag")
    return meta


def check_state(state: Any, sharded: bool) -> None:
    """The layout of a checkpoint's `state.pt`: the parts a resume reads, each of the right kind."""
    if not isinstance(state, dict):
        raise ValueError("state.pt does not hold a dictionary")
    wanted = dict(STATE_KEYS, **({} if sharded else {"optimizer": dict}))
    for key, kind in wanted.items():
        if not isinstance(state.get(key), kind):
            raise ValueError(f"state.pt has no '{key}' part")
    if "rng" not in state:
        raise ValueError("state.pt has no 'rng' part")
    run = state["run"]
    for key in ("step", "epoch", "batch_in_epoch", "samples_seen"):
        if not isinstance(run.get(key), int) or isinstance(run.get(key), bool) or run[key] < 0:
            raise ValueError(f"state.pt's run state has no valid '{key}'")


def read_checkpoint(path: Path) -> Checkpoint:
    """Verify a checkpoint directory against its marker, then read it and check its layout (weights
    are loaded later). Every problem is a CheckpointError naming the checkpoint."""
    path = path.resolve()
    sharded = (path / ".metadata").exists()
    problem = verify_dir(path, ("state.pt", "spec.yaml", "meta.json", ".metadata" if sharded else "model.safetensors"))
    if problem:
        raise CheckpointError(f"{path} is not a usable checkpoint: {problem}")
    try:
        meta = _meta(path)
        if bool(meta.get("sharded")) != sharded:
            raise ValueError("meta.json and the files disagree on whether the checkpoint is sharded")
        spec_yaml = read_text_bounded(path / "spec.yaml", SPEC_FILE_BYTES, follow_symlinks=False)
    except OSError as exc:
        raise CheckpointError(f"{path} is not a usable checkpoint: {exc.filename or ''} {exc.strerror}") from None
    except ValueError as exc:
        raise CheckpointError(f"{path} is not a usable checkpoint: {exc}") from None
    state = safe_torch_load(path / "state.pt")
    try:
        check_state(state, sharded)
    except ValueError as exc:
        raise CheckpointError(f"{path} is not a usable checkpoint: {exc}") from None
    if state["run"]["step"] != meta["step"]:
        raise CheckpointError(f"{path} is not a usable checkpoint: state.pt is of step {state['run']['step']} "
                              f"and meta.json of step {meta['step']}")
    return Checkpoint(path, meta["step"], state, spec_yaml, meta)


def newest_valid(directory: Path) -> Optional[Checkpoint]:
    """The newest checkpoint that verifies; broken ones are skipped with a warning."""
    for path in reversed(committed(directory)):
        try:
            return read_checkpoint(path)
        except CheckpointError as exc:
            if "refusing to load" in str(exc):
                raise
            log.warning("%s; falling back to the previous checkpoint", exc)
    return None


def find_source(path: Path) -> Checkpoint:
    """A checkpoint named by the user: a checkpoint directory (strict) or a run directory (its newest)."""
    if (path / "checkpoints").is_dir() or path.name == "checkpoints":
        directory = path if path.name == "checkpoints" else path / "checkpoints"
        found = newest_valid(directory)
        if found is None:
            raise CheckpointError(f"{directory} holds no complete checkpoint")
        return found
    return read_checkpoint(path)


# --- RNG states --------------------------------------------------------------------------------------

def rng_state() -> Dict[str, Any]:
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- saving --------------------------------------------------------------------------------------------

class CheckpointStore:
    """The checkpoint files of a run directory: writing one into a temporary directory and committing it,
    the `last`/`best` pointers, pruning, and clearing what a killed save left behind. When to save is
    :class:`trainctl.checkpointing.Checkpoints`'s decision."""

    def __init__(self, directory: Path, keep_last_k: Optional[int]) -> None:
        self.directory = directory
        self.keep_last_k = keep_last_k

    def clean_stale(self) -> None:
        """Remove what a killed save left behind (temporary and half-swapped directories)."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if path.name.startswith((".tmp-", ".trash-", ".last.tmp", ".best.tmp")):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def save(self, step: int, model: "nn.Module", state: Dict[str, Any], spec_yaml: str,
             meta: Dict[str, Any], best: bool) -> Path:
        """Write, commit, repoint `last` (and `best`), then prune. Raises CheckpointError on I/O failure."""
        tmp = self.begin(step)
        try:
            save_weights(model, tmp / "model.safetensors", {"step": str(step)})
        except Exception as exc:  # OSError, or a library's own error for the same disk problem
            self.discard(tmp)
            raise CheckpointError(f"could not save the checkpoint of step {step} in {self.directory}: "
                                  f"{failure_text(exc, self.directory)}") from exc
        return self.finish(tmp, step, state, spec_yaml, meta, best)

    def begin(self, step: int) -> Path:
        """A fresh temporary directory for the checkpoint of ``step`` (the weights go in first)."""
        tmp = self.directory / f".tmp-step-{step:08d}-{os.getpid()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as exc:
            raise CheckpointError(f"could not save the checkpoint of step {step} in {self.directory}: "
                                  f"{failure_text(exc, self.directory)}") from exc
        return tmp

    def finish(self, tmp: Path, step: int, state: Dict[str, Any], spec_yaml: str, meta: Dict[str, Any],
               best: bool) -> Path:
        """Add the state beside the weights in ``tmp``, commit it, repoint `last` (and `best`), prune."""
        import torch

        name = f"step-{step:08d}"
        try:
            torch.save(state, tmp / "state.pt")
            write_text(tmp / "spec.yaml", spec_yaml)
            write_json(tmp / "meta.json", {**meta, "step": step})
            commit_dir(tmp, self.directory / name)
            point(self.directory / "last", name)
            if best:
                point(self.directory / "best", name)
        except Exception as exc:  # torch reports a full disk as a RuntimeError
            self.discard(tmp)
            raise CheckpointError(f"could not save the checkpoint of step {step} in {self.directory}: "
                                  f"{failure_text(exc, self.directory)}") from exc
        self.prune()
        return self.directory / name

    @staticmethod
    def discard(tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def _target(self, pointer: str) -> Optional[str]:
        link = self.directory / pointer
        return os.readlink(link) if link.is_symlink() else None

    def prune(self) -> None:
        """Keep the newest `keep_last_k` checkpoints plus those `last` and `best` point to."""
        k = self.keep_last_k
        if k is None:
            return
        keep = {self._target("last"), self._target("best")}
        for path in committed(self.directory)[:-k]:
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)
