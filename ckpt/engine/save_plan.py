"""Save planning: which shard files a writer writes and where each tensor's bytes go.

Pure (no I/O): from the writer's shards (key, dtype, global shape, region) to file plans with
header bytes and absolute byte ranges. The executor then streams tensor memory into them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ckpt.errors import PlanError, StateError
from ckpt.format import dtypes, layout, manifest
from ckpt.format import safetensors as safetensors_format
from ckpt.geometry.byte_ranges import ByteRange

# A file's header must stay under safetensors_format.MAX_HEADER_BYTES (16 MiB) for readers to
# accept it; plan for half of that, with a generous per-entry estimate (name, JSON, metadata).
_MAX_HEADER_PLAN_BYTES = safetensors_format.MAX_HEADER_BYTES // 2
_HEADER_ENTRY_BYTES = 160


@dataclass(frozen=True, slots=True)
class WriteItem:
    """One region of one tensor that this writer stores."""

    key: str
    dtype: str  # safetensors code
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.sizes) * dtypes.BY_CODE[self.dtype].itemsize

    @property
    def whole(self) -> bool:
        return self.sizes == self.global_shape


@dataclass(frozen=True, slots=True)
class FilePlan:
    path: str  # relative to the root
    header: bytes  # the exact header bytes (length prefix included)
    size: int
    items: tuple[tuple[WriteItem, ByteRange], ...]  # in file order, absolute byte ranges


@dataclass(frozen=True, slots=True)
class SavePlan:
    files: tuple[FilePlan, ...]


def plan_save(
    items: Sequence[WriteItem],
    *,
    step: int,
    attempt: str,
    rank: int,
    max_file_bytes: int,
    parallel_files: int = 1,
    min_file_bytes: int = 0,
) -> SavePlan:
    """Group ``items`` into files and lay each out. Pure (no I/O).

    A writer's bytes are cut into about ``parallel_files`` files of balanced size, so that they
    can be written concurrently, but no file is planned smaller than ``min_file_bytes`` (a small
    state stays one file) nor larger than ``max_file_bytes`` (unless one tensor alone is).
    Tensors are never split: a file boundary falls between them, in the safetensors order."""
    keys = [i.key for i in items]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise PlanError(f"rank {rank}: keys {dup[:5]} are given more than once")
    if "__metadata__" in keys:
        raise StateError("key '__metadata__' is reserved by the safetensors format; rename it")
    order = safetensors_format.layout_order([(i.key, i.dtype) for i in items])
    total = sum(i.nbytes for i in items)
    streams = max(1, min(parallel_files, total // max(min_file_bytes, 1)))
    target = min(max_file_bytes, -(-total // streams))  # ceil: `streams` files of this size hold it all
    groups: list[list[WriteItem]] = [[]]
    size = header = 0
    for idx in order:
        it = items[idx]
        entry = _HEADER_ENTRY_BYTES + len(it.key.encode()) + 24 * len(it.sizes)
        if groups[-1] and (size + it.nbytes > target or header + entry > _MAX_HEADER_PLAN_BYTES):
            groups.append([])
            size = header = 0
        groups[-1].append(it)
        size += it.nbytes
        header += entry
    files = []
    for k, group in enumerate(g for g in groups if g or len(groups) == 1):
        if not group:
            break  # a writer with nothing to write writes no file
        path = layout.shard_path(step, attempt, rank, k)
        manifest.check_path(path, where=f"rank {rank}")
        files.append(_layout(path, group))
    return SavePlan(tuple(files))


def _layout(path: str, group: list[WriteItem]) -> FilePlan:
    meta = {"format": "pt", "ckpt.format_version": str(manifest.SHARD_FORMAT_VERSION)}
    partial = {i.key: {"shape": list(i.global_shape), "offsets": list(i.offsets)} for i in group if not i.whole}
    if partial:
        meta["ckpt.shards"] = json.dumps(partial, separators=(",", ":"), sort_keys=True)
    h = safetensors_format.encode([(i.key, i.dtype, i.sizes) for i in group], meta)
    by_key = {i.key: i for i in group}
    placed = tuple(
        (by_key[e.name], ByteRange(h.data_start + e.begin, h.data_start + e.end)) for e in h.entries
    )
    return FilePlan(path, safetensors_format.header_bytes(h), h.file_size, placed)
