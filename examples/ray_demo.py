"""ckpt on Ray: a model sharded over 4 actors checkpoints, "crashes", and resumes on 3 actors.

    make demo                                   # local directory + local Ray instance
    python examples/ray_demo.py --root s3://bucket/run --endpoint-url http://127.0.0.1:9000
                                                # any fsspec root; S3 credentials come from the
                                                # workers' environment (AWS_* variables, roles)
    python examples/ray_demo.py --address auto --root s3://bucket/run
                                                # join a running cluster (also: RAY_ADDRESS set,
                                                # as in a Ray job); its nodes must reach the root

A two-layer MLP is tensor-parallel over Ray actors: each actor owns a slice of the hidden units
(columns of W1, entries of b1, rows of W2) and the Adam moments of its slice; the output bias b2
is replicated on every actor (saved once). The driver sums the actors' partial outputs.

1. An uninterrupted reference run on 4 actors.
2. A run on 4 actors that checkpoints every 5 steps (every actor writes its own shards, the
   driver commits) and is killed at step 13.
3. The latest checkpoint (step 10) is restored onto 3 actors, a different layout: each reads
   exactly its new slice with ranged reads, and training continues to the end.
The losses after the restore match the reference (float64; the sum over 3 instead of 4 partial
outputs may differ in the last bits, so the maximum relative difference is printed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any

import ray
import torch

import ckpt
import ckpt.parallel.ray
from ckpt.engine.owners import chunk

D_IN, HIDDEN, D_OUT, BATCH = 16, 96, 4, 64
STEPS, CRASH_AT, SAVE_EVERY, LR = 20, 13, 5, 0.01


def init_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "W1": torch.randn(D_IN, HIDDEN, generator=g, dtype=torch.float64) / D_IN**0.5,
        "b1": torch.zeros(HIDDEN, dtype=torch.float64),
        "W2": torch.randn(HIDDEN, D_OUT, generator=g, dtype=torch.float64) / HIDDEN**0.5,
        "b2": torch.zeros(D_OUT, dtype=torch.float64),
    }


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data loader: batch ``step`` is a pure function of the step (its position)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, D_IN, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, :D_OUT] * 2) + 0.1 * x[:, D_OUT : 2 * D_OUT]
    return x, y


@ray.remote(num_cpus=0.5)
class ShardActor:
    """Owns hidden units [lo, hi) of the MLP and their Adam state."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.lo, n = chunk(HIDDEN, world, rank)
        self.hi = self.lo + n
        full = init_params()
        self.p = {
            "W1": full["W1"][:, self.lo : self.hi].clone(),
            "b1": full["b1"][self.lo : self.hi].clone(),
            "W2": full["W2"][self.lo : self.hi].clone(),
            "b2": full["b2"].clone(),
        }
        self.m = {k: torch.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: torch.zeros_like(v) for k, v in self.p.items()}
        self.t = 0

    # --- training ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.x = x
        self.h = torch.tanh(x @ self.p["W1"] + self.p["b1"])
        return self.h @ self.p["W2"]

    def backward_and_step(self, g: torch.Tensor) -> None:
        dh = g @ self.p["W2"].T
        dz = dh * (1 - self.h**2)
        grads = {"W1": self.x.T @ dz, "b1": dz.sum(0), "W2": self.h.T @ g, "b2": g.sum(0)}
        self.t += 1
        for k, gr in grads.items():  # Adam, elementwise: any slicing of it is exact
            self.m[k].mul_(0.9).add_(gr, alpha=0.1)
            self.v[k].mul_(0.999).addcmul_(gr, gr, value=0.001)
            mhat = self.m[k] / (1 - 0.9**self.t)
            vhat = self.v[k] / (1 - 0.999**self.t)
            self.p[k].sub_(LR * mhat / (vhat.sqrt() + 1e-8))

    def b2(self) -> torch.Tensor:
        return self.p["b2"]

    # --- checkpointing ----------------------------------------------------------------------
    def _regions(self, tensors: dict[str, torch.Tensor]) -> dict[str, ckpt.Shard]:
        everyone = tuple(range(self.world))
        return {
            "W1": ckpt.Shard(tensors["W1"], (D_IN, HIDDEN), (0, self.lo)),
            "b1": ckpt.Shard(tensors["b1"], (HIDDEN,), (self.lo,)),
            "W2": ckpt.Shard(tensors["W2"], (HIDDEN, D_OUT), (self.lo, 0)),
            "b2": ckpt.Shard(tensors["b2"], (D_OUT,), (0,), replica_ranks=everyone),
        }

    def checkpoint_state(self) -> dict[str, Any]:
        return {"params": self._regions(self.p), "adam": {"m": self._regions(self.m), "v": self._regions(self.v), "t": self.t}}

    def checkpoint_target(self) -> dict[str, Any]:
        return self.checkpoint_state()  # same regions: ckpt fills our tensors in place

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        self.t = state["adam"]["t"]


