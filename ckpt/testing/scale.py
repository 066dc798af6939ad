"""A synthetic checkpoint of R ranks x T tensors (R*T shard entries), built without any I/O: the
manifest a save of it would commit, and the report each of its writers would send. Used by the
manifest scale tests and ``benchmarks.scale_bench``.

Every tensor (fp32, ``ROWS*R x COLS``) is row-sharded over all R ranks; rank r's shards fill one
file per rank (:func:`path`), after a ``HEADER``-byte stand-in for the safetensors header. Each
shard is 1 KiB: one checksum block (crc32c 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ckpt.format.manifest import FileEntry, Manifest, ShardTable, TensorEntry

ROWS, COLS, ITEM = 4, 64, 4  # each shard: 4 x 64 fp32 = 1 KiB, one checksum block
HEADER = 128 * 1024  # stand-in for the safetensors header at the start of each rank's file
STEP, ATTEMPT = 1, "0123456789abcdef"


def path(rank: int) -> str:
    """The data file of ``rank``, relative to the root."""
    return f"data/{STEP:012d}-{ATTEMPT}/{rank:05d}-0.safetensors"


def build(ranks: int, tensors: int) -> Manifest:
    """The in-memory manifest: ``FileEntry`` values and one columnar ``ShardTable`` per tensor."""
    shard_bytes = ROWS * COLS * ITEM
    paths = tuple(path(r) for r in range(ranks))
    files = {p: FileEntry(HEADER + tensors * shard_bytes, 0) for p in paths}
    rank = np.arange(ranks, dtype=np.int64)
    offsets = np.stack([rank * ROWS, np.zeros(ranks, dtype=np.int64)], axis=1)
    sizes = np.tile(np.array([ROWS, COLS], dtype=np.int64), (ranks, 1))
    crcs, crc_start = np.zeros(ranks, dtype=np.int64), np.arange(ranks + 1, dtype=np.int64)
    entries = {}
    for t in range(tensors):
        start = HEADER + t * shard_bytes
        byte_range = np.tile(np.array([start, start + shard_bytes], dtype=np.int64), (ranks, 1))
        table = ShardTable(paths, rank, offsets, sizes, byte_range, crcs, crc_start)
        entries[f"model.layers.{t}.weight"] = TensorEntry("F32", (ranks * ROWS, COLS), table)
    tree = {"dict": [[k, {"tensor": k}] for k in entries]}
    return Manifest(
        step=STEP, attempt=ATTEMPT, created="2026-01-01T00:00:00+00:00", world_size=ranks,
        block_bytes=4 << 20, files=files, tensors=entries, objects={}, tree=tree,
    )  # fmt: skip


def reports(ranks: int, tensors: int) -> list[dict[str, Any]]:
    """What each of ``ranks`` writers would report for this layout (see ckpt.lifecycle.attempt.Report)."""
    shard_bytes = ROWS * COLS * ITEM
    keys = [f"model.layers.{t}.weight" for t in range(tensors)]
    out = []
    for r in range(ranks):
        shards = [
            {"key": k, "dtype": "F32", "shape": [ranks * ROWS, COLS], "offsets": [r * ROWS, 0], "sizes": [ROWS, COLS],
             "file": path(r), "byte_range": [HEADER + t * shard_bytes, HEADER + (t + 1) * shard_bytes], "crc32c": [0]}
            for t, k in enumerate(keys)
        ]  # fmt: skip
        out.append({
            "step": STEP, "attempt": ATTEMPT, "rank": r,
            "files": {path(r): {"size": HEADER + tensors * shard_bytes, "crc32c": 0}},
            "shards": shards, "keys": {k: {"dtype": "F32", "shape": [ranks * ROWS, COLS]} for k in keys},
            "objects": {}, "tree": {"dict": [[k, {"tensor": k}] for k in keys]},
        })  # fmt: skip
    return out
