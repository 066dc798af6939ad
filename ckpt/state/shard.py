"""Sharded leaves: ``ckpt.Shard`` (a local tensor that is one region of a global tensor) and
``torch.distributed.tensor.DTensor`` (whose placements say the same, for every rank).

Both describe a region ``(offsets, sizes)`` of a tensor of ``global_shape``. In a state passed to
``write_shards`` they say what this writer holds; in a restore ``target`` they say which region
to read into their tensor.

Pure (no I/O). Importing it does not import torch (the manifest parser reaches this module
through :mod:`ckpt.state.tree`): a Shard holds a tensor, so whoever makes one has torch already.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckpt.engine import owners
from ckpt.errors import StateError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False)
class Shard:
    """The region of a global tensor held in ``tensor``.

    Args:
        tensor: the local data; its shape is the region's size.
        global_shape: the shape of the whole tensor.
        offsets: where the region starts in each dimension.
        replica_ranks: the ranks that hold this same region with identical values (including this
            one), so it is written once; None if only this rank holds it.
    """

    tensor: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    replica_ranks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_shape", tuple(int(d) for d in self.global_shape))
        object.__setattr__(self, "offsets", tuple(int(o) for o in self.offsets))
        if self.replica_ranks is not None:
            object.__setattr__(self, "replica_ranks", tuple(sorted({int(r) for r in self.replica_ranks})))
        sizes = tuple(self.tensor.shape)
        if len(self.global_shape) != len(sizes) or len(self.offsets) != len(sizes) or any(
            o < 0 or o + s > g for o, s, g in zip(self.offsets, sizes, self.global_shape, strict=True)
        ):
            raise StateError(
                f"Shard of shape {list(sizes)} at offsets {list(self.offsets)} does not fit in the "
                f"global shape {list(self.global_shape)}"
            )

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @classmethod
    def empty(
        cls, global_shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype
    ) -> Shard:
        """A restore target: read region ``offsets``/``sizes`` into a new tensor."""
        import torch

        return cls(torch.empty(sizes, dtype=dtype), global_shape, offsets)


def is_dtensor(x: object) -> bool:
    # A DTensor exists only once its module is imported: don't pay that import (~0.5 s) for
    # plain tensors.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


@dataclass(frozen=True, slots=True)
class DTensorLayout:
    local: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]  # this rank's region
    regions: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # every region + holders


def dtensor_layout(dt: torch.Tensor, key: str) -> DTensorLayout:
    """Where a DTensor's local tensor sits, and every rank's region, from its placements."""
    import torch.distributed
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor import Shard as DShard

    if not isinstance(dt, DTensor):
        raise StateError(f"key {key!r}: not a DTensor")
    shard_dims: list[int | None] = []
    for p in dt.placements:
        if type(p) is DShard:
            shard_dims.append(p.dim if p.dim >= 0 else p.dim + dt.ndim)
        elif isinstance(p, Replicate):
            shard_dims.append(None)
        else:
            raise StateError(
                f"key {key!r}: DTensor placement {p} is not supported; ckpt saves Shard and Replicate "
                "placements (reduce a Partial tensor with .redistribute() first)"
            )
    mesh = dt.device_mesh
    ranks = mesh.mesh.tolist()
    regions = owners.mesh_regions(tuple(dt.shape), ranks, shard_dims)
    me = torch.distributed.get_rank()
    mine = [(o, s) for o, s, h in regions if me in h]
    local = dt.to_local()
    if len(mine) != 1 or tuple(local.shape) != mine[0][1]:
        raise StateError(
            f"key {key!r}: rank {me}'s local DTensor shape {list(local.shape)} does not match its "
            f"placements {dt.placements} on mesh {ranks} (uneven sharding ckpt does not model?)"
        )
    return DTensorLayout(local, tuple(dt.shape), mine[0][0], regions)
