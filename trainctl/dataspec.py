"""The fields every `data` option shares (torch-free: the CLI validates specs without importing torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from trainctl.errors import check


def absolute(path: str, base_dir: str) -> str:
    """A user path made absolute against the directory the command was run from."""
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


@dataclass
class DataSpec:
    """Fields every dataset shares."""

    name: str = MISSING
    """Dataset; the option picked with `data=NAME`."""
    batch_size: int = 64
    """Samples per micro-batch (per process)."""
    eval_batch_size: Optional[int] = None
    """Samples per validation batch; null uses `data.batch_size`."""
    shuffle: bool = True
    """Reshuffle the training set every epoch (order seeded by `data.seed` and the epoch)."""
    drop_last: bool = False
    """Drop the last, smaller training batch of each epoch."""
    seed: int = 0
    """Seed of the train/validation split, of generated data and of the shuffling order."""
    num_workers: int = 0
    """DataLoader worker processes; 0 slices whole batches straight from in-memory tensors (fastest)."""
    persistent_workers: bool = True
    """Keep the DataLoader's workers alive from one epoch to the next (with num_workers > 0)."""
    prefetch_factor: Optional[int] = None
    """Batches each worker loads ahead (null: torch's default, 2)."""
    val_fraction: float = 0.2
    """Share of the data held out for validation."""

    def validate(self, key: str = "data") -> None:
        check(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1 (got {self.batch_size})",
              f"set {key}.batch_size=64")
        check(self.eval_batch_size is None or self.eval_batch_size >= 1, f"{key}.eval_batch_size",
              "must be >= 1 or null", f"set {key}.eval_batch_size=null")
        check(self.num_workers >= 0, f"{key}.num_workers", "must be >= 0", f"set {key}.num_workers=0")
        check(self.prefetch_factor is None or (self.prefetch_factor >= 1 and self.num_workers > 0),
              f"{key}.prefetch_factor", "must be >= 1, and needs data.num_workers > 0",
              f"set {key}.prefetch_factor=null")
        check(0 <= self.seed < 2**32, f"{key}.seed", f"must be in 0 .. 2**32-1 (got {self.seed})", f"set {key}.seed=0")
        check(0.0 < self.val_fraction < 1.0, f"{key}.val_fraction",
              f"must be between 0 and 1 (got {self.val_fraction})", f"set {key}.val_fraction=0.2")

    def resolve_paths(self, base_dir: str) -> None:
        """Make user paths absolute against the directory the command was run from."""
