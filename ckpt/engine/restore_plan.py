"""Restore planning: from a manifest and the regions a reader wants to the ranged reads to make.

Pure (no I/O). For each requested region, the stored shards that overlap it give row-major byte
runs. With verification on, each run is widened to the checksum blocks it touches (a block is
read whole so its crc32c can be checked). Units are coalesced per file when the gap between
them is small, and cut into reads of at most ``read_chunk_bytes`` for parallelism. Each read
carries its copies (read bytes -> destination bytes) and its checks (block -> expected crc32c).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ckpt.errors import PlanError
from ckpt.format import dtypes
from ckpt.format.manifest import Manifest, ShardTable
from ckpt.geometry import boxes as regions
from ckpt.geometry.byte_ranges import ByteRange, coalesce


@dataclass(frozen=True, slots=True)
class Request:
    """Fill destination ``dest`` (a contiguous row-major buffer of ``box``) with ``key``'s values."""

    key: str
    box: regions.Box


@dataclass(frozen=True, slots=True)
class Copy:
    src: int  # offset in the read's bytes
    length: int
    dest: int  # index into the requests
    dest_offset: int  # byte offset in that destination


@dataclass(frozen=True, slots=True)
class Check:
    start: int  # offsets in the read's bytes
    end: int
    crc32c: int
    key: str


@dataclass(frozen=True, slots=True)
class ReadOp:
    path: str
    range: ByteRange
    copies: tuple[Copy, ...]  # sorted by src
    checks: tuple[Check, ...]


@dataclass(frozen=True, slots=True)
class RestorePlan:
    reads: tuple[ReadOp, ...]
    files: tuple[str, ...]  # every file touched (for up-front size checks)

    @property
    def total_bytes(self) -> int:
        return sum(r.range.length for r in self.reads)


def plan_restore(
    m: Manifest,
    requests: Sequence[Request],
    *,
    verify: bool,
    max_gap_bytes: int,
    read_chunk_bytes: int,
) -> RestorePlan:
    """Plan the reads that fill every request. Pure (no I/O)."""
    pieces: dict[str, list[tuple[int, int, int, int]]] = {}  # path -> (file_off, len, dest, dest_off)
    units: dict[str, dict[int, tuple[ByteRange, int, str]]] = {}  # path -> start -> (range, crc, key)
    for di, req in enumerate(requests):
        entry = m.tensors.get(req.key)
        if entry is None:
            raise PlanError(f"key {req.key!r} is not in the checkpoint of step {m.step}")
        whole = req.box.sizes == entry.shape and not any(req.box.offsets)
        if not whole and not req.box.within(entry.shape):
            raise PlanError(
                f"key {req.key!r}: requested region at {list(req.box.offsets)} of size "
                f"{list(req.box.sizes)} exceeds the saved shape {list(entry.shape)}"
            )
        itemsize = dtypes.BY_CODE[entry.dtype].itemsize
        table = entry.shards
        if whole and len(table.file) == 1 and table.sizes[0].tolist() == list(entry.shape):
            # The common case (a whole tensor stored in one shard, asked for whole): one run, no
            # geometry.
            nbytes = req.box.numel * itemsize
            if nbytes == 0:
                continue
            path = table.paths[int(table.file[0])]
            start, end = table.byte_range[0].tolist()
            pieces.setdefault(path, []).append((start, nbytes, di, 0))
            ulist = units.setdefault(path, {})
            if verify:
                crcs = table.crc32c.tolist()
                _add_blocks(ulist, [0], nbytes, ByteRange(start, end), crcs, m.block_bytes, req.key)
            else:
                ulist.setdefault(start, (ByteRange(start, start + nbytes), 0, req.key))
            continue
        for i in _overlapping(table, req.box):
            shard = entry.shards[i]
            part = regions.intersect(shard.box, req.box)
            if part is None or part.numel == 0:
                continue
            runs = regions.copy_runs(part, shard.box, req.box, itemsize)
            base = shard.byte_range.start
            plist = pieces.setdefault(shard.file, [])
            for s, d in zip(runs.src.tolist(), runs.dst.tolist(), strict=True):
                plist.append((base + s, runs.length, di, d))
            ulist = units.setdefault(shard.file, {})
            if verify:
                _add_blocks(ulist, runs.src.tolist(), runs.length, shard.byte_range, shard.crc32c, m.block_bytes, req.key)
            else:
                for s in runs.src.tolist():
                    ulist.setdefault(base + s, (ByteRange(base + s, base + s + runs.length), 0, req.key))
    reads: list[ReadOp] = []
    for path in sorted(pieces):
        unit_list = sorted(units[path].values(), key=lambda u: u[0].start)
        merged = coalesce([u[0] for u in unit_list], max_gap_bytes=max_gap_bytes, max_bytes=read_chunk_bytes)
        merged.sort(key=lambda p: p[0].start)
        starts = [r.start for r, _ in merged]
        copies: list[list[Copy]] = [[] for _ in merged]
        for off, length, dest, doff in pieces[path]:
            i = bisect.bisect_right(starts, off) - 1
            while length > 0:
                r = merged[i][0]
                take = min(length, r.end - off)
                copies[i].append(Copy(off - r.start, take, dest, doff))
                off, length, doff, i = off + take, length - take, doff + take, i + 1
        for (r, members), cps in zip(merged, copies, strict=True):
            checks: tuple[Check, ...] = ()
            if verify:
                checks = tuple(
                    Check(unit_list[j][0].start - r.start, unit_list[j][0].end - r.start, unit_list[j][1], unit_list[j][2])
                    for j in sorted(members)
                )
            reads.append(ReadOp(path, r, _merge(cps), checks))
    return RestorePlan(tuple(reads), tuple(sorted(pieces)))


def _overlapping(table: ShardTable, box: regions.Box) -> list[int]:
    """Indices of the shards that share at least one element with ``box`` (one vectorized test
    over the whole table, so a tensor of many shards costs no Python work per shard)."""
    if box.numel == 0:
        return []
    req_lo = np.array(box.offsets, dtype=np.int64)
    lo = np.maximum(table.offsets, req_lo)
    hi = np.minimum(table.offsets + table.sizes, req_lo + np.array(box.sizes, dtype=np.int64))
    out: list[int] = np.flatnonzero(np.all(hi > lo, axis=1)).tolist()
    return out


def _add_blocks(
    out: dict[int, tuple[ByteRange, int, str]],
    src_offsets: list[int],
    length: int,
    shard_range: ByteRange,
    crcs: Sequence[int],
    block_bytes: int,
    key: str,
) -> None:
    last_block = -1
    for s in src_offsets:  # ascending
        first, last = s // block_bytes, (s + length - 1) // block_bytes
        for b in range(max(first, last_block + 1), last + 1):
            start = shard_range.start + b * block_bytes
            out[start] = (ByteRange(start, min(start + block_bytes, shard_range.end)), crcs[b], key)
        last_block = max(last_block, last)


def _merge(copies: list[Copy]) -> tuple[Copy, ...]:
    """Sort by source and join copies that are adjacent in both source and destination."""
    copies.sort(key=lambda c: (c.src, c.dest, c.dest_offset))
    out: list[Copy] = []
    for c in copies:
        if out:
            p = out[-1]
            if p.dest == c.dest and p.src + p.length == c.src and p.dest_offset + p.length == c.dest_offset:
                out[-1] = Copy(p.src, p.length + c.length, p.dest, p.dest_offset)
                continue
        out.append(c)
    return tuple(out)
