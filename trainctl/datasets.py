"""What a user's own data module imports from trainctl (`data=custom`).

    from trainctl.datasets import dataset_factory

    @dataset_factory
    def my_data(root: str, size: int = 32):
        return train_dataset, val_dataset      # or one dataset (split by data.val_fraction),
                                               # or {"train": ..., "val": ...}

A config may call only functions marked this way (or build a ``torch.utils.data.Dataset`` subclass), so a
crafted `data._target_` cannot reach any other function of an allowed module.
"""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def dataset_factory(fn: F) -> F:
    """Mark ``fn`` as a function `data._target_` may name."""
    setattr(fn, "__trainctl_dataset_factory__", True)
    return fn
