"""`data=custom`: the user's own torch ``Dataset``\\ s, through a factory named by `data._target_`.

The factory is a ``Dataset`` subclass (built with `data.args`; if its constructor takes ``split``, it is
built twice, with ``split="train"`` and ``split="val"``) or a function marked with
:func:`trainctl.datasets.dataset_factory` returning (train, val), {"train": ..., "val": ...} or one
dataset that `data.val_fraction` splits. Samples may be ``(input, target)`` tuples or dicts (the input
under `data.input_key`, the target under `data.target_key`). The task, input shape, number of classes
and vocabulary are read from the samples where they can be, and set in the config where they cannot.
Batches come from the datasets one sample at a time (through a DataLoader with `data.num_workers`),
each sample drawn under a generator seeded by (seed, epoch, index), so resume is exact.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np

from trainctl.arrays import Arrays, DataInfo, split_indices
from trainctl.errors import ConfigError, check

if TYPE_CHECKING:
    import torch

    from trainctl.data_sources import CustomDataSpec

log = logging.getLogger("trainctl")

INPUT_KEYS = ("input", "x", "inputs", "image", "input_ids", "features")
TARGET_KEYS = ("label", "y", "target", "labels", "targets")
# --- samples -----------------------------------------------------------------------------------------


def _pick(sample: Dict[str, Any], wanted: Optional[str], names: Tuple[str, ...], what: str, key: str) -> Any:
    if wanted is not None:
        if wanted not in sample:
            raise ConfigError(key, f"the samples have no key '{wanted}' (they have: {', '.join(map(str, sample))})",
                              f"set {key} to one of them")
        return sample[wanted]
    for name in names:
        if name in sample:
            return sample[name]
    raise ConfigError(key, f"cannot tell which key of the samples holds the {what} (they have: "
                      f"{', '.join(map(str, sample))})", f"set {key}=NAME")


def split_sample(sample: Any, spec: "CustomDataSpec") -> Tuple["torch.Tensor", "torch.Tensor"]:
    """(input, target) of one sample, as tensors."""
    import torch

    if isinstance(sample, dict):
        x = _pick(sample, spec.input_key, INPUT_KEYS, "input", "data.input_key")
        y = _pick(sample, spec.target_key, TARGET_KEYS, "target", "data.target_key")
    elif isinstance(sample, (tuple, list)) and len(sample) == 2:
        x, y = sample
    else:
        raise ConfigError("data._target_", f"a sample is a {type(sample).__name__}; trainctl needs (input, target) "
                          "pairs or dicts with an input and a target", "return (x, y) from __getitem__")
    return torch.as_tensor(x), torch.as_tensor(y)


def _source_class() -> type:
    from trainctl.batches import SampleSource

    class DatasetSource(SampleSource):
        """Samples of a user's Dataset (optionally a subset of its indices), typed for the task."""

        def __init__(self, dataset: Any, indices: Optional[np.ndarray], spec: "CustomDataSpec", task: str,
                     seed: int) -> None:
            super().__init__(seed)
            self.dataset, self.indices, self.spec, self.task = dataset, indices, spec, task

        def __len__(self) -> int:
            return len(self.indices) if self.indices is not None else len(self.dataset)

        def fetch(self, i: int) -> Tuple["torch.Tensor", "torch.Tensor"]:

            index = int(self.indices[i]) if self.indices is not None else i
            x, y = split_sample(self.dataset[index], self.spec)
            if self.task == "lm":
                return x.long(), y.long()
            x = x.float() if not x.is_floating_point() else x
            if self.task == "classification":
                return x, y.long().reshape(())
            return x, y.float().reshape(-1)

        def collate(self, samples: List[Tuple["torch.Tensor", "torch.Tensor"]]) -> Tuple["torch.Tensor", "torch.Tensor"]:
            import torch

            try:
                return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
            except RuntimeError as exc:  # samples of different shapes
                raise ConfigError("data._target_", f"samples of one batch cannot be stacked: {exc}",
                                  "return inputs of one shape (pad or resize in the dataset)") from None

    return DatasetSource


# --- loading -----------------------------------------------------------------------------------------


def _datasets(spec: "CustomDataSpec") -> Tuple[Any, Any]:
    """(train, val) datasets; val is None when the factory returned one dataset."""
    import inspect

    import torch

    from trainctl.targets import resolve_factory

    factory = resolve_factory(spec._target_, "data._target_", spec.allowed_prefixes(), torch.utils.data.Dataset,
                              spec.module_dir)
    args = dict(spec.args)

    def call(**extra: Any) -> Any:
        try:
            return factory(**args, **extra)
        except ConfigError:
            raise
        except Exception as exc:  # the user's code refused its arguments or failed
            raise ConfigError("data._target_", f"{spec._target_}(...) failed: {type(exc).__name__}: {exc}",
                              "check data.args and the factory") from None

    if inspect.isclass(factory) and "split" in inspect.signature(factory).parameters and "split" not in args:
        return call(split="train"), call(split="val")
    made = call()
    if isinstance(made, dict):
        if "train" not in made:
            raise ConfigError("data._target_", f"the factory returned a dict without 'train' (keys: {list(made)})",
                              "return {'train': ..., 'val': ...}")
        return made["train"], made.get("val") or made.get("validation")
    if isinstance(made, (tuple, list)) and len(made) == 2:
        return made[0], made[1]
    return made, None


