"""The executor: runs save and restore plans against a Storage, concurrently, under a byte budget.

Save streams tensor memory straight into shard files (no serialization copy on local disks),
computing the per-block crc32c as the bytes go by (one pass; the per-file CRC is combined from
the blocks' CRCs). Restore issues the planned
ranged reads in parallel, reading straight into destination memory where the copies of a read
tile it (``preadv`` on local disks), verifies every block checksum, then scatters the rest. On a
local disk a read is made in pieces of whole blocks (:data:`PIECE_BYTES`), and each piece's
blocks are checked as soon as it lands, before the worker reads the next: the checksums run on
bytes still in the CPU's cache, while the other workers' reads are in flight, rather than all
after their read (the last read's checksums alone on the critical path), and a mismatch stops
its read there. On a local disk each file's reads are also run front to back by one or a few
workers (:func:`streams`), so the disk sees a few sequential streams. Saves write files of
small chunks on one thread (:func:`writer_threads`) and flush every file after all are written
(:func:`sync_files`). The first failure cancels the reads not yet started. Each file write and each read is one
storage call, run by the pool's workers under the storage's deadline (``Storage.io_timeout_s``;
a write's clock restarts at each chunk it takes), with no thread of its own.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import crc32c
import torch

from ckpt._concurrency import DEFAULT_IO_TIMEOUT_S as DEFAULT_IO_TIMEOUT_S
from ckpt._concurrency import ByteBudget as ByteBudget
from ckpt._concurrency import run_all as run_all
from ckpt.engine import reuse
from ckpt.engine.restore_plan import Check, ReadOp, RestorePlan
from ckpt.engine.save_plan import FilePlan
from ckpt.errors import (
    ChecksumMismatchError,
    CkptError,
    CorruptCheckpointError,
)
from ckpt.format import crc
from ckpt.geometry import byte_ranges as ranges
from ckpt.progress import FileCounter, Meter
from ckpt.storage import Checked, Storage

T = TypeVar("T")
R = TypeVar("R")
_MAX_IOVECS = 512  # beyond this many segments, read into scratch and copy instead
# Local disks: a verified read is made in pieces of this many bytes (whole checksum blocks), each
# checked as it lands (read_plan). Small enough that a piece is still in the CPU's cache when its
# checksums run and that the checksums after the last read are short; large enough that the
# extra preadv per piece costs nothing next to the bytes.
PIECE_BYTES = 4 << 20


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a flat memoryview (writable, zero-copy)."""
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")  # type: ignore[arg-type]


# --- save --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrittenFile:
    path: str
    size: int
    crc32c: int
    block_crcs: dict[str, tuple[int, ...]]  # key -> crc per block of its bytes
    hashes: dict[str, str]  # key -> content hash, for the keys asked to be hashed (incremental saves)


