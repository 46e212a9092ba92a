"""FSDP (`parallelism=fsdp`): sharding a model with FSDP2's ``fully_shard``, the mixed-precision policy
that stands in for autocast, sharded checkpoints with torch.distributed.checkpoint (DCP), and the
export of the full weights to one safetensors file.

A sharded checkpoint directory holds one ``__<rank>_0.distcp`` file per rank and DCP's ``.metadata``
(the model and optimizer state, keyed by parameter name), beside the usual ``state.pt`` (run,
schedule, RNG, ... — everything that is not sharded), ``spec.yaml``, ``meta.json`` and the commit
marker, which rank 0 writes after every rank has written its shard.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from trainctl.errors import ConfigError
from trainctl.parallel import Distributed, FSDPSpec
from trainctl.performance import blocks_of, clean_name, matching_modules

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainctl.checkpoint import CheckpointStore
    from trainctl.precision import Precision

log = logging.getLogger("trainctl")

# --- sharding the model -------------------------------------------------------------------------------

def units(model: "nn.Module", spec: FSDPSpec, builtin: bool) -> List["nn.Module"]:
    """The modules that gather their parameters separately (the root holds the rest)."""
    if spec.wrap_modules:
        return matching_modules(model, list(spec.wrap_modules), "parallelism.wrap_modules")
    return blocks_of(model, builtin, "parallelism.wrap_modules",
                     "set parallelism.wrap_modules=[PATTERN] (module names or class names)")


def device_mesh(spec: FSDPSpec, dist: Distributed) -> Any:
    """1-D for full_shard and shard_grad_op; (replicate, shard) for hybrid and no_shard."""
    import os

    from torch.distributed.device_mesh import init_device_mesh

    world = dist.world_size
    if spec.sharding in ("full_shard", "shard_grad_op"):
        return init_device_mesh(dist.device.type, (world,))
    if spec.sharding == "no_shard":
        shard = 1
    else:
        shard = spec.hybrid_shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % shard:
        raise ConfigError("parallelism.hybrid_shard_size", f"{shard} does not divide the world size {world}",
                          "set parallelism.hybrid_shard_size to a divisor of the number of processes")
    return init_device_mesh(dist.device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))


def mixed_precision(precision: "Precision") -> Dict[str, Any]:
    """FSDP's mixed-precision policies for the units and the root, from the `precision` group.

    bf16 and fp16 compute with parameters cast to the low dtype when they are gathered, reduce
    gradients in fp32, and keep the sharded parameters and optimizer state in fp32; the root returns
    fp32 outputs so the loss is computed in fp32. The policy replaces autocast (it is not set twice).
    bf16_true parameters are bf16 already; fp32 and tf32 need no policy.
    """
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision.name not in ("bf16", "fp16"):
        return {"unit": None, "root": None}
    low = torch.bfloat16 if precision.name == "bf16" else torch.float16
    precision.dtype = None  # no autocast: the policy casts
    precision.policy = f"FSDP parameters in {precision.name}, gradients reduced in fp32"
    return {"unit": MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32),
            "root": MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32, output_dtype=torch.float32)}


def shard_model(model: "nn.Module", spec: FSDPSpec, dist: Distributed, precision: "Precision",
                builtin: bool) -> int:
    """Apply ``fully_shard`` to every unit, then to the root, in place; returns the number of units.
    The optimizer must be built afterwards (sharding replaces the parameters)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    chosen = units(model, spec, builtin)
    mesh = device_mesh(spec, dist)
    policies = mixed_precision(precision)
    common: Dict[str, Any] = {"mesh": mesh, "reshard_after_forward": spec.sharding != "shard_grad_op"}
    if spec.cpu_offload:
        common["offload_policy"] = CPUOffloadPolicy(pin_memory=dist.device.type == "cuda")
    for unit in chosen:
        fully_shard(unit, **common, **_mp(policies["unit"]))
    fully_shard(model, **common, **_mp(policies["root"]))
    return len(chosen)


def _mp(policy: Any) -> Dict[str, Any]:
    return {"mp_policy": policy} if policy is not None else {}  # FSDP's default: no casting


# --- checkpoints ----------------------------------------------------------------------------------------

