"""SPMD saves over torch.distributed (torchrun ranks): rank 0 coordinates, no planning collective.

Every rank calls :func:`save` with its own state. Rank 0 starts the attempt and sends it to all
ranks; every rank writes its own shards; the small JSON reports are gathered to rank 0, which
commits; the outcome goes back to every rank, so all ranks return the manifest's step or raise
the same WorkerFailedError naming the failed ranks. Only byte tensors cross the process group
(JSON, never pickle), on a dedicated gloo group whose timeout bounds every wait.

``save`` uses a gloo group of its own (created collectively on first use), never the training
process group. A caller that saves from a background thread (the CheckpointManager's async saves)
passes a group it created for that thread alone with :func:`new_group`.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Literal

import torch
import torch.distributed as dist

from ckpt.errors import CkptError, PlanError, WorkerFailedError
from ckpt.format import strictjson
from ckpt.options import SaveOptions
from ckpt.parallel import _protocol
from ckpt.state import tree
from ckpt.storage import Root, root_url

_GROUPS: dict[tuple[int, float], Any] = {}


def _group(timeout_s: float) -> Any:
    """A gloo group over all ranks with our timeout (created once per timeout, collectively)."""
    key = (id(dist.group.WORLD), timeout_s)
    cached = _GROUPS.get(key)
    if cached is not None:
        try:
            dist.get_process_group_ranks(cached)
            return cached
        except (KeyError, ValueError, RuntimeError):  # destroyed with its world: forget it
            pass
    for stale in [k for k, g in _GROUPS.items() if g is cached]:
        del _GROUPS[stale]
    _GROUPS[key] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return _GROUPS[key]


def new_group(timeout_s: float) -> Any:
    """A new gloo group over all ranks, for one thread's use (collective: every rank calls it at
    the same point). Every wait on it ends within ``timeout_s``."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def rank_and_world() -> tuple[int, int] | None:
    """This process's (rank, world size), or None without an initialized process group."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_rank(), dist.get_world_size()


def agree(flags: list[int], group: Any) -> list[int]:
    """The element-wise maximum of every rank's ``flags`` (collective, small)."""
    t = torch.tensor(flags, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in t.tolist()]


def broadcast_int(value: int, group: Any) -> int:
    """Rank 0's ``value`` on every rank (collective)."""
    t = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(t, src=0, group=group)
    return int(t.item())


def _owned(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def _broadcast(data: bytes | None, group: Any) -> bytes:
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    # torch-owned copies only: gloo threads may outlive a tensor that borrows Python memory
    buf = _owned(data) if data else torch.empty(int(size), dtype=torch.uint8)
    if int(size):
        dist.broadcast(buf, src=0, group=group)
    return bytes(buf.numpy()) if int(size) else b""


def _all_gather(data: bytes, group: Any) -> list[bytes]:
    world = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: len(data)] = _owned(data) if data else padded[:0]
    bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(bufs, padded, group=group)
    return [bytes(b[: int(s)].numpy()) for b, s in zip(bufs, sizes, strict=True)]


class _Gloo:
    """The protocol's transport over a gloo group: rank 0 coordinates; JSON byte tensors only.
    Before each gather a monitored barrier names, on rank 0, the ranks that are gone."""

    def __init__(self, group: Any, timeout: datetime.timedelta, state: object, storage_options: dict[str, Any] | None):
        self.rank: int | None = dist.get_rank()
        self.world_size, self.coordinator = dist.get_world_size(), self.rank == 0
        self.group, self.timeout, self.state, self.storage_options = group, timeout, state, storage_options

    def _flat(self) -> tree.Flat:
        """The state flattened once, on first use (describe and write share it); a state that
        cannot be flattened fails inside the protocol, so every rank hears of it."""
        if not isinstance(self.state, tree.Flat):
            self.state = tree.flatten(self.state)
        return self.state

    def barrier(self) -> None:
        dist.monitored_barrier(self.group, timeout=self.timeout, wait_all_ranks=True)

    def broadcast(self, msg: _protocol.Msg | None) -> _protocol.Msg:
        got: _protocol.Msg = json.loads(_broadcast(None if msg is None else strictjson.dumps(msg), self.group))
        return got

    def gather(self, step: _protocol.WriterStep, payload: _protocol.Msg) -> dict[int, _protocol.Msg] | None:
        assert self.rank is not None
        mine = _protocol.writer_reply(step, self._flat, self.rank, payload, self.storage_options)
        self.barrier()  # who died while working?
        everyone = _all_gather(strictjson.dumps(mine), self.group)
        return {r: json.loads(d) for r, d in enumerate(everyone)} if self.coordinator else None


def save(
    root: Root,
    state: object,
    *,
    step: int,
    plain_tensors: Literal["auto", "exclusive", "replicated"] = "auto",
    options: SaveOptions | None = None,
    user_metadata: dict[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
    timeout_s: float = 1800.0,
    group: Any | None = None,
) -> int:
    """Save ``state`` of every rank as checkpoint ``step``; call on all ranks. Returns the step.

    ``plain_tensors="auto"`` (default) learns who holds which plain tensor with one small
    exchange of names, dtypes and shapes: a key several ranks hold is a replica, written once.
    ``group``: a gloo group from :func:`new_group` to coordinate on (default: one ckpt creates
    and caches per timeout); ``timeout_s`` bounds every wait on a peer either way.
    """
    root = root_url(root)
    if not dist.is_initialized():
        raise PlanError("ckpt.parallel.torchrun.save needs an initialized torch.distributed process group")
    rank = dist.get_rank()
    try:
        t = _Gloo(group if group is not None else _group(timeout_s), datetime.timedelta(seconds=timeout_s), state,
                  storage_options)  # fmt: skip
        t.barrier()  # rank 0 learns here, by name, which ranks are gone before anything is written
        _protocol.coordinated_save(t, root, step=step, plain_tensors=plain_tensors, options=options,
                                   user_metadata=user_metadata, storage_options=storage_options)  # fmt: skip
        return step
    except CkptError:
        raise
    except RuntimeError as err:  # a collective failed (DistError too): a rank died or timed out
        raise WorkerFailedError(
            f"rank {rank}: checkpoint coordination of step {step} failed (a rank died or stopped "
            f"answering within {timeout_s:.0f} s): {err}"
        ) from err