def train(actors: list[Any], first: int, last: int, root: str | None, storage_options: dict[str, Any]) -> list[float]:
    losses = []
    for step in range(first, last + 1):
        x, y = batch(step)
        partial = ray.get([a.forward.remote(x) for a in actors])
        out = sum(partial[1:], partial[0]) + ray.get(actors[0].b2.remote())
        loss = ((out - y) ** 2).mean()
        g = 2 * (out - y) / out.numel()
        ray.get([a.backward_and_step.remote(g) for a in actors])
        losses.append(float(loss))
        if root and step % SAVE_EVERY == 0:
            t0 = time.perf_counter()
            m = ckpt.parallel.ray.save(root, actors, step=step, storage_options=storage_options)
            print(f"   step {step:2d}  loss {loss:.6f}  checkpoint: {len(m.files)} files from {m.world_size} actors, "
                  f"{m.total_bytes / 1024:.0f} KiB, {time.perf_counter() - t0:.2f} s")  # fmt: skip
    return losses


def ray_init_kwargs(address: str | None) -> dict[str, Any]:
    """``ray.init`` arguments: a private local instance sized for the demo (``make demo``) unless
    ``address`` or ``RAY_ADDRESS`` names a running cluster to join, which Ray refuses to resize
    ("When connecting to an existing cluster, num_cpus and num_gpus must not be provided")."""
    common: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        return {"num_cpus": 4, **common, "object_store_memory": 100 << 20}
    return {"address": address, **common}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="checkpoint root (directory or fsspec URL); default: a temp dir")
    parser.add_argument("--endpoint-url", help="S3 endpoint for s3:// roots (e.g. a local MinIO)")
    parser.add_argument(
        "--address",
        help="a running Ray cluster to join (e.g. auto, HOST:6379); "
        "default: RAY_ADDRESS if set, else start a local instance",
    )
    args = parser.parse_args()
    init_kwargs = ray_init_kwargs(args.address)
    if "address" in init_kwargs and not args.root:
        parser.error("joining a cluster needs --root on storage every node reaches (e.g. s3://...)")
    root = args.root or tempfile.mkdtemp(prefix="ckpt-ray-demo-")
    opts = {"endpoint_url": args.endpoint_url} if args.endpoint_url else {}
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(**init_kwargs)
    try:
        print(f"checkpoint root: {root}")
        print("1) reference: 4 actors, 20 steps, no interruption")
        reference = train([ShardActor.remote(r, 4) for r in range(4)], 1, STEPS, None, opts)

        print(f"2) 4 actors, checkpoint every {SAVE_EVERY} steps, killed at step {CRASH_AT}")
        actors = [ShardActor.remote(r, 4) for r in range(4)]
        train(actors, 1, CRASH_AT, root, opts)
        for a in actors:
            ray.kill(a)

        print(f"3) restore the latest checkpoint onto 3 actors (steps on storage: {ckpt.list_steps(root, storage_options=opts)})")
        actors = [ShardActor.remote(r, 3) for r in range(3)]
        ray.get([a.b2.remote() for a in actors])  # wait for the actors to start
        t0 = time.perf_counter()
        step = ckpt.parallel.ray.restore(root, actors, storage_options=opts)
        print(f"   restored step {step} onto 3 actors in {time.perf_counter() - t0:.2f} s")
        resumed = train(actors, step + 1, STEPS, None, opts)

        print("4) losses after the restore vs the uninterrupted run")
        worst = 0.0
        for s, (a, b) in enumerate(zip(resumed, reference[step:], strict=True), start=step + 1):
            rel = abs(a - b) / abs(b)
            worst = max(worst, rel)
            print(f"   step {s:2d}  resumed {a:.10f}  reference {b:.10f}  rel. diff {rel:.1e}")
        if worst > 1e-9:
            raise SystemExit(f"FAILED: the resumed loss curve diverged (max rel. diff {worst:.1e})")
        print(f"OK: the loss curve on 3 actors matches the uninterrupted 4-actor run (max rel. diff {worst:.1e})")
    finally:
        ray.shutdown()
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