def probe(spec: "CustomDataSpec") -> Tuple[str, int]:
    """(task, input rank), from the first training sample: the factory runs when the config is checked."""
    arrays = load(spec)
    return arrays.info.task, len(arrays.info.input_shape)


def tokens(spec: "CustomDataSpec") -> bool:
    return probe(spec)[0] == "lm"


def load(spec: "CustomDataSpec") -> Arrays:
    """The datasets as sources (built once per spec object: checking the config and building the run share it)."""
    made = getattr(spec, "_loaded", None)
    if made is None:
        made = _load(spec)
        object.__setattr__(spec, "_loaded", made)
    return made


def _load(spec: "CustomDataSpec") -> Arrays:
    train, val = _datasets(spec)
    for name, dataset in (("train", train), ("val", val)):
        if dataset is not None and not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise ConfigError("data._target_", f"the {name} dataset ({type(dataset).__name__}) has no __len__ and "
                              "__getitem__", "return map-style torch Datasets")
    check(len(train) > 0, "data._target_", "the training dataset is empty", "check data.args")
    x, y = split_sample(train[0], spec)
    task = _task(spec, x, y)
    train_idx = val_idx = None
    labels = _labels(train, spec) if task == "classification" else None
    if val is None:
        train_idx, val_idx = split_indices(len(train), spec.val_fraction, spec.seed, labels)
        val = train
    check(len(val) > 0 if val_idx is None else len(val_idx) > 0, "data.val_fraction", "leaves no validation sample",
          "raise data.val_fraction or return a validation dataset")
    info = _info(spec, task, train, x, y, labels,
                 len(train_idx) if train_idx is not None else len(train),
                 len(val_idx) if val_idx is not None else len(val))
    source = _source_class()
    sources = (source(train, train_idx, spec, task, spec.seed), source(val, val_idx, spec, task, spec.seed))
    empty = np.zeros((0,), dtype=np.float32)
    log.info("data=custom: %s -> %d train / %d validation samples, %s, input %s", spec._target_, info.n_train,
             info.n_val, task, tuple(info.input_shape))
    return Arrays(info, empty, empty, empty, empty, sources=sources)


def _task(spec: "CustomDataSpec", x: "torch.Tensor", y: "torch.Tensor") -> str:
    if spec.task != "auto":
        return spec.task
    if y.is_floating_point():
        return "regression"
    if y.dim() >= 1 and y.shape == x.shape and not x.is_floating_point():
        return "lm"
    if y.numel() == 1:
        return "classification"
    raise ConfigError("data.task", f"cannot tell the task from a target of shape {tuple(y.shape)} ({y.dtype})",
                      "set data.task=classification, regression or lm")


def _labels(dataset: Any, spec: "CustomDataSpec") -> Optional[np.ndarray]:
    """Every label (to stratify the split and count the classes), for datasets up to 200,000 samples."""
    if spec.num_classes is not None and len(dataset) > 200_000:
        return None
    if len(dataset) > 200_000:
        raise ConfigError("data.num_classes", f"the dataset has {len(dataset):,} samples, too many to read every "
                          "label to count the classes", "set data.num_classes=N")
    targets = getattr(dataset, "targets", None)  # torchvision's convention: read without decoding inputs
    if targets is not None and len(targets) == len(dataset):
        return np.asarray(targets, dtype=np.int64).reshape(-1)
    return np.array([int(split_sample(dataset[i], spec)[1]) for i in range(len(dataset))], dtype=np.int64)


def _info(spec: "CustomDataSpec", task: str, dataset: Any, x: "torch.Tensor", y: "torch.Tensor",
          labels: Optional[np.ndarray], n_train: int, n_val: int) -> DataInfo:
    if task == "classification":
        classes = getattr(dataset, "classes", None)
        num = spec.num_classes or (len(classes) if classes is not None else int(labels.max()) + 1)
        if labels is not None and (labels.min() < 0 or labels.max() >= num):
            raise ConfigError("data.num_classes", f"labels run from {labels.min()} to {labels.max()}, outside "
                              f"0..{num - 1}", "relabel as 0..K-1, or set data.num_classes")
        names = tuple(map(str, classes)) if classes is not None and len(classes) == num else None
        return DataInfo("classification", tuple(x.shape), num_classes=num, n_train=n_train, n_val=n_val,
                        class_names=names)
    if task == "lm":
        vocab = spec.vocab_size or getattr(dataset, "vocab_size", None)
        if vocab is None:
            raise ConfigError("data.vocab_size", "token data needs its vocabulary size", "set data.vocab_size=N")
        return DataInfo("lm", tuple(x.shape), vocab_size=int(vocab), n_train=n_train, n_val=n_val)
    return DataInfo("regression", tuple(x.shape), num_targets=max(1, y.numel()), n_train=n_train, n_val=n_val)
