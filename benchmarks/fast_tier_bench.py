"""The fast tier (issue 17): a save to /dev/shm against a plain memcpy + write of the same bytes.

    .venv/bin/python -m benchmarks.fast_tier_bench [--mib 1024] [--runs 5] [--dir /dev/shm] [--out bench-out]

The state: fp32 matrices of 64 MiB (``--mib`` in all). Per run, in turn:

- ``memcpy+write``: each tensor copied into a host buffer (``torch.Tensor.copy_``, the staging a
  checkpoint needs) and the buffer written to one file per tensor under ``--dir`` with
  ``open(...).write`` (one thread, no fsync: tmpfs has nothing to flush);
- ``ckpt.save``: ``ckpt.save(dir, state, step)`` with the default options (CRC-32C of every
  block, create-only files, manifest, fsync calls, which tmpfs answers at once), timed to its
  commit;
- ``manager``: a ``CheckpointManager`` with ``fast_tier=dir`` (drained to a root on the local
  disk): the time ``save()`` blocks (staging) and the time to the fast commit (``wait()``),
  the drain excluded (it runs after, and is waited for untimed).

Medians of ``--runs``; writes ``<out>/fast_tier.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch

import ckpt

MiB = 1 << 20


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(1)
    state = {f"t{i}": torch.randn(4096, 4096, generator=g) for i in range(max(1, args.mib // 64))}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    staging = {k: torch.empty_like(v) for k, v in state.items()}
    times: dict[str, list[float]] = {"memcpy+write": [], "ckpt.save": [], "manager stall": [], "manager commit": []}
    base = tempfile.mkdtemp(prefix="ckpt-fast-bench-", dir=args.dir)
    durable = tempfile.mkdtemp(prefix="ckpt-fast-bench-durable-")
    try:
        for run in range(args.runs):
            d = os.path.join(base, f"raw-{run}")
            os.makedirs(d)
            t0 = time.perf_counter()
            for k, v in state.items():
                staging[k].copy_(v)
                with open(os.path.join(d, k), "wb") as f:
                    f.write(memoryview(staging[k].numpy()).cast("B"))
            times["memcpy+write"].append(time.perf_counter() - t0)
            shutil.rmtree(d)

            d = os.path.join(base, f"ckpt-{run}")
            t0 = time.perf_counter()
            ckpt.save(d, state, step=run)
            times["ckpt.save"].append(time.perf_counter() - t0)
            shutil.rmtree(d)

            fast = os.path.join(base, f"fast-{run}")
            opts = ckpt.ManagerOptions(fast_tier=fast, retention=ckpt.RetentionPolicy(keep_last=1))
            with ckpt.CheckpointManager(os.path.join(durable, f"d-{run}"), opts) as mgr:
                t0 = time.perf_counter()
                mgr.save(run, state)
                times["manager stall"].append(time.perf_counter() - t0)
                mgr.wait()
                times["manager commit"].append(time.perf_counter() - t0)
                mgr.wait_durable()  # untimed
            shutil.rmtree(fast)
            shutil.rmtree(os.path.join(durable, f"d-{run}"))
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(durable, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result: dict[str, Any] = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "bytes": nbytes, "times": times}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fast_tier.json"), "w") as f:
        json.dump(result, f, indent=1)
    ref = med["memcpy+write"]
    print(f"\n{nbytes / MiB:.0f} MiB into {args.dir}, medians of {args.runs}:\n")
    print("| case | time | / memcpy+write |")
    print("|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} s | {v / ref:.2f}x |")


if __name__ == "__main__":
    main()
