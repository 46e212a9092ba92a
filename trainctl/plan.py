"""The plan of a run: what it will do, before it trains (`trainctl show`, the run's opening log lines)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

from trainctl.batches import Batches
from trainctl.loss import resolve_loss
from trainctl.model import init_settings, model_name
from trainctl.schedule import Horizon
from trainctl.spec import RunSpec, total_optimizer_steps

if TYPE_CHECKING:
    from trainctl.build import Run


def plan(run: "Run") -> Dict[str, Any]:
    """What a run will do, before it trains (`trainctl show`, the run's opening log lines)."""
    from trainctl.adapters import parameter_counts

    spec, info = run.spec, run.data.info
    counts = parameter_counts(run.model)
    return {
        "data": f"{spec.data.name}: {info.task}, {info.n_train} train / {info.n_val} val samples"
                + (f", {info.num_classes} classes" if info.num_classes else ""),
        "model": f"{model_name(spec.model)}",
        **({"initial weights": init_settings(spec.model)[0]} if init_settings(spec.model)[0] else {}),
        "parameters": counts["total"],
        "trainable parameters": f"{counts['trainable']:,} ({counts['percent']:.2f}%)",
        "peft": _peft_plan(run),
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
        **({"callbacks": ", ".join(c.name for c in run.callbacks)} if run.callbacks else {}),
        **({"transforms": ", ".join(t.name for t in run.transforms)} if run.transforms else {}),
        **({"step wrappers": ", ".join(w.name for w in run.step_wrappers)} if run.step_wrappers else {}),
    }


def _peft_plan(run: "Run") -> str:
    peft = run.spec.peft
    if peft.name == "none":
        return "none (every parameter trains)"
    if peft.name == "freeze":
        later = ", ".join(f"{'/'.join(s.modules)} at epoch {s.epoch}" for s in peft.unfreeze_at)
        return f"freeze: {', '.join(peft.trainable)} train" + (f"; unfreezing {later}" if later else "")
    text = f"{peft.name}: r={peft.r}, alpha={peft.alpha:g}"
    return text + (f", {peft.quant_type} base" if peft.name == "qlora" else "")


def _steps_plan(run: "Run") -> Dict[str, int]:
    """Batches and steps per process; for a job still to be launched, as each of its ranks will see them."""
    batches, horizon = run.data.train, run.horizon
    world = _world_size(run)
    if world != run.world_size:
        batches = Batches(batches.source, batches.batch_size, batches.shuffle, batches.drop_last, batches.seed,
                          rank=0, world_size=world)
        horizon = Horizon(*reversed(total_optimizer_steps(run.spec, len(batches))))
    return {"batches per epoch": len(batches), "optimizer steps per epoch": horizon.steps_per_epoch,
            "total optimizer steps": horizon.total_steps}


def _world_size(run: "Run") -> int:
    """The processes of the job: as launched, or as `trainctl run` will launch them."""
    par = run.spec.parallelism
    if run.dist is not None or par.name == "single":
        return run.world_size
    return (par.nproc_per_node or 1) * par.nnodes


def _parallelism_plan(run: "Run") -> str:
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


def _performance_plan(run: "Run") -> str:
    perf = run.spec.performance
    parts = [f"torch.compile ({perf.compile_mode})"] if perf.compile else []
    if run.checkpointed_modules:
        parts.append(f"activation checkpointing of {run.checkpointed_modules} modules")
    parts += ["channels_last"] if perf.channels_last else []
    parts += [f"MFU against {run.peak_tflops:g} TFLOP/s"] if run.peak_tflops else []
    return ", ".join(parts) or "eager"
