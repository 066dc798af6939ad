"""Shared reads: which rank fetches which bytes when several ranks restore overlapping regions.

Pure (no I/O). Every rank's restore plan reads byte ranges of files. Where ranks need the same
bytes (data-parallel replicas restoring the same weights, the replicate dimension of an HSDP
mesh) each byte should leave the store once per job: the ranges of every rank are cut at every
boundary into **segments** (each needed by a fixed set of ranks), each segment gets one **owner**
among the ranks that need it (balanced by bytes), which fetches it and sends it to the others.
Segments are grouped, in file order, into **slabs** of bounded size: the exchange runs slab
by slab, so no rank ever holds more than a slab of fetched bytes besides its destinations.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

Range = tuple[str, int, int]  # (path, start, end): half-open byte range of a file


@dataclass(frozen=True, slots=True)
class Segment:
    path: str
    start: int
    end: int
    owner: int  # the rank that fetches it
    needers: tuple[int, ...]  # the ranks that need it (owner included), ascending

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class SharePlan:
    segments: tuple[Segment, ...]  # in (path, start) order
    slabs: tuple[tuple[int, int], ...]  # [first, last) segment indices of each slab, in order

    def fetched_by(self, rank: int) -> int:
        """Bytes ``rank`` fetches from the store."""
        return sum(s.length for s in self.segments if s.owner == rank)

    @property
    def fetched(self) -> int:
        """Bytes fetched from the store by all ranks together: each needed byte once."""
        return sum(s.length for s in self.segments)


def plan_shared(reads: Sequence[Sequence[Range]], *, max_segment_bytes: int, slab_bytes: int) -> SharePlan:
    """Segments, owners and slabs for the ranges each rank (index = rank) reads. Every rank
    computes the same plan from the same input (deterministic: no set or dict order matters).

    Segments are no longer than ``max_segment_bytes`` (so a big shared range is fetched by several
    ranks in parallel); a slab holds whole segments, at most ``slab_bytes`` of them unless one
    segment alone is bigger."""
    if max_segment_bytes < 1 or slab_bytes < 1:
        raise ValueError("max_segment_bytes and slab_bytes must be positive")
    by_path: dict[str, list[tuple[int, int, int]]] = {}
    for rank, ranges in enumerate(reads):
        for path, start, end in ranges:
            if end > start:
                by_path.setdefault(path, []).append((start, end, rank))
    pieces: list[tuple[str, int, int, tuple[int, ...]]] = []
    for path in sorted(by_path):
        pieces.extend((path, a, b, who) for a, b, who in _sweep(by_path[path], max_segment_bytes))
    load = [0] * len(reads)
    owners: dict[int, int] = {}
    # biggest first, each to the needer with the least bytes so far (ties: the lower rank)
    for i in sorted(range(len(pieces)), key=lambda i: (-(pieces[i][2] - pieces[i][1]), i)):
        _, a, b, who = pieces[i]
        owner = min(who, key=lambda r: (load[r], r))
        owners[i] = owner
        load[owner] += b - a
    segments = tuple(Segment(p, a, b, owners[i], who) for i, (p, a, b, who) in enumerate(pieces))
    return SharePlan(segments, _slabs(segments, slab_bytes))


def _sweep(ranges: list[tuple[int, int, int]], max_bytes: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """The ranges of one file cut at every boundary: (start, end, ranks needing it), adjacent
    pieces needed by the same ranks joined again, then cut to at most ``max_bytes``."""
    events: dict[int, list[tuple[int, int]]] = {}
    for start, end, rank in ranges:
        events.setdefault(start, []).append((rank, 1))
        events.setdefault(end, []).append((rank, -1))
    active: dict[int, int] = {}
    out: list[tuple[int, int, tuple[int, ...]]] = []
    points = sorted(events)
    for here, nxt in itertools.pairwise(points):
        for rank, d in events[here]:
            active[rank] = active.get(rank, 0) + d
            if not active[rank]:
                del active[rank]
        if not active:
            continue
        who = tuple(sorted(active))
        if out and out[-1][1] == here and out[-1][2] == who:
            out[-1] = (out[-1][0], nxt, who)
        else:
            out.append((here, nxt, who))
    cut: list[tuple[int, int, tuple[int, ...]]] = []
    for a, b, who in out:
        n = -(-(b - a) // max_bytes)
        step = -(-(b - a) // n)  # n pieces of nearly equal size
        cut.extend((x, min(b, x + step), who) for x in range(a, b, step))
    return cut


def _slabs(segments: tuple[Segment, ...], slab_bytes: int) -> tuple[tuple[int, int], ...]:
    slabs: list[tuple[int, int]] = []
    first, size = 0, 0
    for i, s in enumerate(segments):
        if i > first and size + s.length > slab_bytes:
            slabs.append((first, i))
            first, size = i, 0
        size += s.length
    if segments:
        slabs.append((first, len(segments)))
    return tuple(slabs)