def save_sharded(model: "nn.Module", optimizer: "torch.optim.Optimizer", directory: Path) -> None:
    """Every rank writes its shard of the model and optimizer state into ``directory`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": _saved_part(model, model_state), "optimizer": optimizer_state},
             checkpoint_id=str(directory))


def _saved_part(model: "nn.Module", state: Dict[str, Any]) -> Dict[str, Any]:
    """The entries of a model state dict that a checkpoint holds (a fine-tuning run: the trainable ones)."""
    from trainctl.files import saved_keys

    keys = saved_keys(model)
    return state if keys is None else {k: state[k] for k in keys if k in state}


def save_checkpoint(checkpointer: "CheckpointStore", dist: Distributed, model: "nn.Module",
                    optimizer: "torch.optim.Optimizer", step: int, state: Dict[str, Any], spec_yaml: Optional[str],
                    meta: Dict[str, Any], best: bool) -> Tuple[Optional[str], Optional[str]]:
    """A sharded checkpoint, on every rank: rank 0 makes the temporary directory, every rank writes its
    shard, and only when all have succeeded (agreed by a collective, then a barrier) does rank 0 add the
    rest and the commit marker. Returns (path, error) — the same on every rank."""
    from trainctl.files import CheckpointError

    tmp: Optional[str] = None
    error: Optional[str] = None
    if dist.is_main:
        try:
            tmp = str(checkpointer.begin(step))
        except CheckpointError as exc:
            error = str(exc)
    tmp, error = dist.broadcast((tmp, error))
    if error is not None:
        return None, error
    assert tmp is not None
    mine = None
    try:
        save_sharded(model, optimizer, Path(tmp))
    except Exception as exc:  # DCP reports a failure of any rank, wrapped, on every rank
        mine = " ".join(str(exc).split())[:400] or type(exc).__name__
    if dist.any(mine is not None):
        if dist.is_main:
            checkpointer.discard(Path(tmp))
        return None, (f"could not save the sharded checkpoint of step {step} in {checkpointer.directory}: "
                      f"{mine or 'another rank failed to write its shard'}")
    dist.barrier()  # every shard is on disk before the marker is written
    outcome: Tuple[Optional[str], Optional[str]] = (None, None)
    if dist.is_main:
        assert spec_yaml is not None
        try:
            outcome = (str(checkpointer.finish(Path(tmp), step, state, spec_yaml, {**meta, "sharded": True}, best)),
                       None)
        except CheckpointError as exc:
            outcome = (None, str(exc))
    return dist.broadcast(outcome)


def load_sharded(model: "nn.Module", optimizer: "torch.optim.Optimizer", directory: Path) -> None:
    """Every rank reads its shard of the model and optimizer state from ``directory`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from torch.distributed.checkpoint.state_dict import StateDictOptions

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": _saved_part(model, model_state), "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=len(state["model"]) == len(model_state)))


def load_sharded_weights(model: "nn.Module", directory: Path) -> None:
    """The full weights of a sharded checkpoint into an unsharded model, in one process."""
    import torch.distributed.checkpoint as dcp

    state = {"model": _saved_part(model, model.state_dict())}
    try:
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    except Exception as exc:  # DCP wraps every failure in its own exception types
        from trainctl.files import CheckpointError

        detail = " ".join(str(exc).split())
        raise CheckpointError(f"the weights in {directory} do not fit this model: {detail[:600]}") from None
    model.load_state_dict(state["model"], strict=len(state["model"]) == len(model.state_dict()))


def export_weights(model: "nn.Module", path: Path, metadata: Dict[str, str], is_main: bool) -> None:
    """Gather the full weights (collective, one unit at a time, to the CPU of rank 0) and write them as
    one safetensors file that a single process loads like any other run's ``model.safetensors``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return
    # A tied weight is stored once, under the name safetensors' save_model keeps (the first in sorted
    # order), so the file is the one a single process writes.
    names: Dict[int, List[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(clean_name(name))
    dropped = {n for group in names.values() for n in sorted(group)[1:]}
    from trainctl.files import PARTIAL_METADATA, save_state_dict, saved_keys

    keys = saved_keys(model)
    if keys is not None:  # a fine-tuning run: its trainable part, as one process would write it
        full, metadata = {k: full[k] for k in keys if k in full}, {**metadata, PARTIAL_METADATA: "1"}
    weights = {k: v.contiguous() for k, v in full.items() if k not in dropped}
    save_state_dict(weights, path, metadata)


def state_mib(model: "nn.Module", optimizer: "torch.optim.Optimizer") -> Dict[str, float]:
    """This rank's share of the training state in MiB: parameters, gradients (as large as the trainable
    parameters during a step) and optimizer state. Under FSDP about 1/N of one process's figures."""
    import torch

    from trainctl.regularization import _local as local

    params = list({id(p): p for p in model.parameters()}.values())
    param_bytes = sum(local(p).numel() * p.element_size() for p in params)
    grad_bytes = sum(local(p).numel() * p.element_size() for p in params if p.requires_grad)
    opt_bytes = 0
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                opt_bytes += local(value).numel() * value.element_size()
    mib = 1024 * 1024
    return {"parameters": round(param_bytes / mib, 3), "gradients": round(grad_bytes / mib, 3),
            "optimizer": round(opt_bytes / mib, 3), "total": round((param_bytes + grad_bytes + opt_bytes) / mib, 3)}
