"""Boxes (hyper-rectangles) of a global tensor and their row-major byte runs.

A stored shard and a requested region are both boxes ``(offsets, sizes)`` in the index space of
the global tensor. Where they intersect, the bytes to move form row-major runs in the shard's
storage and in the destination's storage; :func:`copy_runs` gives both sets of offsets.

Pure (no I/O).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Box:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @classmethod
    def whole(cls, shape: tuple[int, ...]) -> Box:
        return cls((0,) * len(shape), tuple(shape))

    def within(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == self.ndim and all(
            o >= 0 and o + s <= n for o, s, n in zip(self.offsets, self.sizes, shape, strict=True)
        )


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes of the same rank, or None if they share no element."""
    offs: list[int] = []
    sizes: list[int] = []
    for ao, asz, bo, bsz in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        offs.append(lo)
        sizes.append(hi - lo)
    if a.ndim == 0:
        return a  # two scalars always coincide
    return Box(tuple(offs), tuple(sizes))


@dataclass(frozen=True, slots=True)
class Runs:
    """Row-major runs: ``src[i]`` and ``dst[i]`` are byte offsets of run ``i``, each ``length`` long."""

    src: np.ndarray  # int64 byte offsets relative to the source box's first byte
    dst: np.ndarray  # int64 byte offsets relative to the destination box's first byte
    length: int


def copy_runs(part: Box, src: Box, dst: Box, itemsize: int) -> Runs:
    """Byte runs that move ``part`` (inside both boxes) from ``src``'s row-major storage to ``dst``'s.

    Trailing dimensions that ``part`` covers fully in both boxes are merged into one run, so a
    row-sharded tensor yields a single run per shard and a column split yields one run per row.
    """
    ndim = part.ndim
    if ndim == 0:
        zero = np.zeros(1, dtype=np.int64)
        return Runs(zero, zero, itemsize)
    # Merge the trailing dims: a run spans dims [k, ndim) where dims k+1.. are full in both.
    k = ndim - 1
    while k > 0 and part.sizes[k] == src.sizes[k] == dst.sizes[k]:
        k -= 1
    run_elems = math.prod(part.sizes[k:])
    src_strides = _strides(src.sizes)
    dst_strides = _strides(dst.sizes)
    rel_src = [p - s for p, s in zip(part.offsets, src.offsets, strict=True)]
    rel_dst = [p - d for p, d in zip(part.offsets, dst.offsets, strict=True)]
    base_src = sum(r * st for r, st in zip(rel_src, src_strides, strict=True))
    base_dst = sum(r * st for r, st in zip(rel_dst, dst_strides, strict=True))
    src_off = np.full(1, base_src, dtype=np.int64)
    dst_off = np.full(1, base_dst, dtype=np.int64)
    for d in range(k):  # outer dims: a grid of run starts
        steps = np.arange(part.sizes[d], dtype=np.int64)
        src_off = (src_off[:, None] + steps[None, :] * src_strides[d]).reshape(-1)
        dst_off = (dst_off[:, None] + steps[None, :] * dst_strides[d]).reshape(-1)
    return Runs(src_off * itemsize, dst_off * itemsize, run_elems * itemsize)


def _strides(sizes: tuple[int, ...]) -> list[int]:
    out = [1] * len(sizes)
    for i in range(len(sizes) - 2, -1, -1):
        out[i] = out[i + 1] * sizes[i + 1]
    return out
