"""Distributed data parallel under ``torchrun``: driven by its environment variables, PyTorch's own DDP.

``torchrun --nproc_per_node=N -m reslab train ...`` starts N processes; each reads RANK, WORLD_SIZE and LOCAL_RANK,
joins a process group (NCCL on GPUs, gloo on CPUs) and trains its shard of every global batch. Only rank 0 writes
files and prints. ``--batch-size`` is the *global* batch: each rank takes ``batch_size / world_size`` of it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import PeerLost, UserError, first_line
from .rundir import CHECKPOINT_FILE

_store: dist.Store | None = None  # this attempt's key-value store: also where ranks report a failed collective
_timeout = 600.0  # seconds a collective may wait (--collective-timeout)


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


def init(device_type: str, timeout: float = 600.0) -> Dist:
    """Join the torchrun process group if there is one (idempotent); a single process otherwise.

    ``timeout``: seconds one collective may wait for the other ranks before it fails (``--collective-timeout``), so
    a rank that hangs or is stopped cannot keep the others waiting forever."""
    global _store, _timeout
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        _store, _timeout = _attempt_store(world), timeout
        dist.init_process_group(backend=backend, store=_store, rank=int(os.environ["RANK"]), world_size=world,
                                timeout=timedelta(seconds=timeout))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _attempt_store(world: int) -> dist.Store:
    """The store of torchrun's agent (or rank 0's, outside torchrun), its keys under a prefix of this attempt.

    The agent's store outlives an elastic restart: a worker of the new group that asked for a peer's address before
    the peer had written its own read the dead group's, and failed ("Gloo connectFullMesh failed ... Connection
    refused"), which used up a restart (measured: 2 of 3 tries of the two-kill test)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    rank = int(os.environ["RANK"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0, timeout=timedelta(minutes=10), multi_tenant=True)
    return dist.PrefixStore(f"reslab/attempt_{attempt}", store)


# What gloo's failures say (they are plain RuntimeErrors): a recv that timed out, DDP's all-reduce in backward
# ("Application timeout caused pair closure"), a peer whose socket closed.
_GLOO_FAILURES = ("gloo", "timed out", "timeout", "pair closure", "connection closed", "connection reset")


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed: it timed out, or a peer's connection closed."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and dist.is_initialized() and any(m in text for m in _GLOO_FAILURES)


@contextlib.contextmanager
def naming_lost_peers(run: Path) -> Iterator[None]:
    """A failed collective inside the block becomes one line naming the rank that did not answer (``peer_lost``)."""
    try:
        yield
    except Exception as exc:
        if not is_collective_failure(exc):
            raise
        raise peer_lost(exc, run / CHECKPOINT_FILE) from None


def peer_lost(exc: BaseException, checkpoint: Path, window: float = 10.0) -> PeerLost:
    """The one-line error of a failed collective, naming the ranks that did not answer.

    Every rank whose collective failed reports it in the store, then waits up to ``window`` seconds for the others
    to report; a rank that never does is the one that hung, was stopped or died."""
    rank, world = dist.get_rank(), dist.get_world_size()
    timed_out = any(m in str(exc).lower() for m in ("timed out", "timeout"))
    how = (f"did not answer within --collective-timeout {_timeout:g} s (hung or stopped)" if timed_out else
           "dropped out (its connection closed: dead?)")
    try:
        missing = _unreported(rank, world, min(window, _timeout))
        who = (f"rank {', '.join(map(str, missing))} of {world} {how}" if missing else
               f"every rank's collective failed ({first_line(exc)})")
    except Exception:  # the store went with its host
        host = "torchrun's agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "rank 0"
        who = f"the ranks' store, held by {host}, no longer answers: {host} {how}"
    return PeerLost(f"{who}; seen from rank {rank}. {_last_checkpoint(checkpoint)}")


def _unreported(rank: int, world: int, window: float) -> list[int]:
    """Report this rank's failed collective in the store; the ranks that have not reported theirs after ``window``
    seconds (ranks blocked in one collective fail together, a step apart at most)."""
    assert _store is not None
    _store.set_timeout(timedelta(seconds=window))
    _store.set(f"failed/{rank}", "1")
    deadline = time.monotonic() + window
    while True:
        missing = [r for r in range(world) if not _store.check([f"failed/{r}"])]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


def _last_checkpoint(path: Path) -> str:
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:  # none yet, or not readable: say so rather than promise it
        return "No checkpoint was written yet." if not path.exists() else f"{path} is not readable."
    return f"The last checkpoint, {path} (step {step}), is intact: continue with reslab train --resume {path.parent}"


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
