"""The `parallelism` config group and the process group of a multi-process job: the DDP wrapper, the
few collectives the runner needs (cross-rank agreement), and the rank-0 rule for logs.

One process (`single`) is the default. `ddp` and `fsdp` run one process per device under torchrun,
either launched by the user (`torchrun --nproc_per_node=N -m trainctl run parallelism=ddp`) or by
trainctl itself (`parallelism.nproc_per_node=N`); starting the processes and deciding who owns the run
directory is :mod:`trainctl.launch`'s. Every rank trains the same frozen spec in the same run directory;
only rank 0 writes files and logs. What is particular to FSDP (sharding the model, sharded
checkpoints) lives in :mod:`trainctl.sharding`.

The spec and its checks are torch-free; the rest imports torch when called.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, List, Optional

from trainctl.errors import ConfigError, check, check_choice
from trainctl.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("trainctl")

SHARDING = ("full_shard", "shard_grad_op", "no_shard", "hybrid")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class ParallelismSpec:
    """How many processes train, and how they are started."""

    name: str = "single"
    """single (one process), ddp (DistributedDataParallel) or fsdp (fully sharded data parallel);
    ddp and fsdp run one process per device, under torchrun."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on CUDA, gloo on CPU), gloo or nccl."""
    nproc_per_node: Optional[int] = None
    """Processes per node when trainctl starts torchrun itself; null: run as launched (under torchrun,
    or as one process)."""
    nnodes: int = 1
    """Nodes, when trainctl starts torchrun (the same command runs on every node)."""
    node_rank: int = 0
    """This node's rank (0 .. nnodes-1), for static multi-node rendezvous."""
    rdzv_endpoint: Optional[str] = None
    """host:port of the rendezvous: node 0's address, required for several nodes. Null on one node: a
    free port of this machine, so several jobs can run side by side."""
    max_restarts: int = 0
    """Elastic restarts of the whole job after a rank fails; each restart resumes from the last
    checkpoint (checkpoint.resume is set to auto)."""
    timeout_minutes: float = 10.0
    """How long a collective waits for the other ranks before the job fails."""

    def validate(self, key: str = "parallelism") -> None:
        check_choice(self.backend, BACKENDS, f"{key}.backend")
        check(self.nproc_per_node is None or self.nproc_per_node >= 1, f"{key}.nproc_per_node", "must be >= 1")
        check(self.nproc_per_node is None or self.name != "single", f"{key}.nproc_per_node",
              "starting several processes needs a distributed strategy", "set parallelism=ddp (or fsdp)")
        check(self.nnodes >= 1, f"{key}.nnodes", "must be >= 1")
        check(0 <= self.node_rank < self.nnodes, f"{key}.node_rank", f"must be in 0..{self.nnodes - 1}")
        check(self.max_restarts >= 0, f"{key}.max_restarts", "must be >= 0")
        check(self.timeout_minutes > 0, f"{key}.timeout_minutes", "must be > 0")
        check(self.rdzv_endpoint is None or ":" in self.rdzv_endpoint, f"{key}.rdzv_endpoint", "must be host:port",
              "e.g. node0.cluster:29500")
        check(self.nnodes == 1 or self.rdzv_endpoint is not None, f"{key}.rdzv_endpoint",
              "several nodes meet at node 0's address", f"set {key}.rdzv_endpoint=NODE0_HOST:29500")

    @property
    def sharded(self) -> bool:
        return False


@dataclass
class FSDPSpec(ParallelismSpec):
    """Fully sharded data parallel (FSDP2, ``fully_shard``): each rank keeps a shard of the parameters,
    gradients and optimizer state, and gathers a unit's parameters only while it runs."""

    name: str = "fsdp"
    sharding: str = "full_shard"
    """full_shard (parameters resharded after forward), shard_grad_op (kept gathered from forward to
    backward: faster, more memory), no_shard (replicated, like DDP), hybrid (sharded within a group of
    `hybrid_shard_size` processes, replicated across groups)."""
    wrap_modules: List[str] = field(default_factory=list)
    """Units that gather their parameters separately: empty for the model's blocks (GPT blocks, CNN
    stages, MLP layers, or the entries of a custom model's outermost ModuleLists); otherwise shell-style
    patterns of module names or class names (`encoder.layers.*`, `TransformerBlock`)."""
    cpu_offload: bool = False
    """Keep the sharded parameters, gradients and optimizer step on the CPU (for models that do not fit
    on the devices)."""
    hybrid_shard_size: Optional[int] = None
    """Processes per shard group for sharding=hybrid; null: the processes of one node."""

    def validate(self, key: str = "parallelism") -> None:
        super().validate(key)
        check_choice(self.sharding, SHARDING, f"{key}.sharding")
        check(self.hybrid_shard_size is None or self.hybrid_shard_size >= 1, f"{key}.hybrid_shard_size",
              "must be >= 1 or null")
        check(self.hybrid_shard_size is None or self.sharding == "hybrid", f"{key}.hybrid_shard_size",
              "only applies to sharding=hybrid", f"set {key}.sharding=hybrid or {key}.hybrid_shard_size=null")

    @property
    def sharded(self) -> bool:
        return True


