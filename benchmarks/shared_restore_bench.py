"""The collective restore of torchrun ranks (issue 17): every byte fetched from the store once.

    .venv/bin/python -m benchmarks.shared_restore_bench [--mib 256] [--ranks 4] [--runs 5] [--latency-ms 0] [--out bench-out]

A replicated state (``--mib``, fp32 matrices of 16 MiB) is saved once to a moto S3 endpoint on
127.0.0.1, behind ckpt's counting proxy (``ckpt.testing.proxy``, ``--latency-ms`` per request).
Then, each run, in this order, each case in fresh processes (which make their S3 client, with
one listing, before the clock starts):

- ``alone``: one process restores it (``ckpt.restore``): the time one rank takes by itself;
- ``every-rank``: ``--ranks`` processes (gloo group) each call ``ckpt.restore``: what a
  data-parallel job does without sharing (every rank GETs every byte);
- ``shared``: the same ranks call ``ckpt.parallel.torchrun.restore``.

With ``--ray``, the same three cases for Ray actors on 2 simulated nodes
(``ray.cluster_utils.Cluster``, ``--ranks`` actors spread over them): ``alone`` (one actor,
``ckpt.parallel.ray.restore``), ``every-rank`` (``ckpt.parallel.ray.restore``: each actor reads
its copy) and ``shared`` (``ckpt.parallel.ray.restore_shared``: each byte once per node).

``--cases`` runs some of them. Without ``--ray``, a floor is measured first: 1 and ``--ranks``
processes at once each allocating, filling (from warm memory) and checksumming ``--mib`` MiB,
with no storage and no exchange: what every rank of a shared restore does at the least, on the
cores the ranks share here.

Reported per case: bytes the store served (the proxy's response bytes) over the state's bytes,
and wall time (from a barrier to the slowest rank's end) over ``alone``'s, medians of ``--runs``.
Every rank checks its values against the saved state (untimed). Writes
``<out>/shared_restore.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 1 << 20


def make_state(mib: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(3)
    return {f"layer{i}": torch.randn(2048, 2048, generator=g) for i in range(max(1, mib // 16))}


def _rank_main(rank: int, world: int, port: int, case: str, cfg: dict[str, Any], out: str) -> None:
    import torch
    import torch.distributed as dist

    import ckpt
    import ckpt.parallel.torchrun

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cfg.get("log"):
        import logging

        logging.basicConfig(level=logging.INFO, format=f"rank {rank}: %(message)s")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = ckpt.parallel.torchrun.new_group(600)
        ckpt.list_steps(cfg["root"], storage_options=cfg["opts"])  # the S3 client made before the clock starts
        dist.barrier(group)
        t0 = time.perf_counter()
        if case == "shared":
            back = ckpt.parallel.torchrun.restore(cfg["root"], storage_options=cfg["opts"], group=group)
        else:
            back = ckpt.restore(cfg["root"], storage_options=cfg["opts"])
        seconds = time.perf_counter() - t0
        want = make_state(cfg["mib"])
        ok = all(torch.equal(back[k], v) for k, v in want.items())
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"seconds": seconds, "ok": ok}, f)
        dist.barrier(group)
    except BaseException:
        with open(f"{out}.{rank}.err", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _materialize(mib: int, src: Any, start: Any, q: Any) -> None:
    """One rank's share of the floor: a fresh ``mib`` MiB tensor filled from warm memory and its
    CRC-32C taken in 4 MiB pieces (what every rank of a shared restore does at the least)."""
    import crc32c
    import torch

    start.wait()
    t0 = time.perf_counter()
    dst = torch.empty(mib << 18)
    dst.copy_(src)
    view = memoryview(dst.numpy()).cast("B")
    for i in range(0, len(view), 4 * MiB):
        crc32c.crc32c(view[i : i + 4 * MiB])
    q.put(time.perf_counter() - t0)


def materialize_floor(mib: int, ranks: int, runs: int) -> float:
    """The slowest of ``ranks`` processes each materializing ``mib`` MiB at once (no storage, no
    exchange): a lower bound on the shared restore's wall time on this machine, whose cores the
    ranks share (on a cluster each rank has its own). Median of ``runs``."""
    import multiprocessing as mp

    import torch

    ctx = mp.get_context("fork")
    src = torch.randn(mib << 18)
    times = []
    for _ in range(runs):
        q, start = ctx.Queue(), ctx.Barrier(ranks)
        procs = [ctx.Process(target=_materialize, args=(mib, src, start, q)) for _ in range(ranks)]
        for p in procs:
            p.start()
        times.append(max(q.get() for _ in procs))
        for p in procs:
            p.join()
    return statistics.median(times)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(case: str, world: int, cfg: dict[str, Any], tmp: str) -> tuple[float, bool]:
    import torch.multiprocessing as tmp_mp

    out = os.path.join(tmp, f"{case}-{time.monotonic_ns()}")
    ctx = tmp_mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, case, cfg, out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=900)
    errs = [f"{out}.{r}.err" for r in range(world) if os.path.exists(f"{out}.{r}.err")]
    if errs or any(p.exitcode != 0 for p in procs):
        raise RuntimeError("a rank failed: " + "".join(Path(e).read_text() for e in errs))
    res = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    return max(r["seconds"] for r in res), all(r["ok"] for r in res)


def _ray_cases(args: argparse.Namespace, root: str, opts: dict[str, Any]) -> Callable[[str], tuple[float, bool]]:
    """Start 2 simulated Ray nodes; return a function running one case on fresh actors."""
    import ray
    import ray.cluster_utils
    import torch

    import ckpt.parallel.ray

    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = opts["key"], opts["secret"]
    os.environ["PYTHONPATH"] = os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    cluster = ray.cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"node0": 8}, "object_store_memory": max(512 << 20, 3 * args.mib << 20)})  # fmt: skip
    cluster.add_node(num_cpus=1, resources={"node1": 8}, object_store_memory=max(512 << 20, 3 * args.mib << 20))
    ray.init(address=cluster.address, log_to_driver=False)
    public = {k: v for k, v in opts.items() if k not in ("key", "secret")}  # credentials come from the environment

    @ray.remote(num_cpus=0)
    class Replica:
        def __init__(self) -> None:
            self.state: dict[str, Any] = {}

        def checkpoint_target(self) -> dict[str, Any]:
            return {k: torch.empty_like(v) for k, v in make_state(args.mib).items()}

        def load_checkpoint(self, state: dict[str, Any]) -> None:
            self.state = state

        def check(self) -> bool:
            return all(torch.equal(self.state[k], v) for k, v in make_state(args.mib).items())

        def ready(self) -> bool:
            ckpt.list_steps(root, storage_options=public)  # the S3 client made before the clock starts
            return True

    def run(case: str) -> tuple[float, bool]:
        n = 1 if case == "alone" else args.ranks
        actors = [Replica.options(resources={f"node{r % 2}": 1}).remote() for r in range(n)]
        ray.get([a.ready.remote() for a in actors])
        t0 = time.perf_counter()
        if case == "shared":
            ckpt.parallel.ray.restore_shared(root, actors, storage_options=public)
        else:
            ckpt.parallel.ray.restore(root, actors, storage_options=public)
        seconds = time.perf_counter() - t0
        ok = all(ray.get([a.check.remote() for a in actors]))
        for a in actors:
            ray.kill(a)
        return seconds, ok

    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--log", action="store_true", help="each rank logs its phases (fetch, exchange, check and copy)")
    ap.add_argument("--ray", action="store_true", help="Ray actors on 2 simulated nodes instead of torchrun ranks")
    ap.add_argument("--cases", nargs="+", default=["alone", "every-rank", "shared"],
                    choices=["alone", "every-rank", "shared"], help="the cases to run (default: all three)")  # fmt: skip
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args(argv)

    import fsspec

    import ckpt
    from benchmarks.s3_bench import start_endpoint
    from ckpt.testing.proxy import LatencyProxy

    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in ("alone", "every-rank", "shared") if c in args.cases}
    floor = {n: materialize_floor(args.mib, n, args.runs) for n in (1, args.ranks)} if not args.ray else {}
    with tempfile.TemporaryDirectory(prefix="ckpt-shared-bench-") as tmp, start_endpoint("moto", tmp) as url:
        base = {"key": "bench-key", "secret": "bench-secret", "endpoint_url": url, "skip_instance_cache": True}
        fsspec.filesystem("s3", **base).call_s3("create_bucket", Bucket="ckpt-shared-bench")
        with LatencyProxy(url, latency_ms=args.latency_ms) as proxy:
            opts = {**base, "endpoint_url": proxy.url}
            root = "s3://ckpt-shared-bench/run"
            state = make_state(args.mib)
            state_bytes = sum(t.numel() * t.element_size() for t in state.values())
            ckpt.save(root, state, step=1, storage_options=opts)
            del state
            cfg = {"root": root, "opts": opts, "mib": args.mib, "log": args.log}
            ray_case = _ray_cases(args, root, opts) if args.ray else None
            for run in range(args.runs):
                for case in rows:
                    proxy.reset()
                    if ray_case is not None:
                        seconds, ok = ray_case(case)
                    elif case == "alone":  # a fresh process too, as each rank is
                        seconds, ok = run_ranks("every-rank", 1, cfg, tmp)
                    else:
                        seconds, ok = run_ranks(case, args.ranks, cfg, tmp)
                    served = proxy.stats()["bytes_out"]
                    rows[case].append({"seconds": seconds, "served": served, "ok": ok})
                    print(f"run {run + 1}: {case}: {seconds:.3f} s, served {served / state_bytes:.3f}x the state, exact {ok}",
                          file=sys.stderr, flush=True)  # fmt: skip
    if args.ray:
        import ray

        ray.shutdown()
    result = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "state_bytes": state_bytes, "rows": rows,
              "floor_s": floor}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "shared_restore.json"), "w") as f:
        json.dump(result, f, indent=1)
    alone = statistics.median(r["seconds"] for r in rows.get("alone") or rows[args.cases[0]])
    who = f"{args.ranks} Ray actors on 2 nodes" if args.ray else f"{args.ranks} torchrun ranks (gloo)"
    print(f"{who} restoring a replicated {state_bytes / MiB:.0f} MiB state from moto S3 "
          f"(+{args.latency_ms:g} ms per request), medians of {args.runs}:\n")  # fmt: skip
    print("| case | bytes served / state | wall time | / one rank alone | exact |")
    print("|---|---:|---:|---:|---|")
    for case, rs in rows.items():
        t = statistics.median(r["seconds"] for r in rs)
        b = statistics.median(r["served"] for r in rs) / state_bytes
        print(f"| {case} | {b:.3f}x | {t:.3f} s | {t / alone:.2f}x | {all(r['ok'] for r in rs)} |")
    for n, t in floor.items():
        print(f"| floor: {n} process(es) only allocating, filling and checking {args.mib} MiB each, at once "
              f"| - | {t:.3f} s | {t / alone:.2f}x | - |")  # fmt: skip


if __name__ == "__main__":
    main()
