"""build_run(spec) -> Run: the only place that calls the group builders, in a fixed order, passing
results between groups (data facts into the model and loss, parameter groups into the optimizer, the
run's monitors into checkpoints and callbacks). Callbacks, batch transforms and optimizer-step wrappers
come from their registries: a new one needs no change here."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from trainctl import adapters
from trainctl import data as data_mod
from trainctl.averaging import AVERAGING
from trainctl.batches import DataBundle, build_batches
from trainctl.callbacks import CALLBACKS, EARLY_STOPPING, BuildContext, Callback
from trainctl.checkpoint import CheckpointStore
from trainctl.checkpointing import Checkpoints, backend_for
from trainctl.errors import ConfigError
from trainctl.loss import SumLoss, build_loss, out_features
from trainctl.evaluation import Evaluator
from trainctl.histograms import build_histograms
from trainctl.metrics import TrainMeter
from trainctl.model import apply_dropout, build_model, init_settings, is_custom, model_name, with_dropout
from trainctl.monitor import Monitor, Monitors
from trainctl.noise_scale import build_noise_scale
from trainctl.optim import build_optimizer, has_train_eval_modes, optimizer_groups
from trainctl.parallel import Distributed
from trainctl.performance import (
    CompileClock,
    apply_activation_checkpointing,
    apply_channels_last,
    compile_model,
    flops_per_sample,
    peak_memory_mib,
    peak_tflops,
)
from trainctl.precision import Precision, build_precision
from trainctl.regularization import GradClipper, named_param_groups, param_groups
from trainctl.schedule import Horizon, Schedule, build_scheduler
from trainctl.spec import RunSpec, spec_yaml, total_optimizer_steps
from trainctl.steps import StepWrapper, build_step_wrappers
from trainctl.transforms import TRANSFORMS, Transform


@dataclass
class Run:
    """Everything the runner needs, built; the runner reads no config."""

    spec: RunSpec
    device: torch.device
    data: DataBundle
    model: torch.nn.Module
    loss: SumLoss
    optimizer: torch.optim.Optimizer
    scheduler: Schedule
    precision: Precision
    clipper: GradClipper
    evaluator: Evaluator
    horizon: Horizon
    grad_accum_steps: int
    eval_every_n_epochs: Optional[int]
    eval_every_n_steps: Optional[int]
    log_every_n_steps: int
    meter: TrainMeter
    """The training loss, gradient norm and throughput between two log readings."""
    monitors: Monitors
    """Every metric watched for a "best"; the runner updates them after each evaluation."""
    monitor: Monitor
    """`trainer.monitor`: the run's best metric (summary, sweeps)."""
    optimizer_has_modes: bool
    """Schedule-free optimizers switch between train and eval weights with the model."""
    skip_nonfinite: bool = False
    max_consecutive_skips: int = 10
    callbacks: List[Callback] = dataclasses.field(default_factory=list)
    transforms: List[Transform] = dataclasses.field(default_factory=list)
    """Applied in order to each training micro-batch before the forward pass."""
    step_wrappers: List[StepWrapper] = dataclasses.field(default_factory=list)
    """Act on each optimizer step's gradients before clipping (see :mod:`trainctl.steps`)."""
    checkpoints: Optional[Checkpoints] = None
    """When to save and the final weights (a run with a run directory)."""
    run_dir: Optional[Path] = None
    checkpointed_modules: int = 0
    """Modules whose activations are recomputed in backward."""
    compile_clock: Optional[CompileClock] = None
    flops_per_sample: Optional[float] = None
    peak_tflops: Optional[float] = None
    dist: Optional[Distributed] = None
    """This process's place in a multi-process job (None: one process)."""
    train_model: Optional[torch.nn.Module] = None
    """What the training step calls: the model, or its DDP wrapper (``model`` stays the bare module;
    FSDP shards ``model`` in place, and both are the same module)."""
    sharded_units: int = 0
    """FSDP: modules that gather their parameters separately (besides the root)."""
    unfreezer: Optional[adapters.Unfreezer] = None
    """`peft=freeze` with `peft.unfreeze_at`: modules that start training at later epochs."""

    def __post_init__(self) -> None:
        if self.train_model is None:
            self.train_model = self.model

    @property
    def world_size(self) -> int:
        return self.dist.world_size if self.dist is not None else 1

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    @property
    def sharded(self) -> bool:
        """FSDP: the model, optimizer state and checkpoints are sharded across the ranks."""
        return self.dist is not None and self.dist.sharded


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device", f"'{name}' was requested but no CUDA device is available",
                          "set trainer.device=cpu (or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.device", "'mps' was requested but MPS is not available",
                          "set trainer.device=cpu (or auto)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_run(spec: RunSpec, run_dir: Optional[Path] = None, base_dir: str = ".",
              dist: Optional[Distributed] = None) -> Run:
    """Everything a run needs, from its spec. ``dist``: this process's place in a multi-process job."""
    device = resolve_device(spec.trainer.device)
    if dist is not None:
        device = dist.device if device.type == "cuda" else device
    perf = spec.performance
    rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
    arrays = data_mod.load(spec.data, cache_dir=run_dir / "cache" if run_dir is not None else None)
    bundle = build_batches(spec.data, arrays, device, perf.channels_last, rank, world)
    info = bundle.info
    _check_batches(spec, bundle, world)
    precision = build_precision(spec.precision, device)
    model = _build_model(spec, info, device, precision, base_dir)
    if rank:  # the same initial weights everywhere (DDP also broadcasts rank 0's), different dropout masks
        torch.manual_seed(spec.trainer.seed + rank)
    per_epoch, total = total_optimizer_steps(spec, len(bundle.train))
    horizon = Horizon(total, per_epoch)
    train_loss, eval_loss = build_loss(spec.loss, info, spec.regularization.label_smoothing)
    peak = peak_tflops(device, perf)
    # Model FLOPs are counted before activation checkpointing adds its recomputation.
    flops = flops_per_sample(model, train_loss, bundle.train.first()) if peak else None
    builtin = not is_custom(spec.model) and spec.model.name != "hf"
    wrapped = apply_activation_checkpointing(model, perf, builtin)
    units = 0
    if dist is not None and dist.sharded:  # in place, before compiling and before the optimizer sees parameters
        from trainctl.sharding import shard_model

        units = shard_model(model, spec.parallelism, dist, precision, builtin)  # type: ignore[arg-type]
    clock = None
    if perf.compile:
        clock = CompileClock().start()
        compile_model(model, perf)
    train_model = dist.wrap(model) if dist is not None else model
    # Parameter names (weight decay, lr_multipliers) are taken without the wrappers' parts.
    from trainctl.performance import clean_name

    all_names = [clean_name(n) for n, _ in model.named_parameters()] if spec.peft.partial else None
    optimizer = build_optimizer(spec.optimizer, param_groups(model, spec.regularization), all_names)
    trainer, task = spec.trainer, info.task
    monitors = Monitors()
    monitor = monitors.get(spec.monitor(task), spec.monitor_mode(task))
    meter = TrainMeter(spec.logging.log_every_n_steps, device, tokens=task == "lm",
                       memory=lambda: peak_memory_mib(device), flops_per_sample=flops, peak_tflops=peak, dist=dist,
                       info=info if spec.logging.train_metrics else None,
                       ppl=spec.loss.name in ("auto", "cross_entropy") and not spec.regularization.label_smoothing)
    checkpoints = None
    if run_dir is not None:
        store = CheckpointStore(run_dir / "checkpoints", spec.checkpoint.keep_last_k)
        checkpoints = Checkpoints(spec.checkpoint, store, monitors.get(spec.monitor(task, spec.checkpoint),
                                                                       spec.monitor_mode(task, spec.checkpoint)),
                                  backend_for(store, model, optimizer, dist), lambda: spec_yaml(spec))
    return Run(
        spec=spec, device=device, data=bundle, model=model, loss=train_loss, optimizer=optimizer,
        scheduler=build_scheduler(spec.scheduler, optimizer, horizon),
        precision=precision,
        clipper=GradClipper(model.parameters(), spec.regularization),
        evaluator=Evaluator(info, eval_loss, device, equal_calls=dist is not None and dist.sharded, dist=dist),
        horizon=horizon,
        grad_accum_steps=trainer.grad_accum_steps, eval_every_n_epochs=trainer.eval_every_n_epochs,
        eval_every_n_steps=trainer.eval_every_n_steps, log_every_n_steps=spec.logging.log_every_n_steps,
        meter=meter, monitors=monitors, monitor=monitor, optimizer_has_modes=has_train_eval_modes(spec.optimizer),
        skip_nonfinite=trainer.on_nonfinite == "skip", max_consecutive_skips=trainer.max_consecutive_skips,
        callbacks=_callbacks(spec, task, monitors), transforms=_transforms(spec, info),
        step_wrappers=build_step_wrappers(spec, precision.scales_loss, model), checkpoints=checkpoints, run_dir=run_dir,
        checkpointed_modules=wrapped, compile_clock=clock, flops_per_sample=flops, peak_tflops=peak, dist=dist,
        train_model=train_model, sharded_units=units, unfreezer=_unfreezer(spec))


