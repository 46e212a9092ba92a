"""Batches from in-memory datasets: tensors on the target device, sliced a whole batch at a time.

The order of an epoch is a pure function of (seed, epoch), so a run can restart at any batch index
without drawing the batches before it. With ``num_workers > 0`` the same batches come from a torch
DataLoader (per-sample fetch + default collate) for datasets that want worker processes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from trainctl.arrays import Arrays, DataInfo

if TYPE_CHECKING:
    from trainctl.data import DataSpec

Batch = Tuple[torch.Tensor, torch.Tensor]


class Source:
    """Samples addressed by index: ``take(idx)`` returns the batch for a 1-D index tensor.

    A source whose samples live in host memory or in files (``host = True``) gets CPU indices, and its
    batches are moved to the device by :class:`Batches`. ``epoch`` is set before each epoch's samples
    are taken (also inside DataLoader workers), so random augmentation can be a pure function of
    (seed, epoch, index) and a resumed run draws what the uninterrupted one drew.
    """

    host = False
    epoch = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, idx: torch.Tensor) -> Batch:
        raise NotImplementedError

    def sample(self, i: int) -> Batch:
        """One sample (what a DataLoader worker fetches); by default a batch of one, unbatched."""
        x, y = self.take(torch.tensor([i]))
        return x[0], y[0]

    def collate(self, samples: List[Batch]) -> Batch:
        """Stack samples from :meth:`sample` into a batch (DataLoader workers)."""
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


class SampleSource(Source):
    """Samples produced one at a time in host memory (decoded files, a user's Dataset): ``fetch(i)``
    returns sample ``i`` as tensors. Anything random in it (augmentation, a Dataset's own use of torch's
    generator) draws from a generator seeded by (seed, epoch, index), so the samples of a resumed run,
    with or without workers, are those of the uninterrupted one."""

    host = True

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def fetch(self, i: int) -> Batch:
        raise NotImplementedError

    def sample(self, i: int) -> Batch:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + i)
            return self.fetch(i)

    def take(self, idx: torch.Tensor) -> Batch:
        return self.collate([self.sample(int(i)) for i in idx])


class TensorSource(Source):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def take(self, idx: torch.Tensor) -> Batch:
        return self.x[idx], self.y[idx]

    def slice(self, start: int, stop: int) -> Batch:
        """Samples ``start`` to ``stop``: views of the tensors, nothing copied (validation batches)."""
        return self.x[start:stop], self.y[start:stop]


class WindowSource(Source):
    """Next-token sequences cut from one token stream: input ``t[s:s+L]``, target ``t[s+1:s+L+1]``."""

    def __init__(self, tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> None:
        self.tokens, self.starts = tokens, starts
        self.offsets = torch.arange(seq_len + 1, device=tokens.device)

    def __len__(self) -> int:
        return len(self.starts)

    def take(self, idx: torch.Tensor) -> Batch:
        windows = self.tokens[self.starts[idx].unsqueeze(1) + self.offsets].long()
        return windows[:, :-1], windows[:, 1:]


class _SampleView(torch.utils.data.Dataset):
    """A source as a map-style dataset whose keys are (epoch, index): persistent workers learn the epoch
    from each key, not from a copy of the source made when they started."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: Tuple[int, int]) -> Batch:
        self.source.epoch = key[0]
        return self.source.sample(key[1])


class _EpochBatches:
    """The batch sampler of the loader: this epoch's index batches, as (epoch, index) keys."""

    def __init__(self) -> None:
        self.epoch, self.chunks = 0, []

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        epoch, chunks = self.epoch, self.chunks  # this epoch's, even if the next is set meanwhile
        return ([(epoch, i) for i in chunk.tolist()] for chunk in chunks)


class _IndexBatches(Sequence):
    """An epoch's index batches, cut from its order when asked for: an epoch of millions of samples is one
    tensor, not a list of as many views. Each global batch of ``batch_size x world`` samples is cut into
    equal consecutive shares (rank r takes share r); a last, shorter one is cut to a multiple of the world
    size, so every rank gets the same number of samples and DDP's mean of means is the global mean (or it
    is dropped: ``count`` says how many batches there are)."""

    def __init__(self, order: torch.Tensor, batch_size: int, world: int, rank: int, count: int, first: int = 0
                 ) -> None:
        self.order, self.batch_size, self.world, self.rank = order, batch_size, world, rank
        self.count, self.first = count, first

    def __len__(self) -> int:
        return max(0, self.count - self.first)

    def __getitem__(self, k):
        if isinstance(k, slice):
            start, _, step = k.indices(len(self))
            if step != 1 or k.stop is not None:
                raise ValueError("only the tail of an epoch's batches is taken")
            return _IndexBatches(self.order, self.batch_size, self.world, self.rank, self.count, self.first + start)
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        size = self.batch_size * self.world
        chunk = self.order[(self.first + k) * size:(self.first + k + 1) * size]
        if len(chunk) < size:
            chunk = chunk[: len(chunk) // self.world * self.world]
        return chunk.tensor_split(self.world)[self.rank] if self.world > 1 else chunk


class Batches:
    """The batches of one split; iterate an epoch with :meth:`epoch` (optionally from a batch index)."""

    def __init__(self, source: Source, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 num_workers: int = 0, device: torch.device = torch.device("cpu"),
                 memory_format: torch.memory_format = torch.contiguous_format, rank: int = 0,
                 world_size: int = 1, persistent_workers: bool = False, prefetch_factor: Optional[int] = None
                 ) -> None:
        self.source = source
        self.persistent_workers = persistent_workers and num_workers > 0
        self.prefetch_factor = prefetch_factor
        self._loader: Optional[torch.utils.data.DataLoader] = None
        self._sampler = _EpochBatches()
        self.rank, self.world_size = rank, world_size
        self.memory_format = memory_format
        self.device = device
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.num_workers = num_workers

    def __len__(self) -> int:
        """Batches per epoch on this rank (the runner asks at every step: arithmetic, no permutation)."""
        n, world = len(self.source), self.world_size
        if world > 1 and not self.shuffle:  # this rank's contiguous share, see _chunks
            share = n // world + (1 if self.rank < n % world else 0)
            return math.ceil(share / self.batch_size)
        size = self.batch_size * world
        full, rest = divmod(n, size)
        return full + (1 if rest and not self.drop_last and rest >= world else 0)

    def shortfall(self) -> int:
        """How many fewer batches this rank has than rank 0, whose share is the largest (validation
        shares differ by at most one sample)."""
        if self.world_size == 1 or self.shuffle:
            return 0
        n, world = len(self.source), self.world_size
        share = n // world + (1 if n % world else 0)
        return math.ceil(share / self.batch_size) - len(self)

    def order(self, epoch: int) -> torch.Tensor:
        n = len(self.source)
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=generator)

    def _chunks(self, epoch: int) -> Sequence[torch.Tensor]:
        if self.world_size > 1 and not self.shuffle:  # evaluation: a contiguous share per rank, nothing dropped
            share = self.order(epoch).tensor_split(self.world_size)[self.rank]
            return list(share.split(self.batch_size)) if len(share) else []
        return _IndexBatches(self.order(epoch), self.batch_size, self.world_size, self.rank, len(self))

    def index_batches(self, epoch: int, start: int = 0) -> Sequence[torch.Tensor]:
        """This rank's index batches of ``epoch``. With several ranks, each global batch of
        ``batch_size x world_size`` samples is cut into equal consecutive shares (rank r takes share r),
        and a last global batch is shortened to a multiple of the world size."""
        return self._chunks(epoch)[start:]

    def first(self) -> Batch:
        """A full batch of the first samples (to measure the model on)."""
        idx = torch.arange(min(self.batch_size, len(self.source)))
        if self.source.host:
            x, y = self.source.take(idx)
            return x.to(self.device, memory_format=self.memory_format), y.to(self.device)
        return self.source.take(idx.to(self.device))

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch``, skipping the first ``start`` by index (nothing is drawn for them)."""
        chunks = self.index_batches(epoch, start)
        self.source.epoch = epoch
        if self.num_workers == 0 and not self.shuffle and isinstance(self.source, TensorSource):
            # in order: every batch is a contiguous range of the tensors, taken as a view
            return (self.source.slice(int(idx[0]), int(idx[-1]) + 1) for idx in chunks)
        if self.num_workers == 0:
            if self.source.host:
                return (self._moved(self.source.take(idx)) for idx in chunks)
            if self.device.type == "cpu":  # the index batches are on the CPU already
                return (self.source.take(idx) for idx in chunks)
            return (self.source.take(idx.to(self.device)) for idx in chunks)
        self._sampler.epoch, self._sampler.chunks = epoch, chunks
        loader = self._loader if self._loader is not None else self._make_loader(epoch)
        return (self._moved(batch) for batch in loader)

    def _make_loader(self, epoch: int) -> torch.utils.data.DataLoader:
        # The loader draws its workers' base seed from its own generator, not from the global RNG: taking
        # it from there would shift the dropout masks of a run resumed in the middle of an epoch.
        loader = torch.utils.data.DataLoader(
            _SampleView(self.source), batch_sampler=self._sampler, collate_fn=self.source.collate,
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=self.persistent_workers, prefetch_factor=self.prefetch_factor,
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        if self.persistent_workers:  # one loader (and one set of workers) for the whole run
            self._loader = loader
        return loader

    def _moved(self, batch: Batch) -> Batch:
        x, y = batch
        if self.device.type == "cpu":
            return x, y
        return (x.to(self.device, non_blocking=True, memory_format=self.memory_format),
                y.to(self.device, non_blocking=True))


class DataBundle:
    """Both splits of a dataset plus what the model, loss and metrics need to know about it."""

    def __init__(self, info: DataInfo, train: Batches, val: Batches) -> None:
        self.info, self.train, self.val = info, train, val


def _sources(arrays: Arrays, device: torch.device, memory_format: torch.memory_format) -> Tuple[Source, Source]:
    if arrays.sources is not None:  # files read per batch, or a user's Dataset: built by the data option
        return arrays.sources
    if arrays.info.task == "lm":
        def windows(tokens: np.ndarray, starts: np.ndarray) -> Source:
            return WindowSource(torch.from_numpy(tokens.copy()).to(device),
                                torch.from_numpy(starts).to(device), arrays.seq_len)
        return windows(arrays.x_train, arrays.starts_train), windows(arrays.x_val, arrays.starts_val)

    def tensors(x: np.ndarray, y: np.ndarray) -> Source:
        # Indexing keeps the memory format, so channels-last batches cost nothing per step.
        return TensorSource(torch.from_numpy(x).to(device).contiguous(memory_format=memory_format),
                            torch.from_numpy(y).to(device))
    return tensors(arrays.x_train, arrays.y_train), tensors(arrays.x_val, arrays.y_val)


def build_batches(spec: "DataSpec", arrays: Arrays, device: torch.device, channels_last: bool = False,
                  rank: int = 0, world_size: int = 1) -> DataBundle:
    """In-memory datasets live on ``device``; with workers they stay on the CPU and batches move.
    With several ranks, each rank gets its share of every training batch and of the validation set."""
    where = device if spec.num_workers == 0 else torch.device("cpu")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    train_src, val_src = _sources(arrays, where, memory_format)
    loading = {"persistent_workers": spec.persistent_workers, "prefetch_factor": spec.prefetch_factor}
    train = Batches(train_src, spec.batch_size, spec.shuffle, spec.drop_last, spec.seed, spec.num_workers, device,
                    memory_format, rank, world_size, **loading)
    val = Batches(val_src, spec.eval_batch_size or spec.batch_size, False, False, spec.seed, spec.num_workers,
                  device, memory_format, rank, world_size, **loading)
    return DataBundle(arrays.info, train, val)


def windows_of(batches: Iterator[Batch], size: int) -> Iterator[List[Batch]]:
    """Group consecutive batches into accumulation windows of ``size`` (the last may be shorter)."""
    window: List[Batch] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window
