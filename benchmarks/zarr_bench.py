"""Zarr archive benchmark: compression ratio and export/import throughput on a local disk.

A ~256 MiB training state of realistic content: bf16 weights from a normal init, fp32 Adam
moments (first moment small and signed, second moment small and positive) and a zeros-heavy
fp32 tensor (90% zeros). Prints medians of 3 runs::

    .venv/bin/python -m benchmarks.zarr_bench [--mib 256] [--level 3] [--runs 3]

ratio = ckpt bytes (the checkpoint's data files) / zarr bytes (every file of the group).
MB/s = tensor bytes (10**6) per second of wall time (export: restore + compress + write;
import: read + decompress + save + commit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import ckpt
from ckpt.interop.zarr import export_zarr, import_zarr


def make_state(mib: int) -> dict[str, object]:
    # bytes per parameter: 2 (bf16 weight) + 4 + 4 (Adam moments); plus a zeros-heavy 1/16
    g = torch.Generator().manual_seed(0)
    n = (mib << 20) * 15 // 16 // 10
    zeros = torch.zeros((mib << 20) // 16 // 4)
    mask = torch.rand(zeros.shape, generator=g) < 0.1
    zeros[mask] = torch.randn(int(mask.sum()), generator=g)
    return {
        "model": {"weight": (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)},
        "optim": {
            "exp_avg": torch.randn(n, generator=g) * 1e-3,
            "exp_avg_sq": torch.randn(n, generator=g).square() * 1e-6,
        },
        "sparse_grad": zeros,
        "step": 1000,
    }


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--level", type=int, default=3)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/src"
        m = ckpt.save(src, make_state(args.mib), step=1, options=ckpt.SaveOptions(fsync=False))
        tensor_bytes = sum(t.nbytes for t in m.tensors.values())
        exp_s, imp_s, sizes = [], [], []
        for i in range(args.runs):
            t0 = time.perf_counter()
            export_zarr(src, f"{tmp}/z{i}", level=args.level)
            exp_s.append(time.perf_counter() - t0)
            sizes.append(_du(f"{tmp}/z{i}"))
            t0 = time.perf_counter()
            import_zarr(f"{tmp}/z{i}", f"{tmp}/back{i}", options=ckpt.SaveOptions(fsync=False))
            imp_s.append(time.perf_counter() - t0)
        e, i_, z = statistics.median(exp_s), statistics.median(imp_s), statistics.median(sizes)
        print(f"state: {tensor_bytes / 2**20:.1f} MiB of tensors, ckpt files {m.total_bytes / 2**20:.1f} MiB, "
              f"zstd level {args.level}, median of {args.runs}")  # fmt: skip
        print(f"zarr bytes: {z / 2**20:.1f} MiB  ratio (ckpt/zarr): {m.total_bytes / z:.3f}")
        print(f"export: {e:.2f} s  {tensor_bytes / 1e6 / e:.0f} MB/s")
        print(f"import: {i_:.2f} s  {tensor_bytes / 1e6 / i_:.0f} MB/s")


if __name__ == "__main__":
    main()
