"""At 1k and 10k ranks, in simulation: S3 requests per prefix during a save and a restore, and the
commit path's time and manifest size (docs/scale.md).

    .venv/bin/python -m benchmarks.scale_sim [--ranks 1000 10000] [--state-gib 1024] [--rank-gbps 1.0] [--commit-tensors 100] [--out bench-out]

Nothing is sent anywhere: the request counts come from ckpt's own planners and upload rules run
on the layout such a job would save.

- **The job**: ``--state-gib`` of checkpoint state (default 1 TiB: a 70B-parameter model's bf16
  weights, fp32 master weights and AdamW moments), sharded evenly over R ranks as 256 tensors
  per rank (FSDP-like: every tensor row-sharded over all ranks), each rank writing at
  ``--rank-gbps`` GB/s (its NIC's share).
- **Save**: each rank's files come from ``save_plan.plan_save`` with the default
  ``SaveOptions`` (parallel_files=4, min_file_bytes=64 MiB, max_file_bytes=512 MiB); each file
  costs the requests of ckpt's S3 backend (``ckpt.storage._s3``: one conditional PutObject up
  to 128 MiB, else CreateMultipartUpload + one UploadPart per part + Complete), with the
  default 16 MiB parts (``SaveOptions.write_chunk_bytes``) and with 64 MiB parts. The
  coordinator's commit adds a HeadObject per file (the size check), the manifest PUT and LATEST.
  Every data key lies under one prefix, ``data/<step>-<attempt>/``. Reported: requests, and
  requests per second on that prefix while all ranks write at once (requests / the time one
  rank takes to write its bytes), against S3's documented 3,500 PUT/s per prefix partition.
- **Restore**: each rank restores its own shard of every tensor (``plan_restore`` on the
  manifest the save would commit: verified reads, remote defaults: 64 MiB reads, 1 MiB gap),
  one GetObject per read, against 5,500 GET/s per partition; and the data-parallel case where
  every rank of a replica group needs the same bytes, per rank and with the shared restore
  (``ckpt.parallel.torchrun.restore``: each byte fetched once per job).
- **Commit path**: ``ckpt.testing.scale`` (R ranks x ``--commit-tensors`` tensors, one shard of each
  per rank): ``build_manifest`` from R reports (checks and the validation of the result) timed,
  and the manifest's size as committed (format v2, lines).

Writes ``<out>/scale_sim.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from typing import Any

from ckpt.engine.restore_plan import Request, plan_restore
from ckpt.engine.save_plan import WriteItem, plan_save
from ckpt.format.manifest import FileEntry, Manifest, ShardTable, TensorEntry
from ckpt.geometry import boxes
from ckpt.options import REMOTE_MAX_GAP_BYTES, REMOTE_READ_CHUNK_BYTES, SaveOptions
from ckpt.storage._s3 import S3_PART_BYTES, S3_SINGLE_PUT_MAX_BYTES

MiB, GiB = 1 << 20, 1 << 30
TENSORS_PER_RANK = 256
PUT_PER_PREFIX, GET_PER_PREFIX = 3500, 5500  # S3's documented rates per partitioned prefix


def put_requests(size: int, part_bytes: int = S3_PART_BYTES) -> int:
    """Requests ckpt's S3 backend makes to write one file of ``size`` bytes."""
    if size <= S3_SINGLE_PUT_MAX_BYTES:
        return 1
    return 2 + math.ceil(size / part_bytes)