@dataclass(frozen=True)
class ParallelEntry:
    spec: type


PARALLELISMS: Registry[ParallelEntry] = Registry("parallelism")
"""The `parallelism` options and their schemas."""
PARALLELISMS.add("single", ParallelEntry(ParallelismSpec))
PARALLELISMS.add("ddp", ParallelEntry(ParallelismSpec))
PARALLELISMS.add("fsdp", ParallelEntry(FSDPSpec))


def launched_world_size() -> int:
    """The world size torchrun (or another launcher setting the same variables) started us with."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# --- the process group ----------------------------------------------------------------------------------

def _attempt_store(timeout: "datetime.timedelta"):
    """The agent's store, scoped to this restart attempt, when torchrun hosts it; None otherwise.

    torchrun's static rendezvous (``--master_port``) keeps one store for the life of the agent and
    ``init_process_group`` uses it unprefixed, so after an elastic restart the new workers can read the
    dead workers' gloo addresses and fail to connect. Keys under ``attempt_<restart count>`` cannot
    collide with an earlier attempt's.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"trainctl/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


class Distributed:
    """This process's place in a DDP or FSDP job, and the few collectives the runner needs."""

    def __init__(self, spec: ParallelismSpec, device_type: str) -> None:
        import torch
        import torch.distributed as dist

        self.spec = spec
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = spec.backend if spec.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
        if backend == "nccl" and device_type != "cuda":
            raise ConfigError("parallelism.backend", "nccl needs CUDA devices", "set parallelism.backend=gloo")
        self.backend = backend
        self._gradient_sync = True  # FSDP's default
        if not faulthandler.is_enabled():  # a rank killed by a native abort shows where it was
            faulthandler.enable()
        if not dist.is_initialized():
            if device_type == "cuda":
                torch.cuda.set_device(self.local_rank)
            timeout = datetime.timedelta(minutes=spec.timeout_minutes)
            store = _attempt_store(timeout)
            if store is None:
                dist.init_process_group(backend, timeout=timeout)
            else:
                dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size,
                                        timeout=timeout)
        self.device = torch.device("cuda", self.local_rank) if device_type == "cuda" else torch.device(device_type)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP: parameters, gradients, optimizer state and checkpoints are sharded across ranks."""
        return self.spec.sharded

    def wrap(self, model: "nn.Module") -> "nn.Module":
        """The module the training step calls: DDP's wrapper (FSDP shards the model in place instead,
        see :func:`trainctl.sharding.shard_model`)."""
        if self.sharded:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, model: "nn.Module", final: bool) -> Any:
        """Skip the gradient reduction on every micro-batch of a window but the last."""
        if self.sharded:  # FSDP2's switch; the window's last micro-batch reduce-scatters the sum
            if final != self._gradient_sync:  # it visits every FSDP module: flip it only when it changes
                model.set_requires_gradient_sync(final)  # type: ignore[operator]
                self._gradient_sync = final
            return contextlib.nullcontext()
        return contextlib.nullcontext() if final else model.no_sync()  # type: ignore[operator]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def sum(self, tensor: "torch.Tensor") -> "torch.Tensor":
        import torch.distributed as dist

        dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (one small all-reduce)."""
        import torch

        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.sum(value).item() > 0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> Optional[List[Any]]:
        """Every rank's ``obj``, as a list on rank 0 (None elsewhere)."""
        import torch.distributed as dist

        out: Optional[List[Any]] = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        """Leave the process group after a finish every rank agreed on. The ranks first wait for each
        other, so that none tears its connections down while a peer is still writing to them."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def start(spec: ParallelismSpec, device_type: str) -> Optional[Distributed]:
    """The process group of a launched multi-process job, or None for one process."""
    if spec.name == "single" or (launched_world_size() == 1 and "RANK" not in os.environ):
        return None
    return Distributed(spec, device_type)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """For ranks other than 0: log warnings and errors only (rank 0 reports for the job)."""
    logger = logging.getLogger("trainctl")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
