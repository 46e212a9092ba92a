"""The torch side of `data=tokens`: :class:`TokenWindows`, the :class:`~trainctl.batches.Source` that
reads each batch's windows from a token file (see :mod:`trainctl.tokens_data` for which windows, how they
are read and why a run resumed mid-epoch reads the same ones)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from trainctl import tokens_data
from trainctl.arrays import Arrays, DataInfo
from trainctl.batches import Batch, Source
from trainctl.tokens_data import TokenReader, WindowPlan

if TYPE_CHECKING:
    from trainctl.data_sources import TokensSpec

log = logging.getLogger("trainctl")


class TokenWindows(Source):
    """Next-token windows of one split: sample ``i`` of epoch ``e`` is the window at
    ``plan.starts(e, i)``; input ``t[s:s+L]``, target ``t[s+1:s+L+1]``, as int64. Host-side: Batches moves
    the batches to the device. Picklable to DataLoader workers (each maps the file itself)."""

    host = True

    def __init__(self, reader: TokenReader, plan: WindowPlan) -> None:
        self.reader, self.plan = reader, plan

    def __len__(self) -> int:
        return self.plan.n_windows

    def take(self, idx: torch.Tensor) -> Batch:
        starts = self.plan.starts(self.epoch, idx.numpy())
        windows = torch.from_numpy(self.reader.windows(starts, self.plan.seq_len))
        return windows[:, :-1], windows[:, 1:]


# --- loading ------------------------------------------------------------------------------------------


def load(spec: "TokensSpec", cache_dir: Optional[Path] = None) -> Arrays:
    """The two splits as file-backed sources (:class:`TokenWindows`); the
    ``x_*`` arrays are empty placeholders."""
    found = tokens_data.corpus(spec)
    tokens_data.check_range(found, cache_dir)
    train, val = tokens_data.train_plan(spec, found.train), tokens_data.val_plan(spec, found.val)
    info = DataInfo("lm", (spec.seq_len,), vocab_size=found.vocab_size, n_train=train.n_windows,
                    n_val=val.n_windows)
    log.info("data=tokens: %s train tokens (%s windows of %d per epoch, %s), %s validation tokens (%s windows)",
             f"{found.train.n_tokens:,}", f"{train.n_windows:,}", spec.seq_len, spec.sampling,
             f"{found.val.n_tokens:,}", f"{val.n_windows:,}")
    empty = np.zeros(0, dtype=np.int64)
    return Arrays(info, empty, None, empty, None, seq_len=spec.seq_len,
                  sources=(TokenWindows(TokenReader(found.train), train), TokenWindows(TokenReader(found.val), val)))