def _unfreezer(spec: RunSpec) -> Optional[adapters.Unfreezer]:
    if not isinstance(spec.peft, adapters.FreezeSpec) or not spec.peft.unfreeze_at:
        return None
    from trainctl.performance import clean_name

    def groups(named: list) -> List[dict]:
        named = [(clean_name(n), p) for n, p in named]
        return optimizer_groups(spec.optimizer, named_param_groups(named, spec.regularization), strict=False)
    return adapters.Unfreezer(list(spec.peft.unfreeze_at), groups)


def _callbacks(spec: RunSpec, task: str, monitors: Monitors) -> List[Callback]:
    """Early stopping and weight averaging (their own groups; averaging after early stopping, so both
    see the averaged weights an evaluation used), the histograms of `logging.histograms_every_n_steps`, and
    the callbacks listed under `callbacks`."""
    context = BuildContext(spec, task, monitors)
    chosen = [EARLY_STOPPING.build(spec.early_stopping, context), AVERAGING.build(spec.averaging, context),
              build_histograms(spec), build_noise_scale(spec)]
    chosen += [CALLBACKS.get(name).build(settings, context) for name, settings in spec.callbacks.items()]
    return [c for c in chosen if c is not None]


def _transforms(spec: RunSpec, info: data_mod.DataInfo) -> List[Transform]:
    return [TRANSFORMS.get(name).build(settings, info) for name, settings in spec.transforms.items()]