def write_files(
    storage: Storage,
    plans: Sequence[FilePlan],
    tensors: dict[str, torch.Tensor],
    *,
    block_bytes: int,
    num_threads: int,
    fsync: bool,
    meter: Meter | None = None,
    hash_keys: frozenset[str] = frozenset(),
) -> list[WrittenFile]:
    """Write every planned file; return sizes and checksums. Tensors must be CPU-contiguous.
    ``meter`` counts the bytes as the storage takes them, and each file once written.
    ``hash_keys``: the items whose content hash (``ckpt.engine.reuse``) is computed from the
    same blocks as their CRCs, in the same pass. ``fsync``: the files are durable on return:
    written first, then fsynced all at once (:func:`sync_files`), so that writes on few threads
    (:func:`writer_threads`) do not wait for each other's flushes; False leaves that to the
    caller (a save that builds its manifest while the flushes run)."""
    results: dict[str, WrittenFile] = {}

    def write_one(fp: FilePlan) -> None:
        state = {"crc": 0}
        block_crcs: dict[str, tuple[int, ...]] = {}
        hashes: dict[str, str] = {}
        counter = FileCounter(meter) if meter is not None and meter.active else None

        def chunks() -> Iterator[Checked]:
            # each chunk goes with its CRC-32C: a store that checks uploads (S3) combines them
            # rather than hashing the bytes again
            head_crc = crc32c.crc32c(fp.header)
            state["crc"] = head_crc
            yield Checked(fp.header, head_crc)
            pos = len(fp.header)
            for item, _ in fp.items:
                view = byte_view(tensors[item.key])
                crcs = []
                h = reuse.hasher() if item.key in hash_keys else None
                for off in range(0, len(view), block_bytes):
                    if counter is not None:
                        counter.seen(pos)  # the storage took the chunk before this one
                    blk = view[off : off + block_bytes]
                    c = crc32c.crc32c(blk)  # one pass: the file's CRC is combined from the blocks'
                    if h is not None:
                        h.update(blk)
                    crcs.append(c)
                    state["crc"] = crc.combine(state["crc"], c, len(blk), fast=len(blk) == block_bytes)
                    yield Checked(blk, c)
                    pos += len(blk)
                block_crcs[item.key] = tuple(crcs)
                if h is not None:
                    hashes[item.key] = reuse.digest(h)

        # the function, not one generator: an S3 upload that must start over reads the data again
        # (each run of chunks() recomputes the checksums from scratch)
        storage.write_file(fp.path, chunks, size=fp.size, fsync=False, stable=True)  # tensor memory
        results[fp.path] = WrittenFile(fp.path, fp.size, state["crc"], block_crcs, hashes)
        if counter is not None and meter is not None:
            counter.seen(fp.size)
            meter.add(files=1)

    # an object store's writes wait on the network, which more threads overlap whatever the chunks
    threads = writer_threads(plans, block_bytes, num_threads) if storage.local_disk else num_threads
    run_all(write_one, plans, num_threads=threads, timeout_s=storage.io_timeout_s,
            what=lambda fp: f"{storage.where(fp.path)}: write")  # fmt: skip
    if fsync:
        sync_files(storage, [fp.path for fp in plans], num_threads=num_threads)
    return [results[fp.path] for fp in plans]


#: below this many bytes per chunk on average, a save's files on a local disk are written by one
#: thread: their time is per-chunk Python (a checksum call, a view, a record per tensor) that
#: more threads only fight over the GIL for (20,000 tensors of 1-30 KiB: 4 threads took 1.2 s,
#: one 0.7 s). Larger chunks spend their time in C (CRC-32C, copies into the page cache) with the
#: GIL released. Object stores keep every thread: their writes wait on the network.
SMALL_CHUNK_BYTES = 256 << 10


