"""Shard coverage: whether N-d boxes tile a shape exactly (each element stored once), and if
not, a :class:`CoverageProblem` naming an overlap, a gap, or a layout too irregular to decide.

The manifest parser runs :func:`coverage_problem` over every tensor's shards; the commit runs
it over the writers' reports. Pure (no I/O).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

I64 = NDArray[np.int64]
_EMPTY = np.zeros(0, dtype=np.int64)

MAX_CORNERS = 1 << 22  # shard coverage: corners the corner test may visit per tensor
MAX_PAIR_CHECKS = 1_000_000  # shard coverage: steps the overlap search may take per tensor
SMALL_TILING = 8  # shard coverage: up to this many non-empty shards, compare every pair

@dataclass(frozen=True, slots=True)
class CoverageProblem:
    """Why boxes do not tile a shape: ``overlap`` (boxes ``a`` and ``b``), ``gap`` (``covered``
    of ``total`` elements) or ``irregular`` (too irregular to decide within the budget)."""

    kind: str
    a: int = -1
    b: int = -1
    covered: int = 0
    total: int = 0
    boxes: int = 0
    split: int = 0

    def describe(self, box: Any) -> str:
        """The message; ``box(i)`` describes box ``i`` (e.g. "offsets [0, 0] with sizes [2, 4]")."""
        if self.kind == "overlap":
            return f"shard {self.a} at {box(self.a)} and shard {self.b} at {box(self.b)} overlap; each element must be stored once"
        if self.kind == "irregular":
            return (
                f"{self.boxes} shards split along {self.split} dimensions do not tile the shape exactly, "
                f"or are too irregular to check within {MAX_PAIR_CHECKS} steps"
            )
        return f"the shards cover {self.covered} of {self.total} elements (gaps); each element must be stored once"


def coverage_problem(shape: tuple[int, ...], offsets: I64, sizes: I64) -> CoverageProblem | None:
    """Whether boxes ``(offsets[i], sizes[i])``, each already within ``shape``, tile it exactly:
    None if they do. Boxes with no element cover nothing and may be anywhere.

    Linear or n log n on every layout people use: only the dimensions that some box splits
    matter; with one such dimension the boxes are intervals (a sort); with more, the corner
    test, then a budgeted sweep to name an overlap.
    """
    numel = np.prod(sizes, axis=1, dtype=np.int64) if len(sizes) else _EMPTY
    total = math.prod(shape)
    covered = sum(numel.tolist()) if float(numel.sum(dtype=np.float64)) > 2.0**53 else int(numel.sum())
    live = np.flatnonzero(numel > 0)
    if len(live) >= 2:
        lo, sz = offsets[live], sizes[live]
        pair: tuple[int, int] | None
        if len(live) <= SMALL_TILING:
            pair = _pairwise(lo.tolist(), sz.tolist())
        else:
            pair, split, complete = _tiling_overlap(shape, lo, sz, covered == total)
            if pair is None and covered == total and not complete:
                return CoverageProblem("irregular", boxes=len(live), split=split)
        if pair is not None:
            return CoverageProblem("overlap", int(live[pair[0]]), int(live[pair[1]]))
    if covered != total:
        return CoverageProblem("gap", covered=covered, total=total)
    return None


def _pairwise(lo: list[list[int]], sz: list[list[int]]) -> tuple[int, int] | None:
    for i in range(len(lo)):
        for j in range(i + 1, len(lo)):
            if all(max(a, b) < min(a + x, b + y) for a, x, b, y in zip(lo[i], sz[i], lo[j], sz[j], strict=True)):
                return i, j
    return None


def _tiling_overlap(shape: tuple[int, ...], lo: I64, sz: I64, volume_ok: bool) -> tuple[tuple[int, int] | None, int, bool]:
    """Two overlapping boxes (all non-empty), or None; the number of split dimensions; and
    whether "None" is a proof (with ``volume_ok``, of an exact tiling)."""
    split = np.flatnonzero(np.any(sz != np.array(shape, dtype=np.int64), axis=0)).tolist()
    if not split:  # every box is the whole tensor
        return (0, 1), 0, True
    if len(split) == 1:
        d = split[0]
        order = np.argsort(lo[:, d], kind="stable")
        s = lo[order, d]
        e = s + sz[order, d]
        bad = np.flatnonzero(s[1:] < e[:-1])  # sorted by start: an overlap shows between neighbours
        if bad.size:
            return (int(order[bad[0]]), int(order[bad[0] + 1])), 1, True
        return None, 1, True
    if volume_ok and len(lo) << len(split) <= MAX_CORNERS and _corners_tile(shape, lo, sz, split):
        return None, len(split), True
    budget = [MAX_PAIR_CHECKS]
    boxes = list(zip(range(len(lo)), lo.tolist(), sz.tolist(), strict=True))
    pair = _overlap_in(boxes, split, budget)
    return pair, len(split), budget[0] >= 0


def _corners_tile(shape: tuple[int, ...], lo: I64, sz: I64, dims: list[int]) -> bool:
    """Whether boxes inside ``shape`` whose volumes sum to its volume tile it exactly.

    Mod 2, the discrete mixed difference of a box's indicator is its set of corners, and the
    difference operator is invertible. So if the corners of all boxes, XOR-ed, are exactly the
    corners of the whole shape, every element is covered an odd number of times; with the
    volumes adding up, exactly once. Only the split dimensions ``dims`` need to be looked at.
    """
    k = len(dims)
    low = lo[:, dims]
    high = low + sz[:, dims]
    bits = ((np.arange(1 << k)[:, None] >> np.arange(k)) & 1).astype(bool)  # (2**k, k)
    corners = np.where(bits[None], high[:, None, :], low[:, None, :]).reshape(-1, k)
    uniq, n = np.unique(corners, axis=0, return_counts=True)
    odd = uniq[n % 2 == 1]
    want = np.unique(np.where(bits, np.array([shape[d] for d in dims], dtype=np.int64), 0), axis=0)
    return bool(odd.shape == want.shape and np.array_equal(odd, want))


_Box = tuple[int, list[int], list[int]]  # (index, offsets, sizes)


def _overlap_in(boxes: list[_Box], dims: list[int], budget: list[int]) -> tuple[int, int] | None:
    """Slab sweep: along ``dims[0]``, between consecutive cut points the same boxes are present,
    and two of them overlap only if their projections on the other dimensions overlap in some
    slab (recursively; one dimension left is a sort). Linear-ish on grids; budgeted otherwise."""
    budget[0] -= len(boxes)
    if budget[0] < 0:
        return None
    d, rest = dims[0], dims[1:]
    order = sorted(boxes, key=lambda s: s[1][d])
    if not rest:
        holder, reach = order[0], -1
        for s in order:
            if s[1][d] < reach:
                return holder[0], s[0]
            if s[1][d] + s[2][d] > reach:
                holder, reach = s, s[1][d] + s[2][d]
        return None
    cuts = sorted({s[1][d] for s in boxes} | {s[1][d] + s[2][d] for s in boxes})
    active: list[_Box] = []
    i = 0
    for cut in cuts[:-1]:
        active = [s for s in active if s[1][d] + s[2][d] > cut]
        while i < len(order) and order[i][1][d] == cut:
            active.append(order[i])
            i += 1
        if len(active) > 1:
            pair = _overlap_in(active, rest, budget)
            if pair is not None or budget[0] < 0:
                return pair
    return None
