"""THE table of config groups. Each group names its schema (the field of the run spec), its option
registry when it has a closed set of options, and what a resumed run may change in it. The run spec,
its validation, the Hydra schemas, resuming, `trainctl show` and `trainctl run --help` all read this
table; a new option of any group is one spec class registered in its group's module plus one YAML file.

Torch-free: the CLI reads it to validate a config.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from trainctl.adapters import PEFTS, PeftSpec
from trainctl.averaging import AVERAGINGS, AveragingSpec
from trainctl.callbacks import CALLBACKS, EarlyStoppingSpec
from trainctl.checkpoint import CheckpointSpec
from trainctl.data import DATASETS, DataSpec
from trainctl.loss import LOSSES, LossSpec
from trainctl.metrics import LoggingSpec
from trainctl.model import MODELS
from trainctl.optim import OPTIMIZERS, OptimizerSpec
from trainctl.parallel import PARALLELISMS, ParallelismSpec
from trainctl.performance import PerformanceSpec
from trainctl.precision import PRECISIONS, PrecisionSpec
from trainctl.registry import Registry
from trainctl.regularization import RegularizationSpec
from trainctl.schedule import SCHEDULERS, SchedulerSpec
from trainctl.trainer import TrainerSpec
from trainctl.transforms import TRANSFORMS

CONF_DIR = Path(str(importlib.resources.files("trainctl.conf")))
"""`conf/`: a folder per group, a YAML file per option; `train.yaml`'s defaults list names them all."""
RECIPES_DIR = Path(str(importlib.resources.files("trainctl.recipes")))


@dataclass(frozen=True)
class Group:
    name: str
    doc: str
    """One line for `trainctl run --help`."""
    schema: Any = None
    """The spec class of the group's field (None for `model`, which may also be a `_target_` mapping)."""
    options: Optional[Registry] = None
    """The closed set of options (name -> entry with a `.spec` class); None: presets of one schema."""
    many: bool = False
    """Several options at once, each under its own name (`callbacks=[lr_monitor]` -> callbacks.lr_monitor)."""
    fixed_on_resume: Tuple[str, ...] = ()
    """Keys a continued run cannot change (the saved state would not fit); "*" for every key."""
    free_on_resume: Tuple[str, ...] = ()
    """Exceptions to "*": keys that change nothing the saved state depends on."""

    def option_names(self) -> List[str]:
        """The options a user can pick: the registry's, or the group's YAML presets."""
        names = set(self.options.names()) if self.options is not None else set()
        directory = CONF_DIR / self.name
        if directory.is_dir():
            names |= {p.stem for p in directory.glob("*.yaml")}
        return sorted(names)

    def spec_of(self, option: str) -> Any:
        """The schema of one option (a ConfigError names the valid ones)."""
        return self.options.get(option).spec if self.options is not None else self.schema

    def refuses_change(self, key: str) -> bool:
        """Whether a resumed run may not change ``key`` (a full key such as `data.batch_size`)."""
        leaf = key[len(self.name) + 1:]
        if leaf in self.free_on_resume:
            return False
        return "*" in self.fixed_on_resume or leaf in self.fixed_on_resume


GROUPS: Dict[str, Group] = {group.name: group for group in (
    Group("model", "the network: built-in, a Hugging Face model from disk (model=hf), or your own nn.Module "
          "(model=custom model._target_=...); model.init_from starts it from saved weights", None, MODELS,
          fixed_on_resume=("*",)),
    Group("peft", "what trains: everything (none), chosen modules (freeze), or adapters (lora, dora, qlora)",
          PeftSpec, PEFTS, fixed_on_resume=("*",)),
    Group("data", "the dataset, its split and batches", DataSpec, DATASETS, fixed_on_resume=("*",),
          free_on_resume=("num_workers", "eval_batch_size", "persistent_workers", "prefetch_factor")),
    Group("optimizer", "torch.optim and pytorch-optimizer optimizers", OptimizerSpec, OPTIMIZERS,
          fixed_on_resume=("name",)),
    Group("scheduler", "learning-rate schedules, stepped once per optimizer step", SchedulerSpec, SCHEDULERS,
          fixed_on_resume=("name",)),
    Group("regularization", "weight decay, dropout, label smoothing, gradient clipping", RegularizationSpec),
    Group("averaging", "an average of the weights for evaluation and the final weights: none, ema or swa",
          AveragingSpec, AVERAGINGS, fixed_on_resume=("name",)),
    Group("precision", "fp32, bf16 or fp16 autocast (with a loss scaler), bf16 weights, tf32", PrecisionSpec,
          PRECISIONS),
    Group("performance", "torch.compile, activation checkpointing, channels_last, MFU", PerformanceSpec),
    Group("parallelism", "one process, DDP or FSDP under torchrun", ParallelismSpec, PARALLELISMS),
    Group("loss", "the training criterion (auto: from the data's task)", LossSpec, LOSSES),
    Group("trainer", "length, evaluation cadence, seed, device, monitored metric", TrainerSpec),
    Group("logging", "log cadence, progress display, TensorBoard", LoggingSpec),
    Group("checkpoint", "when checkpoints are saved, how many are kept, where a run resumes from",
          CheckpointSpec),
    Group("early_stopping", "stop when the monitored metric stops improving", EarlyStoppingSpec),
    Group("callbacks", "extra callbacks, several at once: callbacks=[lr_monitor]", None, CALLBACKS, many=True),
    Group("transforms", "batch transforms before the forward pass, several at once: transforms=[noise]", None,
          TRANSFORMS, many=True),
)}