def _check_batches(spec: RunSpec, bundle: DataBundle, world: int) -> None:
    """An epoch must hold at least one training batch (otherwise no step is ever taken)."""
    if len(bundle.train) > 0:
        return
    data, n = spec.data, bundle.info.n_train
    per_step = data.batch_size * world
    what = f"{data.batch_size} x {world} processes" if world > 1 else str(data.batch_size)
    if data.drop_last:
        raise ConfigError("data.batch_size", f"a batch of {what} samples with data.drop_last=true leaves no "
                          f"training batch: the training split has {n} samples",
                          f"set data.drop_last=false, or data.batch_size={max(1, n // world)} or less")
    raise ConfigError("data.batch_size", f"the training split has {n} samples, too few for one batch of "
                      f"{per_step} across {world} processes", "use fewer processes or more data")


def _build_model(spec: RunSpec, info: data_mod.DataInfo, device: torch.device, precision: Precision,
                 base_dir: str) -> torch.nn.Module:
    """The network, initialised from the run's seed, on its device, in its precision and memory format."""
    seed_everything(spec.trainer.seed)
    model = build_model(with_dropout(spec.model, spec.regularization.dropout), info,
                        out_features(spec.loss, info), base_dir, spec.allowed_target_prefixes)
    if is_custom(spec.model):
        apply_dropout(model, spec.regularization.dropout)
    init_from, strict = init_settings(spec.model)
    if init_from is not None:
        from trainctl.pretrained import load_initial

        load_initial(model, init_from, strict)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("model", f"{model_name(spec.model)} has no trainable parameters",
                          "check the model's _target_ and its arguments")
    model.to(device)
    model = precision.convert_model(model)
    kind = None if is_custom(spec.model) else spec.model.name
    model = adapters.apply(model, spec.peft, kind, precision.dtype or torch.float32)
    if spec.performance.channels_last:
        apply_channels_last(model)
    return model
