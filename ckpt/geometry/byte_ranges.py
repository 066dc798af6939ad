"""Half-open byte ranges and the pure arithmetic of coalescing and splitting reads.

``ByteRange(start, end)`` is ``[start, end)`` everywhere in ckpt. HTTP's inclusive form is made
only inside the storage module.

Pure (no I/O).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class ByteRange:
    start: int
    end: int  # exclusive

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"invalid byte range [{self.start}, {self.end})")

    @property
    def length(self) -> int:
        return self.end - self.start

    def contains(self, other: ByteRange) -> bool:
        return self.start <= other.start and other.end <= self.end


def coalesce(
    ranges: Iterable[ByteRange], *, max_gap_bytes: int, max_bytes: int
) -> list[tuple[ByteRange, list[int]]]:
    """Merge ranges whose gap is at most ``max_gap_bytes`` into reads of at most ``max_bytes``.

    Returns ``(merged, members)`` pairs where ``members`` are indices into ``ranges``. Every input
    range lies in exactly one merged range; overlapping inputs are merged. A single input larger
    than ``max_bytes`` stays whole (splitting is :func:`split`'s job). Pure (no I/O).
    """
    items = sorted(enumerate(ranges), key=lambda p: (p[1].start, p[1].end))
    out: list[tuple[ByteRange, list[int]]] = []
    cur_start = cur_end = -1
    members: list[int] = []
    for idx, r in items:
        overlapping = r.start < cur_end  # always merged: outputs never overlap
        fits = r.start - cur_end <= max_gap_bytes and max(cur_end, r.end) - cur_start <= max_bytes
        if members and (overlapping or fits):
            cur_end = max(cur_end, r.end)
            members.append(idx)
            continue
        if members:
            out.append((ByteRange(cur_start, cur_end), members))
        cur_start, cur_end, members = r.start, r.end, [idx]
    if members:
        out.append((ByteRange(cur_start, cur_end), members))
    return out


def split(r: ByteRange, *, chunk_bytes: int, align: int = 1) -> list[ByteRange]:
    """Split ``r`` into pieces of at most ``chunk_bytes``; cut points are multiples of ``align``
    counted from ``r.start``. Pure (no I/O)."""
    if chunk_bytes <= 0 or align <= 0:
        raise ValueError("chunk_bytes and align must be positive")
    step = max(align, chunk_bytes - chunk_bytes % align)
    if r.length <= step:
        return [r]
    return [ByteRange(s, min(s + step, r.end)) for s in range(r.start, r.end, step)]


def blocks(r: ByteRange, *, block_bytes: int) -> list[ByteRange]:
    """The checksum blocks of a shard stored at ``r``: consecutive ``block_bytes`` pieces from
    ``r.start``, the last one shorter. An empty range has no blocks. Pure (no I/O)."""
    if r.length == 0:
        return []
    return split(r, chunk_bytes=block_bytes)


def find_overlaps(ranges: Sequence[ByteRange]) -> list[tuple[int, int]]:
    """Index pairs of ranges that share at least one byte (empty ranges never overlap)."""
    order = sorted((i for i in range(len(ranges)) if ranges[i].length), key=lambda i: ranges[i].start)
    out: list[tuple[int, int]] = []
    reach = -1
    reach_idx = -1
    for i in order:
        r = ranges[i]
        if r.start < reach:
            out.append((reach_idx, i))
        if r.end > reach:
            reach, reach_idx = r.end, i
    return out
