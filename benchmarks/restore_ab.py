"""In-process timings of ``ckpt.restore(target=)``: for A/B runs of two checkouts.

    python -m benchmarks.restore_ab ROOT RUNS LABEL                  # warm, 256 MiB
    python benchmarks/restore_ab.py ROOT RUNS LABEL --cold --mib 512  # cold, vs raw readinto

Warm (the default): saves 256 MiB in 256 fp32 tensors under ROOT once (if ROOT does not exist),
then restores it in place RUNS times and prints the median and minimum. Run it alternately from
two checkouts (each with its own ROOT) to compare them on the same machine in the same minutes.

``--cold``: the state of ``benchmarks.local_bench`` (193 tensors, ``--mib`` MiB) saved under ROOT
by ckpt, by the raw sequential writer (one file) and by the raw parallel one (N files), once.
Each of RUNS rounds then times, in rotating order, a cold in-place ``ckpt.restore(target=)`` and
the raw cold ``readinto`` of the same bytes into the same preallocated tensors (one stream, and N
threads on N files), each after ``posix_fadvise(DONTNEED)`` of the files it reads (as
local_bench does). Prints the medians [min-max] and the ratio ckpt throughput / the faster raw
read's (the issue's bar: >= 0.9x). Run as a file (``python benchmarks/restore_ab.py``) with
``PYTHONPATH`` naming the checkout whose ``ckpt`` to time.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

import ckpt

if __package__ in (None, ""):  # run as a file: the repository root holds the benchmarks package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))


def warm(root: str, runs: int, label: str) -> None:
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(1 << 18, generator=g) for i in range(256)}
    if not os.path.exists(root):
        ckpt.save(root, state, step=1)
    target = {k: torch.empty_like(v) for k, v in state.items()}
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        ckpt.restore(root, 1, target=target)
        times.append(time.perf_counter() - t0)
    print(f"{label} median {statistics.median(times) * 1000:.1f} ms  min {min(times) * 1000:.1f}")


def cold(root: str, runs: int, label: str, mib: int) -> None:
    from benchmarks import local_bench as lb

    specs = lb.state_specs(mib * lb.MiB)
    paths = {m: os.path.join(root, m) for m in ("ckpt", "raw", "raw-par")}
    if not os.path.exists(root):
        os.makedirs(root)
        state = lb.make_state(specs, fill=True)
        for method, path in paths.items():
            lb._save(method, state, path)
        del state
    target = lb.make_state(specs, fill=False)
    times: dict[str, list[float]] = {m: [] for m in paths}
    order = list(paths)
    for run in range(runs):
        for method in order[run % 3 :] + order[: run % 3]:
            lb.evict(paths[method])
            gc.collect()
            t0 = time.perf_counter()
            got = lb._restore(method, paths[method], target)
            times[method].append(time.perf_counter() - t0)
            lb._check(got, specs)
            del got
    med = {m: statistics.median(t) for m, t in times.items()}
    line = ", ".join(f"{m} {med[m]:.3f} s [{min(t):.3f}-{max(t):.3f}]" for m, t in times.items())
    best = min(med["raw"], med["raw-par"])
    print(f"{label} {mib} MiB cold, {runs} runs: {line}; ckpt vs faster raw {best / med['ckpt']:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("runs", type=int)
    ap.add_argument("label")
    ap.add_argument("--cold", action="store_true", help="cold restores of local_bench's state vs raw readinto")
    ap.add_argument("--mib", type=int, default=512, help="--cold: the state's size in MiB (default 512)")
    args = ap.parse_args()
    if args.cold:
        cold(args.root, args.runs, args.label, args.mib)
    else:
        warm(args.root, args.runs, args.label)


if __name__ == "__main__":
    main()