def writer_threads(plans: Sequence[FilePlan], block_bytes: int, num_threads: int) -> int:
    """How many threads write ``plans``: ``num_threads``, or 1 for files of small chunks."""
    nbytes = sum(fp.size for fp in plans)
    chunks = sum(max(1, -(-br.length // block_bytes)) for fp in plans for _, br in fp.items)
    return 1 if chunks and nbytes < chunks * SMALL_CHUNK_BYTES else num_threads


def sync_files(storage: Storage, paths: Sequence[str], *, num_threads: int) -> None:
    """Make the files ``paths`` (written with ``fsync=False``) durable, several at once (an
    fsync waits on the disk with the GIL released; nothing on an object store)."""
    if storage.local_disk:
        run_all(lambda p: storage.sync_files([p]), paths, num_threads=num_threads, timeout_s=storage.io_timeout_s,
                what=lambda p: f"{storage.where(p)}: fsync")  # fmt: skip


# --- restore -----------------------------------------------------------------------------------


class Reader(Protocol):
    """What :func:`read_plan` reads through: a :class:`~ckpt.storage.Storage`, or bytes other
    ranks fetched for this one (``ckpt.parallel.torchrun``'s shared restore)."""

    local_disk: bool
    io_timeout_s: float | None

    def where(self, rel: str) -> str: ...

    def read_pieces(
        self, rel: str, start: int, pieces: Sequence[list[memoryview]], landed: Callable[[int], None]
    ) -> None: ...

    def read_into_sized(self, rel: str, start: int, buffers: list[memoryview], *, file_size: int) -> None: ...


def read_plan(
    storage: Reader,
    plan: RestorePlan,
    dests: Sequence[memoryview],
    *,
    num_threads: int,
    max_inflight_bytes: int,
    piece_bytes: int | None = None,
    meter: Meter | None = None,
    file_sizes: Mapping[str, int] | None = None,
) -> None:
    """Run every read of ``plan`` into ``dests`` (flat byte views, one per request). ``meter``
    counts the bytes of each piece once checked, and each file once all its reads are.
    ``file_sizes``: each file's expected size, checked by every read of it
    (``Storage.read_into_sized``, in one piece) where the caller did not stat the files first.

    A read with checks is made in pieces of at most ``piece_bytes`` (whole checksum blocks; a
    block larger than that is a piece of its own), and each piece's blocks are checked as soon
    as it lands, before the next piece is read: the checksums of one worker's piece run while
    the other workers' reads are in flight, instead of all of a wave's checksums after all of
    its reads. None: :data:`PIECE_BYTES` on a local disk, no pieces on an object store (there,
    each piece would be one more request, a round trip)."""
    if piece_bytes is None:
        piece_bytes = PIECE_BYTES if storage.local_disk else 0
    budget = ByteBudget(max_inflight_bytes)
    counting = meter is not None and meter.active
    left = collections.Counter(op.path for op in plan.reads) if counting else collections.Counter[str]()
    left_lock = threading.Lock()

    def done(op: ReadOp) -> None:
        if meter is None:
            return
        with left_lock:
            left[op.path] -= 1
            finished = left[op.path] == 0
        meter.add(files=int(finished))

    def run(op: ReadOp) -> None:
        layout = _tiles(op)
        segments: list[memoryview] = []
        scratch: memoryview | None = None
        if layout is None:  # copies overlap or are too many: read into scratch, then copy
            cost = op.range.length
        else:
            cost = sum(length for dest, length in layout if dest < 0)
        budget.acquire(cost)
        try:
            if layout is None:
                scratch = memoryview(bytearray(op.range.length))
                segments = [scratch]
            else:
                copies = iter(op.copies)
                for dest, length in layout:
                    if dest < 0:
                        segments.append(memoryview(bytearray(length)))
                    else:
                        c = next(copies)
                        segments.append(dests[dest][c.dest_offset : c.dest_offset + length])
            cut = pieces(op, piece_bytes if file_sizes is None else 0)
            views = _cut(segments, cut)

            def landed(i: int) -> None:  # on this worker, before it reads the next piece
                _verify(storage, op, views[i], cut[i].start, cut[i].checks)
                if counting and meter is not None:
                    meter.add(cut[i].end - cut[i].start)

            if file_sizes is None:
                storage.read_pieces(op.path, op.range.start, views, landed)
            else:  # one piece: the read whose reply states the file's size
                storage.read_into_sized(op.path, op.range.start, views[0], file_size=file_sizes[op.path])
                landed(0)
            if scratch is not None:
                for c in op.copies:
                    dests[c.dest][c.dest_offset : c.dest_offset + c.length] = scratch[c.src : c.src + c.length]
            if counting:
                done(op)
        except CkptError:
            raise
        except OSError as err:
            raise CorruptCheckpointError(f"{storage.where(op.path)}: {err}") from err
        finally:
            budget.release(cost)

    if not storage.local_disk:
        run_all(run, plan.reads, num_threads=num_threads, timeout_s=storage.io_timeout_s,
                what=lambda op: f"{storage.where(op.path)}: read of [{op.range.start}, {op.range.end})")  # fmt: skip
        return

    def run_chain(chain: list[ReadOp]) -> None:
        for op in chain:
            run(op)

    parts = min(num_threads, os.cpu_count() or 1)
    run_all(run_chain, streams(plan.reads, parts), num_threads=num_threads, timeout_s=storage.io_timeout_s,
            what=lambda c: f"{storage.where(c[0].path)}: read of [{c[0].range.start}, {c[-1].range.end})")  # fmt: skip


def streams(reads: Sequence[ReadOp], parts: int) -> list[list[ReadOp]]:
    """A local disk's reads cut into about ``parts`` runs of consecutive reads of one file, in
    file order and balanced by bytes, the largest first. One worker reads each run front to
    back, so a file is read as one or a few sequential streams, not as its 32 MiB reads
    scattered over every worker (what a disk's readahead serves fastest). Every read is in
    exactly one run."""
    by_file: dict[str, list[ReadOp]] = {}
    for op in reads:
        by_file.setdefault(op.path, []).append(op)
    share = max(1, -(-sum(op.range.length for op in reads) // max(1, parts)))
    out: list[list[ReadOp]] = []
    for ops in by_file.values():
        ops.sort(key=lambda op: op.range.start)
        nbytes = sum(op.range.length for op in ops)
        k = max(1, min(len(ops), round(nbytes / share)))  # this file's streams
        runs: list[list[ReadOp]] = [[]]
        done = 0
        for op in ops:  # run j + 1 starts once the bytes before the read reach (j + 1) / k of the file
            if runs[-1] and done * k >= len(runs) * nbytes:
                runs.append([])
            runs[-1].append(op)
            done += op.range.length
        out.extend(runs)
    out.sort(key=lambda c: -sum(op.range.length for op in c))
    return out


@dataclass(frozen=True, slots=True)
class Piece:
    """Bytes ``[start, end)`` of a read (offsets in the read's bytes) and the checks within."""

    start: int
    end: int
    checks: tuple[Check, ...]


def pieces(op: ReadOp, piece_bytes: int) -> list[Piece]:
    """``op`` cut, at block boundaries, into pieces of at most ``piece_bytes`` each (a block
    larger than that is a piece alone); one piece where it has no checks or ``piece_bytes`` is
    0. Every check lies in exactly one piece; the pieces tile the read."""
    length = op.range.length
    if piece_bytes <= 0 or not op.checks or length <= piece_bytes:
        return [Piece(0, length, op.checks)]
    out: list[Piece] = []
    start, first = 0, 0
    for i, chk in enumerate(op.checks):  # sorted by start, disjoint
        if i > first and chk.end - start > piece_bytes:
            out.append(Piece(start, chk.start, op.checks[first:i]))
            start, first = chk.start, i
    out.append(Piece(start, length, op.checks[first:]))
    return out


def _cut(segments: list[memoryview], cut: list[Piece]) -> list[list[memoryview]]:
    """The views of each piece's bytes in ``segments`` laid end to end (the pieces tile them)."""
    out: list[list[memoryview]] = []
    i, pos = 0, 0  # segments[i] starts at pos
    for p in cut:
        views: list[memoryview] = []
        while i < len(segments) and pos < p.end:
            s = segments[i]
            lo, hi = max(p.start, pos), min(p.end, pos + len(s))
            if lo < hi:
                views.append(s[lo - pos : hi - pos])
            if pos + len(s) > p.end:
                break  # the rest of this segment belongs to the next piece
            pos += len(s)
            i += 1
        out.append(views)
    return out


def _tiles(op: ReadOp) -> list[tuple[int, int]] | None:
    """Whether the copies of ``op`` are disjoint in the read (so it can be read in place)."""
    if len(op.copies) > _MAX_IOVECS:
        return None
    pos = 0
    out: list[tuple[int, int]] = []
    for c in op.copies:
        if c.src < pos:
            return None
        if c.src > pos:
            out.append((-1, c.src - pos))
        out.append((c.dest, c.length))
        pos = c.src + c.length
    if pos < op.range.length:
        out.append((-1, op.range.length - pos))
    return out


def _verify(storage: Reader, op: ReadOp, segments: list[memoryview], base: int, checks: tuple[Check, ...]) -> None:
    """Check ``checks`` against ``segments``, the bytes of ``op``'s read from offset ``base`` on."""
    if not checks:
        return
    bounds = []
    pos = base
    for s in segments:
        bounds.append((pos, s))
        pos += len(s)
    for chk in checks:
        crc = 0
        for seg_start, seg in bounds:
            lo, hi = max(chk.start, seg_start), min(chk.end, seg_start + len(seg))
            if lo < hi:
                crc = crc32c.crc32c(seg[lo - seg_start : hi - seg_start], value=crc)
        if crc != chk.crc32c:
            r = ranges.ByteRange(op.range.start + chk.start, op.range.start + chk.end)
            raise ChecksumMismatchError(
                f"{storage.where(op.path)}: key {chk.key!r}: crc32c of bytes [{r.start}, {r.end}) is "
                f"{crc:#010x}, the manifest says {chk.crc32c:#010x}; the file is corrupt"
            )
