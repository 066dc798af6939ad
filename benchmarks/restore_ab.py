"""A warm, in-process timing of ``ckpt.restore(target=)``: for A/B runs of two checkouts.

    python -m benchmarks.restore_ab ROOT RUNS LABEL

Saves 256 MiB in 256 fp32 tensors under ROOT once (if ROOT does not exist), then restores it in
place RUNS times and prints the median and minimum. Run it alternately from two checkouts (each
with its own ROOT) to compare them on the same machine in the same minutes.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

import ckpt


def main() -> None:
    root, runs, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
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


if __name__ == "__main__":
    main()
