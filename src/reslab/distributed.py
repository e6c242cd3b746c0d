"""Distributed data parallel under ``torchrun``: driven by its environment variables, PyTorch's own DDP.

``torchrun --nproc_per_node=N -m reslab train ...`` starts N processes; each reads RANK, WORLD_SIZE and LOCAL_RANK,
joins a process group (NCCL on GPUs, gloo on CPUs) and trains its shard of every global batch. Only rank 0 writes
files and prints. ``--batch-size`` is the *global* batch: each rank takes ``batch_size / world_size`` of it.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank, world size, local rank (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0


def init(device_type: str) -> Dist:
    """Join the torchrun process group if there is one (idempotent); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        store = _attempt_store(world)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]), world_size=world)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _attempt_store(world: int) -> dist.Store | None:
    """After torchrun's elastic agent restarted the workers, the process group's keys under a prefix of this attempt.

    The agent's store outlives a restart: a worker of the new group that asked for a peer's address before the peer
    had written its own read the dead group's, and failed ("Gloo connectFullMesh failed ... Connection refused"),
    which used up a restart (measured: 2 of 3 tries of the two-kill test). ``None``: the default rendezvous."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt in (None, "0") or "MASTER_ADDR" not in os.environ:
        return None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    rank = int(os.environ["RANK"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0, timeout=timedelta(minutes=10), multi_tenant=True)
    return dist.PrefixStore(f"reslab/attempt_{attempt}", store)


def all_sum(*values: torch.Tensor) -> list[torch.Tensor]:
    """Sum tensors over all processes (a no-op without a process group); exact for integer counts."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    out = []
    for v in values:
        v = v.clone()
        dist.all_reduce(v, op=dist.ReduceOp.SUM)
        out.append(v)
    return out


def shard_for_eval(n: int, d: Dist) -> torch.Tensor:
    """Indices of this rank's share of ``n`` evaluation images: ``rank, rank + world, ...``.

    Shares may differ by one image; nothing is padded or repeated, so summed counts are exact.
    """
    return torch.arange(d.rank, n, d.world)


def wrap(model: torch.nn.Module, d: Dist, device: torch.device, sync_bn: bool) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` (optionally with SyncBatchNorm); the model itself otherwise."""
    if not d.enabled:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs only)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sync_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), so all ranks evaluate the model rank 0 saves."""
    if dist.is_available() and dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b, src=0)


def _agree(value: int, device: torch.device, collective) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    collective(t)
    return int(t.item())


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank (``value`` itself without a process group): one decision for all."""
    return _agree(value, device, lambda t: dist.broadcast(t, src=0))


def max_int(value: int, device: torch.device) -> int:
    """The largest ``value`` over all ranks (``value`` itself without a process group)."""
    return _agree(value, device, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read afterwards measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown(wait_for_peers: bool = False) -> None:
    """Leave the process group (at the end of a command under torchrun: a clean exit, no leaked group warning).

    ``wait_for_peers`` (after a command that succeeded on every rank): first wait until every rank is done, so no
    rank tears its connections down while a peer's last collective still uses them. Never after a failure: a dead
    peer would never arrive."""
    if dist.is_available() and dist.is_initialized():
        # The DDP wrapper's reducer holds the process group: freed now (reference cycles included), the group's
        # gloo threads are joined by destroy_process_group, not left to the interpreter's exit, where a joinable
        # thread's destructor aborts the process ("terminate called without an active exception", pytorch#190489).
        gc.collect()
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