def job(ranks: int, state_bytes: int) -> tuple[list[WriteItem], int]:
    """One rank's write items (every rank's are alike) and the rows per rank of each tensor."""
    per_rank = state_bytes // ranks
    cols = 4096
    rows = max(1, per_rank // TENSORS_PER_RANK // (cols * 4))
    items = [WriteItem(f"t{t}", "F32", (rows * ranks, cols), (0, 0), (rows, cols)) for t in range(TENSORS_PER_RANK)]
    return items, rows


def simulate(ranks: int, state_bytes: int, rank_gbps: float, part_bytes: int = S3_PART_BYTES) -> dict[str, Any]:
    opts = SaveOptions(write_chunk_bytes=part_bytes)
    items, rows = job(ranks, state_bytes)
    plan = plan_save(items, step=1, attempt="0" * 16, rank=0, max_file_bytes=opts.max_file_bytes,
                     parallel_files=opts.parallel_files, min_file_bytes=opts.min_file_bytes)  # fmt: skip
    files = [fp.size for fp in plan.files]
    rank_bytes = sum(files)
    rank_puts = sum(put_requests(s, part_bytes) for s in files)
    write_s = rank_bytes / (rank_gbps * 1e9)
    save_requests = ranks * rank_puts + ranks * len(files) + 2  # + a HEAD per file at the commit, manifest, LATEST
    # the manifest the save commits: every tensor row-sharded over every rank, one file per rank-file
    paths = tuple(f"data/000000000001-{'0' * 16}/{r:05d}-0.safetensors" for r in range(ranks))
    # (one file per rank stands for the rank's files: the restore reads the same byte runs)
    rank_file = plan.files[0].size if len(plan.files) == 1 else rank_bytes
    shard = rows * 4096 * 4
    entries = {}
    import numpy as np

    r = np.arange(ranks, dtype=np.int64)
    blocks = math.ceil(shard / opts.block_bytes)
    for t, it in enumerate(items):
        start = 4096 + t * shard
        table = ShardTable(
            paths, r, np.stack([r * rows, np.zeros(ranks, dtype=np.int64)], axis=1),
            np.tile(np.array([rows, 4096], dtype=np.int64), (ranks, 1)),
            np.tile(np.array([start, start + shard], dtype=np.int64), (ranks, 1)),
            np.zeros(ranks * blocks, dtype=np.int64), np.arange(ranks + 1, dtype=np.int64) * blocks,
        )  # fmt: skip
        entries[it.key] = TensorEntry("F32", it.global_shape, table)
    m = Manifest(step=1, attempt="0" * 16, created="", world_size=ranks, block_bytes=opts.block_bytes,
                 files={p: FileEntry(rank_file + 4096 + TENSORS_PER_RANK * shard, 0) for p in paths},
                 tensors=entries, objects={}, tree=None)  # fmt: skip
    mine = [Request(k, boxes.Box((0, 0), (rows, 4096))) for k in entries]  # rank 0's shards
    rp = plan_restore(m, mine, verify=True, max_gap_bytes=REMOTE_MAX_GAP_BYTES, read_chunk_bytes=REMOTE_READ_CHUNK_BYTES)
    rank_gets = len(rp.reads)
    read_bytes = sum(op.range.length for op in rp.reads)
    read_s = read_bytes / (rank_gbps * 1e9)
    return {
        "ranks": ranks,
        "part_bytes": part_bytes,
        "rank_bytes": rank_bytes,
        "rank_files": len(files),
        "rank_file_bytes": files,
        "rank_put_requests": rank_puts,
        "rank_write_s": write_s,
        "save_requests": save_requests,
        "save_put_per_s": ranks * rank_puts / write_s,
        "save_partitions_needed": ranks * rank_puts / write_s / PUT_PER_PREFIX,
        "rank_get_requests": rank_gets,
        "rank_read_bytes": read_bytes,
        "restore_get_per_s": ranks * rank_gets / read_s,
        "restore_partitions_needed": ranks * rank_gets / read_s / GET_PER_PREFIX,
    }


def commit_path(ranks: int, tensors: int) -> dict[str, Any]:
    from ckpt.lifecycle import commit as commit_mod
    from ckpt.lifecycle.attempt import Attempt
    from ckpt.testing.scale import ATTEMPT, STEP, reports

    reps = reports(ranks, tensors)
    attempt = Attempt("s3://bucket/run", STEP, ATTEMPT, ranks, SaveOptions())
    gc.collect()
    t0 = time.perf_counter()
    m = commit_mod.build_manifest(attempt, reps, created="2026-01-01T00:00:00+00:00")  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    data = m.to_json()
    head = data.split(b"\n", 1)[0]
    return {"ranks": ranks, "tensors": tensors, "shard_entries": ranks * tensors, "build_manifest_s": seconds,
            "manifest_bytes": len(data), "head_bytes": len(head), "format_version": m.format_version}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--state-gib", type=float, default=1024.0)
    ap.add_argument("--rank-gbps", type=float, default=1.0)
    ap.add_argument("--commit-tensors", type=int, default=100)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args(argv)
    sims = [simulate(r, int(args.state_gib * GiB), args.rank_gbps, part) for r in args.ranks for part in (16 * MiB, 64 * MiB)]
    commits = []
    for r in args.ranks:
        commits.append(commit_path(r, args.commit_tensors))
        print(f"commit path at {r} ranks: {commits[-1]['build_manifest_s']:.2f} s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scale_sim.json"), "w") as f:
        json.dump({"args": vars(args), "date": time.strftime("%Y-%m-%d"), "sims": sims, "commits": commits}, f, indent=1)
    print(f"\n{args.state_gib:g} GiB of state, {TENSORS_PER_RANK} tensors per rank, {args.rank_gbps:g} GB/s per rank:\n")
    print("| ranks | part size | bytes per rank | files per rank | PUT requests per rank | save: requests in all | save: PUT/s on the prefix | partitions needed (3,500 PUT/s each) | restore: GETs per rank | restore: GET/s on the prefix | partitions needed (5,500 GET/s each) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in sims:
        print(f"| {s['ranks']:,} | {s['part_bytes'] // MiB} MiB | {s['rank_bytes'] / MiB:,.0f} MiB | {s['rank_files']} | {s['rank_put_requests']} | "
              f"{s['save_requests']:,} | {s['save_put_per_s']:,.0f} | {s['save_partitions_needed']:.1f} | "
              f"{s['rank_get_requests']} | {s['restore_get_per_s']:,.0f} | {s['restore_partitions_needed']:.1f} |")  # fmt: skip
    print("\n| ranks | tensors | shard entries | build_manifest (checks + validation) | manifest | its head |")
    print("|---:|---:|---:|---:|---:|---:|")
    for c in commits:
        print(f"| {c['ranks']:,} | {c['tensors']} | {c['shard_entries']:,} | {c['build_manifest_s']:.2f} s | "
              f"{c['manifest_bytes'] / MiB:.1f} MiB (v{c['format_version']}) | {c['head_bytes'] / MiB:.2f} MiB |")  # fmt: skip


if __name__ == "__main__":
    main()
