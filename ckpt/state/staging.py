"""Staging: a consistent host copy of a state, in buffers allocated once and reused.

An async save must not read tensors the training loop goes on changing. :class:`Staging` takes a
snapshot: every tensor leaf (plain tensor, ``ckpt.Shard``, DTensor) is copied into a host buffer
kept per key across snapshots (pinned when the source is on a CUDA device, so the copy is a DMA),
and the non-tensor values are encoded to JSON at the same moment. The snapshot is a
:class:`ckpt.state.tree.Flat` that ``write_shards`` accepts in place of the state.

A buffer is reallocated only when a key's shape, dtype or pinning changes; buffers of keys that
disappear are dropped. Memory: one host copy of the state (the snapshot), nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ckpt.state import tree
from ckpt.state.shard import Shard, is_dtensor


@dataclass(frozen=True, slots=True)
class StageStats:
    bytes_copied: int
    buffers_allocated: int  # by this snapshot (0 once warm)


class Staging:
    """Host staging buffers for repeated snapshots of states of the same shape."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.last: StageStats | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held in staging buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def snapshot(self, state: object) -> tree.Flat:
        """Copy ``state`` into the staging buffers; return it flattened. Blocks until the copies
        are complete (device-to-host copies included), so the caller may change ``state`` after."""
        flat = state if isinstance(state, tree.Flat) else tree.flatten(state)
        staged: dict[str, torch.Tensor | Shard] = {}
        copied = allocated = 0
        cuda = False
        for key, leaf in flat.tensors.items():
            if isinstance(leaf, Shard):
                buf, new = self._copy(key, leaf.tensor)
                staged[key] = Shard(buf, leaf.global_shape, leaf.offsets, leaf.replica_ranks)
                src = leaf.tensor
            elif is_dtensor(leaf):
                src = leaf.to_local()  # type: ignore[attr-defined]
                buf, new = self._copy(key, src)
                staged[key] = type(leaf).from_local(  # type: ignore[attr-defined]
                    buf, leaf.device_mesh, leaf.placements, run_check=False,  # type: ignore[attr-defined]
                    shape=leaf.shape, stride=leaf.stride(),
                )  # fmt: skip
            else:
                src = leaf
                buf, new = self._copy(key, leaf)
                staged[key] = buf
            cuda = cuda or src.device.type == "cuda"
            copied += buf.numel() * buf.element_size()
            allocated += new
        if cuda:
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        for gone in set(self._buffers) - set(flat.tensors):
            del self._buffers[gone]
        self.last = StageStats(copied, allocated)
        return tree.Flat(staged, flat.ndarray_keys, flat.objects, flat.tree)

    def _copy(self, key: str, src: torch.Tensor) -> tuple[torch.Tensor, int]:
        pin = src.device.type == "cuda"
        buf = self._buffers.get(key)
        new = 0
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype or buf.is_pinned() != pin:
            buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
            self._buffers[key] = buf
            new = 1
        buf.copy_(src, non_blocking=pin)
        return buf, new

