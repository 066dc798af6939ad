"""Incremental saves: which of a writer's regions are byte for byte a region of the base step.

A region is **reused** (recorded as a reference to the base's bytes, not written) only when its
content hash, BLAKE3 cut to 128 bits and computed from the bytes now, equals the hash the base
recorded for the same key, dtype, global shape and box, checked with the same block size. A
tensor's identity, version counter or name is never taken as proof.

Hashing every byte of a state that changed entirely would cost a pass for nothing, so the first
checksum block decides first: its CRC32C (cheap) against the base's first block CRC. Different
CRCs prove the region changed: it is written, and (it is trained, so its next value will differ
again) written without a hash. Only a region whose first block is unchanged is hashed whole
before the plan; a region with no base is hashed while it is written, in one pass with its CRCs
(the executor). FORMAT.md 4.9 says how hashes are recorded.

:func:`match` and :func:`decide` are pure; :func:`hash_all` only reads memory.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import blake3
import crc32c

from ckpt.engine.save_plan import WriteItem
from ckpt.format.manifest import HASH_HEX_DIGITS, TensorEntry

if TYPE_CHECKING:
    from collections.abc import Callable

_DIGEST_BYTES = HASH_HEX_DIGITS // 2
_OWN_THREADS_FROM = 256 << 20  # a region this big is hashed by BLAKE3's own threads too


@dataclass(frozen=True, slots=True)
class BaseShard:
    """The base's shard with the same box as an item: where its bytes are and what they hash to."""

    file: str
    start: int
    end: int
    crc32c: tuple[int, ...]
    hash: str | None


@dataclass(frozen=True, slots=True)
class Decision:
    """What an incremental save does with one item.

    ``reuse``: the base's bytes to reference (nothing is written); else the item is written and
    ``hash`` is its content hash when already known, or ``hash_on_write`` says to compute it as
    the bytes stream (False: a region that changed since the base is recorded without one)."""

    reuse: BaseShard | None
    hash: str | None = None
    hash_on_write: bool = False


def content_hash(view: memoryview | bytes) -> str:
    """The region's content hash: 32 lowercase hex digits of BLAKE3 (the GIL is released)."""
    threads = blake3.blake3.AUTO if len(view) >= _OWN_THREADS_FROM else 1
    return blake3.blake3(view, max_threads=threads).hexdigest(length=_DIGEST_BYTES)


def hasher() -> blake3.blake3:
    """An incremental hasher (``update`` per block, :func:`digest` at the end)."""
    return blake3.blake3()


def digest(h: blake3.blake3) -> str:
    return h.hexdigest(length=_DIGEST_BYTES)


def match(item: WriteItem, base: TensorEntry | None, *, same_blocks: bool) -> BaseShard | None:
    """The base shard holding exactly ``item``'s region, or None (no such key, another dtype,
    shape or box, or the base used another block size so its CRCs would not be ours). Pure."""
    if base is None or not same_blocks or base.dtype != item.dtype or base.shape != item.global_shape:
        return None
    s = base.shards
    hashes = s.hashes
    for i in range(len(s)):
        if tuple(s.offsets[i].tolist()) == item.offsets and tuple(s.sizes[i].tolist()) == item.sizes:
            start, end = s.byte_range[i].tolist()
            crcs = tuple(s.crc32c[s.crc_start[i] : s.crc_start[i + 1]].tolist())
            return BaseShard(s.paths[int(s.file[i])], start, end, crcs, None if hashes is None else hashes[i])
    return None


def decide(
    items: Sequence[WriteItem],
    bases: Sequence[BaseShard | None],
    first_crc: Callable[[int], int],
    full_hash: Callable[[Sequence[int]], Mapping[int, str]],
) -> list[Decision]:
    """Each item's decision (see the module docs). ``first_crc(i)``: the CRC32C of item ``i``'s
    first block; ``full_hash(indices)``: the content hash of each of those items (computed in one
    batch, in parallel). Pure but for what those two read."""
    out: list[Decision | None] = [None] * len(items)
    candidates: list[int] = []
    for i, (item, base) in enumerate(zip(items, bases, strict=True)):
        if base is None or item.nbytes == 0:
            out[i] = Decision(None, hash_on_write=True)  # new (or empty): hash it as it streams
        elif not base.crc32c or first_crc(i) != base.crc32c[0]:
            out[i] = Decision(None)  # changed since the base: written, no hash
        else:
            candidates.append(i)
    hashes = full_hash(candidates) if candidates else {}
    for i in candidates:
        base, h = bases[i], hashes[i]
        assert base is not None
        out[i] = Decision(base) if base.hash is not None and h == base.hash else Decision(None, hash=h)
    return [d for d in out if d is not None]


def hash_all(views: Mapping[int, memoryview], *, num_threads: int) -> dict[int, str]:
    """The content hash of each view, largest first, on ``num_threads`` threads (BLAKE3 releases
    the GIL, so they run on every core)."""
    order = sorted(views, key=lambda i: len(views[i]), reverse=True)
    if len(order) <= 1 or num_threads <= 1:
        return {i: content_hash(views[i]) for i in order}
    with concurrent.futures.ThreadPoolExecutor(min(num_threads, len(order)), thread_name_prefix="ckpt-hash") as pool:
        return dict(zip(order, pool.map(lambda i: content_hash(views[i]), order), strict=True))


def first_block_crc(view: memoryview, block_bytes: int) -> int:
    return crc32c.crc32c(view[:block_bytes])
