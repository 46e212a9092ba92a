"""build_run(spec) -> Run: the only place that calls the group builders, in a fixed order, passing
results between groups (data facts into the model and loss, parameter groups into the optimizer)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from trainctl import data as data_mod
from trainctl.batches import Batches, DataBundle, build_batches
from trainctl.callbacks import Callback, EarlyStopping
from trainctl.checkpoint import Checkpointer
from trainctl.errors import ConfigError
from trainctl.loss import SumLoss, build_loss, out_features, resolve_loss
from trainctl.metrics import Evaluator, MetricsWriter
from trainctl.model import apply_dropout, build_model, is_custom, model_name, with_dropout
from trainctl.optim import build_optimizer, has_train_eval_modes
from trainctl.parallel import Distributed
from trainctl.performance import (
    CompileClock,
    apply_activation_checkpointing,
    apply_channels_last,
    compile_model,
    flops_per_sample,
    peak_tflops,
)
from trainctl.precision import Precision, build_precision
from trainctl.regularization import GradClipper, param_groups
from trainctl.schedule import Horizon, Schedule, build_scheduler
from trainctl.spec import RunSpec, total_optimizer_steps


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
    monitor: str
    mode: str
    optimizer_has_modes: bool
    """Schedule-free optimizers switch between train and eval weights with the model."""
    skip_nonfinite: bool = False
    max_consecutive_skips: int = 10
    callbacks: List[Callback] = dataclasses.field(default_factory=list)
    checkpointer: Optional[Checkpointer] = None
    run_dir: Optional[Path] = None
    writer: Optional[MetricsWriter] = None
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
    bundle = build_batches(spec.data, data_mod.load(spec.data), device, perf.channels_last, rank, world)
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
    builtin = not is_custom(spec.model)
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
    optimizer = build_optimizer(spec.optimizer, param_groups(model, spec.regularization))
    trainer = spec.trainer
    task = info.task
    callbacks: List[Callback] = []
    stopping = spec.early_stopping
    if stopping.enabled:
        callbacks.append(EarlyStopping(spec.monitor(task, stopping), spec.monitor_mode(task, stopping),
                                       stopping.patience, stopping.min_delta, stopping.restore_best_weights))
    checkpointer = None
    if run_dir is not None and spec.checkpoint.enabled:
        checkpointer = Checkpointer(spec.checkpoint, run_dir / "checkpoints", spec.monitor(task, spec.checkpoint),
                                    spec.monitor_mode(task, spec.checkpoint))
    return Run(
        spec=spec, device=device, data=bundle, model=model, loss=train_loss, optimizer=optimizer,
        scheduler=build_scheduler(spec.scheduler, optimizer, horizon),
        precision=precision,
        clipper=GradClipper(model.parameters(), spec.regularization),
        evaluator=Evaluator(info, eval_loss, device, equal_calls=dist is not None and dist.sharded), horizon=horizon,
        grad_accum_steps=trainer.grad_accum_steps, eval_every_n_epochs=trainer.eval_every_n_epochs,
        eval_every_n_steps=trainer.eval_every_n_steps, log_every_n_steps=spec.logging.log_every_n_steps,
        monitor=spec.monitor(info.task), mode=spec.monitor_mode(info.task),
        optimizer_has_modes=has_train_eval_modes(spec.optimizer),
        skip_nonfinite=trainer.on_nonfinite == "skip", max_consecutive_skips=trainer.max_consecutive_skips,
        callbacks=callbacks, checkpointer=checkpointer, run_dir=run_dir, checkpointed_modules=wrapped,
        compile_clock=clock, flops_per_sample=flops, peak_tflops=peak, dist=dist, train_model=train_model,
        sharded_units=units)


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
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("model", f"{model_name(spec.model)} has no trainable parameters",
                          "check the model's _target_ and its arguments")
    model.to(device)
    model = precision.convert_model(model)
    if spec.performance.channels_last:
        apply_channels_last(model)
    return model


def plan(run: Run) -> Dict[str, Any]:
    """What a run will do, before it trains (`trainctl show`, the run's opening log lines)."""
    spec, info = run.spec, run.data.info
    params = list({id(p): p for p in run.model.parameters()}.values())
    return {
        "data": f"{spec.data.name}: {info.task}, {info.n_train} train / {info.n_val} val samples"
                + (f", {info.num_classes} classes" if info.num_classes else ""),
        "model": f"{model_name(spec.model)}",
        "parameters": sum(p.numel() for p in params),
        "trainable parameters": sum(p.numel() for p in params if p.requires_grad),
        "loss": resolve_loss(spec.loss, info.task).name,
        "optimizer": f"{spec.optimizer.name} (lr {spec.optimizer.lr:g}, {len(run.optimizer.param_groups)} "
                     f"parameter groups)",
        "scheduler": spec.scheduler.name,
        "batch size": spec.data.batch_size,
        "gradient accumulation": run.grad_accum_steps,
        "world size": _world_size(run),
        "effective batch size": spec.data.batch_size * run.grad_accum_steps * _world_size(run),
        "parallelism": _parallelism_plan(run),
        **_steps_plan(run),
        "device": str(run.device),
        "precision": run.precision.name + (f" ({run.precision.policy})" if run.precision.policy else ""),
        "performance": _performance_plan(run),
        "checkpoints": _checkpoint_plan(spec),
        "early stopping": (f"patience {spec.early_stopping.patience} on "
                           f"{spec.monitor(info.task, spec.early_stopping)}" if spec.early_stopping.enabled else "off"),
    }


def _steps_plan(run: Run) -> Dict[str, int]:
    """Batches and steps per process; for a job still to be launched, as each of its ranks will see them."""
    batches, horizon = run.data.train, run.horizon
    world = _world_size(run)
    if world != run.world_size:
        batches = Batches(batches.source, batches.batch_size, batches.shuffle, batches.drop_last, batches.seed,
                          rank=0, world_size=world)
        horizon = Horizon(*reversed(total_optimizer_steps(run.spec, len(batches))))
    return {"batches per epoch": len(batches), "optimizer steps per epoch": horizon.steps_per_epoch,
            "total optimizer steps": horizon.total_steps}


def _world_size(run: Run) -> int:
    """The processes of the job: as launched, or as `trainctl run` will launch them."""
    par = run.spec.parallelism
    if run.dist is not None or par.name == "single":
        return run.world_size
    return (par.nproc_per_node or 1) * par.nnodes


def _parallelism_plan(run: Run) -> str:
    par = run.spec.parallelism
    if run.dist is None:
        return par.name
    details = [run.dist.backend]
    if run.sharded:
        details += [par.sharding, f"{run.sharded_units} units + root"]  # type: ignore[attr-defined]
        details += ["CPU offload"] if par.cpu_offload else []  # type: ignore[attr-defined]
    return f"{par.name} ({', '.join(details)})"


def _checkpoint_plan(spec: RunSpec) -> str:
    ckpt = spec.checkpoint
    if not ckpt.enabled:
        return "off"
    parts = [f"every {ckpt.every_n_epochs} epoch(s)"] if ckpt.every_n_epochs else []
    parts += [f"every {ckpt.every_n_steps} steps"] if ckpt.every_n_steps else []
    parts += ["at the end"] if ckpt.save_last else []
    parts += ["best"] if ckpt.save_best else []
    keep = f"keep {ckpt.keep_last_k}" if ckpt.keep_last_k else "keep all"
    return ", ".join(parts) + f" ({keep})"


def _performance_plan(run: Run) -> str:
    perf = run.spec.performance
    parts = [f"torch.compile ({perf.compile_mode})"] if perf.compile else []
    if run.checkpointed_modules:
        parts.append(f"activation checkpointing of {run.checkpointed_modules} modules")
    parts += ["channels_last"] if perf.channels_last else []
    parts += [f"MFU against {run.peak_tflops:g} TFLOP/s"] if run.peak_tflops else []
    return ", ".join(parts) or "eager"
