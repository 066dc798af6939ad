"""Distributed save/restore benchmark: ckpt vs PyTorch DCP on the same DTensors, same run.

    python -m benchmarks.dist_bench [--gib 1.0] [--writers 1 2 4] [--runs 5] [--out bench-out]

For each writer count W, W real processes (gloo) each hold their row-shard of the same ~1 GiB
state (64 fp32/bf16 tensors, DTensor Shard(0) on a 1-D mesh) and save it to a fresh local
directory: ckpt with ``ckpt.parallel.torchrun.save``, DCP with ``FileSystemWriter`` (fsync on, as
ckpt). Restore reads it back into preallocated DTensors of the same layout, after evicting the
files from the page cache (posix_fadvise DONTNEED), with ``ckpt.restore(target=...)`` and
``dcp.load`` + ``FileSystemReader``. Each (method, W) is timed ``--runs`` times; the table gives
medians and min-max, and ratios against DCP from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _state_shapes(gib: float) -> list[tuple[str, tuple[int, int], torch.dtype]]:
    n = 64
    per = int(gib * (1 << 30)) // n
    out = []
    for i in range(n):
        dtype = torch.bfloat16 if i % 4 == 3 else torch.float32
        rows = per // (1024 * torch.empty(0, dtype=dtype).element_size())
        out.append((f"layers.{i}.weight", (rows, 1024), dtype))
    return out


def _evict(path: str) -> None:
    for d, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _worker(rank: int, world: int, port: int, method: str, gib: float, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import ckpt
    import ckpt.parallel.torchrun

    mesh = init_device_mesh("cpu", (world,))
    shapes = _state_shapes(gib)

    def make(fill: bool) -> dict[str, Any]:
        state = {}
        for i, (key, shape, dtype) in enumerate(shapes):
            rows = shape[0] // world + (1 if rank < shape[0] % world else 0)
            local = torch.empty(rows, shape[1], dtype=dtype)
            if fill:
                local.fill_(i + rank)
            state[key] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                                            stride=(shape[1], 1))  # fmt: skip
        return state

    state = make(fill=True)
    dist.barrier()
    t0 = time.perf_counter()
    if method == "ckpt":
        ckpt.parallel.torchrun.save(root, state, step=1)
    else:
        import torch.distributed.checkpoint as dcp

        dcp.save(state, storage_writer=dcp.FileSystemWriter(root, sync_files=True))
    dist.barrier()
    save_s = time.perf_counter() - t0
    if rank == 0:
        _evict(root)
    target = make(fill=False)
    dist.barrier()
    t0 = time.perf_counter()
    if method == "ckpt":
        ckpt.restore(root, target=target)
    else:
        import torch.distributed.checkpoint as dcp

        dcp.load(target, storage_reader=dcp.FileSystemReader(root))
    dist.barrier()
    restore_s = time.perf_counter() - t0
    first = next(iter(target.values())).to_local()
    assert bool((first == rank).all()), "restore returned wrong values"
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"save_s": save_s, "restore_s": restore_s}, f)
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_case(method: str, world: int, gib: float) -> dict[str, float]:
    tmp = tempfile.mkdtemp(prefix=f"bench-{method}-")
    try:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_worker, args=(world, _port(), method, gib, os.path.join(tmp, "root"), out),
                           nprocs=world, join=True, start_method="spawn")  # fmt: skip
        with open(out) as f:
            return dict(json.load(f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, dict[str, list[float]]] = {}
    for world in args.writers:
        for run in range(args.runs):
            for method in ("ckpt", "dcp"):  # interleaved, so drift hits both alike
                r = run_case(method, world, args.gib)
                for phase in ("save_s", "restore_s"):
                    results.setdefault(f"{method}/{world}/{phase}", {"values": []})["values"].append(r[phase])
                print(f"W={world} run {run} {method}: save {r['save_s']:.2f} s restore {r['restore_s']:.2f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
    lines = [
        f"Distributed save/restore of {args.gib:g} GiB (64 tensors, fp32/bf16, DTensor Shard(0)), local disk, "
        f"medians of {args.runs} runs [min-max]; ratio = DCP time / ckpt time (>1: ckpt faster).",
        "",
        "| writers | ckpt save | DCP save | save ratio | ckpt restore (cold) | DCP restore (cold) | restore ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for world in args.writers:
        cells = []
        for phase in ("save_s", "restore_s"):
            c = results[f"ckpt/{world}/{phase}"]["values"]
            d = results[f"dcp/{world}/{phase}"]["values"]
            mc, md = statistics.median(c), statistics.median(d)
            summary[f"{world}/{phase}"] = {"ckpt": mc, "dcp": md, "ratio": md / mc}
            cells += [f"{mc:.2f} s [{min(c):.2f}-{max(c):.2f}]", f"{md:.2f} s [{min(d):.2f}-{max(d):.2f}]", f"{md / mc:.2f}x"]
        lines.append(f"| {world} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "dist_bench.json"), "w") as f:
        json.dump({"args": vars(args), "raw": results, "summary": summary}, f, indent=1)
    with open(os.path.join(args.out, "dist_bench.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
