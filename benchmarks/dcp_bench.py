"""DCP through ckpt vs DCP's own storages: ``dcp.save`` / ``dcp.load`` of the same DTensors, same run.

    python -m benchmarks.dcp_bench [--out bench-out] [--runs 5] [--ranks 1 2 4] [--local-mib 1024]
                                   [--s3-mib 250] [--methods ckpt fs ckpt-s3 fsspec-s3 raw-s3 s3tc] [--quick]

For each rank count W, W real processes (gloo, CPU, started with ``torch.multiprocessing`` as
``benchmarks.dist_bench`` does) each hold their row shard of the same state: ``N_TENSORS`` fp32
tensors of ``COLS`` columns, DTensor ``Shard(0)`` on a 1-D mesh (a 1-device mesh at W = 1),
``--local-mib`` MiB in all on local disk (default 1 GiB), ``--s3-mib`` on S3 (default 250 MiB).
Values are deterministic (element ``j`` of tensor ``i`` is ``(j + i * 1000003) mod 2**24`` as
fp32: exact, and distinct within a tensor), so every rank builds its rows without the whole tensor.

Every case is one call of ``dcp.save`` then one of ``dcp.load`` on the same processes:

- ``ckpt``: ``ckpt.dcp.StorageWriter(root, step=1)`` + ``ckpt.dcp.SavePlanner()``;
  ``ckpt.dcp.StorageReader(root, step=1)`` + ``ckpt.dcp.LoadPlanner()``; local directory;
- ``fs``: DCP's ``FileSystemWriter(root, sync_files=True)`` (fsync on, as ckpt does; its other
  options at their defaults) / ``FileSystemReader(root)``, DCP's default planners;
- ``ckpt-s3``: ckpt's writer/reader/planners on ``s3://`` (moto, below);
- ``fsspec-s3``: DCP's ``FsspecWriter(url, sync_files=False)`` / ``FsspecReader(url)`` on the
  same moto (``sync_files=False``: on an fsspec stream its fsync falls back to ``os.sync()`` of
  the local disks, which means nothing for S3), default planners;
- ``raw-s3``: not DCP: the ceiling of this endpoint. Each rank PUTs the same bytes (its rows of
  every tensor, joined before the clock starts) as 4 objects at once with s3fs ``pipe`` (one
  client, its default concurrency), and GETs them back with ``cat``: no planning, no checksums,
  no commit. A writer that matches it is as fast as moto takes bytes;
- ``s3tc``: ``s3torchconnector.dcp.S3StorageWriter``/``S3StorageReader`` on the same moto, only if
  ``s3torchconnector`` is importable (otherwise recorded as not installed; nothing is installed).

Timing: all ranks pass a barrier, the clock starts, the writer/reader is constructed (fsspec
clients connect inside the timed part, for every method alike) and ``dcp.save`` / ``dcp.load``
runs, then a barrier; the time is the largest rank's. Before the load the state is dropped, the
local checkpoint files are evicted from the page cache (``fdatasync`` by the writers, then
``posix_fadvise(DONTNEED)``: a *cold* load) and zero-filled DTensors of the saved layout are
made (touched, untimed); the load fills them in place. After the timing every rank checks every
value it loaded against the saved state (exact). Each (method, W, run) runs in fresh processes,
the methods interleaved within each run, their order rotating from run to run. A case that
fails is recorded (and retried once) without stopping the others.

S3: the program starts moto on 127.0.0.1 (port 0) in a subprocess, as ``benchmarks.s3_bench``
does (its ``start_endpoint``), and talks to it directly (no latency proxy); each case writes under
a fresh prefix, removed afterwards. moto is CPU-bound and shares the 2 cores with the ranks.

Output: ``<out>/dcp_bench.json`` (every run's times, CPU and peak RSS per case) and
``<out>/dcp_bench.md`` (the tables printed at the end): medians [min-max], MiB/s from the
median, and the ratios other / ckpt (above 1: ckpt faster) against the issue's bars: ckpt vs
FileSystemWriter/Reader >= 1.5x, ckpt vs FsspecWriter/Reader on S3 >= 3x.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

from benchmarks.dist_bench import _evict, _port
from benchmarks.s3_bench import BUCKET, CREDENTIALS, MiB, _env, _rows, start_endpoint

N_TENSORS = 64
COLS = 1024
METHODS = ("ckpt", "fs", "ckpt-s3", "fsspec-s3", "raw-s3", "s3tc")
WHERE = {"ckpt": "local", "fs": "local", "ckpt-s3": "s3", "fsspec-s3": "s3", "raw-s3": "s3", "s3tc": "s3"}
LABEL = {
    "ckpt": "ckpt.dcp StorageWriter/Reader",
    "fs": "DCP FileSystemWriter/Reader",
    "ckpt-s3": "ckpt.dcp StorageWriter/Reader",
    "fsspec-s3": "DCP FsspecWriter/Reader",
    "raw-s3": "raw s3fs pipe/cat (no DCP: the endpoint's ceiling)",
    "s3tc": "s3torchconnector S3StorageWriter/Reader",
}
# (ckpt's method, the other, the bar or None)
RATIOS = (("ckpt", "fs", 1.5), ("ckpt-s3", "fsspec-s3", 3.0), ("ckpt-s3", "raw-s3", None), ("fsspec-s3", "raw-s3", None),
          ("ckpt-s3", "s3tc", None))
S3TC_REGION = "us-east-1"
CASE_TIMEOUT_S = 900.0

# --- the state -----------------------------------------------------------------------------------


def state_shapes(size_bytes: int) -> list[tuple[str, tuple[int, int]]]:
    rows = max(4, size_bytes // N_TENSORS // (COLS * 4))
    return [(f"layers.{i}.weight", (rows, COLS)) for i in range(N_TENSORS)]


def state_bytes(size_bytes: int) -> int:
    return sum(r * c * 4 for _, (r, c) in state_shapes(size_bytes))


def rows_values(i: int, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of tensor ``i`` (fp32, exact integers below 2**24)."""
    import torch

    idx = torch.arange(lo * COLS, hi * COLS, dtype=torch.int64)
    return ((idx + i * 1_000_003) % (1 << 24)).to(torch.float32).view(hi - lo, COLS)


def s3tc_available() -> bool:
    try:
        return importlib.util.find_spec("s3torchconnector") is not None
    except (ImportError, ValueError):
        return False


# --- one case: W spawned processes ----------------------------------------------------------------


def _usage() -> tuple[float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_maxrss * 1024  # Linux: KiB


def _storage(method: str, root: str, opts: dict[str, Any]) -> tuple[Any, Any]:
    """(make_writer, make_reader): each returns (storage, planner); called inside the timed part."""
    import torch.distributed.checkpoint as dcp

    import ckpt.dcp

    if method in ("ckpt", "ckpt-s3"):
        so = opts if method == "ckpt-s3" else None
        return (
            lambda: (ckpt.dcp.StorageWriter(root, step=1, storage_options=so), ckpt.dcp.SavePlanner()),
            lambda: (ckpt.dcp.StorageReader(root, step=1, storage_options=so), ckpt.dcp.LoadPlanner()),
        )
    if method == "fs":
        return (lambda: (dcp.FileSystemWriter(root, sync_files=True), None),
                lambda: (dcp.FileSystemReader(root), None))  # fmt: skip
    if method == "fsspec-s3":
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

        return (lambda: (FsspecWriter(root, sync_files=False, **opts), None),
                lambda: (FsspecReader(root, **opts), None))  # fmt: skip
    if method == "raw-s3":  # not DCP: _raw_s3 does its own I/O
        return (None, None)
    if method == "s3tc":  # untested here: s3torchconnector was not installed when this was written
        from s3torchconnector import S3ClientConfig  # type: ignore[import-not-found]
        from s3torchconnector.dcp import S3StorageReader, S3StorageWriter  # type: ignore[import-not-found]

        cfg = S3ClientConfig(force_path_style=True)
        return (lambda: (S3StorageWriter(S3TC_REGION, root, s3client_config=cfg), None),
                lambda: (S3StorageReader(S3TC_REGION, root, s3client_config=cfg), None))  # fmt: skip
    raise ValueError(method)


def _worker(rank: int, spec: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    world, method = spec["world"], spec["method"]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]))
    if method == "s3tc":  # the CRT client reads its endpoint and credentials from the environment
        key, secret = spec["opts"]["key"], spec["opts"]["secret"]
        os.environ.update(AWS_ENDPOINT_URL=spec["opts"]["endpoint_url"], AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    shapes = state_shapes(spec["size_bytes"])
    make_writer, make_reader = _storage(method, spec["root"], spec["opts"])

    def make(fill: bool) -> dict[str, Any]:
        state = {}
        for i, (key, shape) in enumerate(shapes):
            lo, hi = _rows(shape[0], rank, world)
            local = rows_values(i, lo, hi) if fill else torch.zeros(hi - lo, shape[1])
            state[key] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                                            stride=(shape[1], 1))  # fmt: skip
        return state

    def timed(fn: Any) -> tuple[float, float]:
        dist.barrier()
        cpu0, _ = _usage()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        elapsed = time.perf_counter() - t0
        return elapsed, _usage()[0] - cpu0

    held = [make(fill=True)]
    if method == "raw-s3":
        _raw_s3(rank, world, spec, held[0], timed)
        return

    def save() -> None:
        writer, planner = make_writer()
        dcp.save(held[0], storage_writer=writer, planner=planner)

    save_s, save_cpu = timed(save)
    _, peak_save = _usage()
    held.clear()  # the saved state is dropped before the load
    gc.collect()
    if rank == 0 and WHERE[method] == "local":
        _evict(spec["root"])
    target = make(fill=False)

    def load() -> None:
        reader, planner = make_reader()
        dcp.load(target, storage_reader=reader, planner=planner)

    load_s, load_cpu = timed(load)
    _, peak = _usage()
    # check every value (untimed)
    for i, (key, shape) in enumerate(shapes):
        lo, hi = _rows(shape[0], rank, world)
        if not torch.equal(target[key].to_local(), rows_values(i, lo, hi)):
            raise RuntimeError(f"{method}: rank {rank}: {key} loaded wrong values")
    with open(f"{spec['out']}.rank{rank}.json", "w") as f:
        json.dump({"save_s": save_s, "load_s": load_s, "save_cpu_s": save_cpu, "load_cpu_s": load_cpu,
                   "peak_rss_save_bytes": peak_save, "peak_rss_bytes": peak, "checked": True}, f)  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


def _raw_s3(rank: int, world: int, spec: dict[str, Any], state: dict[str, Any], timed: Any) -> None:
    """The raw-s3 case: this rank's bytes PUT as 4 objects at once, then GET back (see the top)."""
    import fsspec
    import torch.distributed as dist

    joined = b"".join(t.to_local().contiguous().numpy().tobytes() for t in state.values())
    step = -(-len(joined) // 4)
    blobs = {f"{spec['root'].removeprefix('s3://')}/rank{rank}-{i}": joined[i * step:(i + 1) * step] for i in range(4)}
    state.clear()
    got: dict[str, bytes] = {}

    def client() -> Any:
        return fsspec.filesystem("s3", **spec["opts"], skip_instance_cache=True)

    save_s, save_cpu = timed(lambda: client().pipe(blobs))
    _, peak_save = _usage()
    load_s, load_cpu = timed(lambda: got.update(client().cat(list(blobs))))
    _, peak = _usage()
    if got != blobs:
        raise RuntimeError(f"raw-s3: rank {rank}: read back other bytes")
    with open(f"{spec['out']}.rank{rank}.json", "w") as f:
        json.dump({"save_s": save_s, "load_s": load_s, "save_cpu_s": save_cpu, "load_cpu_s": load_cpu,
                   "peak_rss_save_bytes": peak_save, "peak_rss_bytes": peak, "checked": True}, f)  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


def launch(spec: dict[str, Any], tmp: str, timeout_s: float) -> dict[str, Any]:
    """Run one case on ``spec['world']`` fresh processes; the ranks' results merged."""
    import torch.multiprocessing as mp

    world = spec["world"]
    out = os.path.join(tmp, f"case-{uuid.uuid4().hex[:8]}")
    spec = {**spec, "out": out, "port": _port()}
    ctx = mp.start_processes(_worker, args=(spec,), nprocs=world, join=False, start_method="spawn")
    error = None
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=5.0):
            if time.monotonic() > deadline:
                error = f"timed out after {timeout_s:.0f} s"
                break
    except Exception as err:  # a rank failed (its traceback is in the message) or exited non-zero
        error = str(err).strip()[-3000:]
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
    ranks = []
    for rank in range(world):
        path = f"{out}.rank{rank}.json"
        if os.path.exists(path):
            with open(path) as f:
                ranks.append(json.load(f))
    if len(ranks) < world:
        raise RuntimeError(error or "a rank wrote no result")
    merged: dict[str, Any] = {k: max(r[k] for r in ranks) for k in ("save_s", "load_s", "peak_rss_bytes", "peak_rss_save_bytes")}
    merged["save_cpu_s"] = sum(r["save_cpu_s"] for r in ranks)
    merged["load_cpu_s"] = sum(r["load_cpu_s"] for r in ranks)
    if error:  # every rank checked its values and wrote its result, then one failed at teardown
        merged["teardown_error"] = error[-500:]
    return merged


# --- report ----------------------------------------------------------------------------------------


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _cell(xs: list[float]) -> str:
    return f"{_med(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def build_report(cases: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    by = {(c["method"], c["world"]): c for c in cases}
    worlds = sorted({c["world"] for c in cases})
    methods = [m for m in METHODS if any(c["method"] == m for c in cases)]
    storages = {WHERE[m] for m in methods}
    where = [f"{meta['local_mib']:g} MiB on local disk" if "local" in storages else "",
             f"{meta['s3_mib']:g} MiB on moto S3 (127.0.0.1, no added latency)" if "s3" in storages else ""]  # fmt: skip
    lines = [
        f"`dcp.save` / `dcp.load` of {N_TENSORS} fp32 tensors (DTensor Shard(0) over the ranks; gloo, CPU), "
        f"{', '.join(w for w in where if w)}; medians of {meta['runs']} runs [min-max] in seconds, MiB/s from the median; loads are cold (local files "
        "evicted) into preallocated DTensors and every value is checked afterwards. CPU = user+sys of all ranks "
        "in the timed part (median); peak RSS = largest rank, whole process.",
        "",
        "| ranks | storage | MiB | method | save s | save MiB/s | load s | load MiB/s | CPU save/load s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in worlds:
        for m in methods:
            c = by.get((m, w))
            if c is None:
                continue
            mib = c["size_bytes"] / MiB
            if not c["save_s"]:
                lines.append(f"| {w} | {WHERE[m]} | {mib:.0f} | {LABEL[m]} | failed: {c['failures'][-1][:120]!r} | | | | | |")
                continue
            lines.append(
                f"| {w} | {WHERE[m]} | {mib:.0f} | {LABEL[m]} | {_cell(c['save_s'])} | {mib / _med(c['save_s']):.0f} | "
                f"{_cell(c['load_s'])} | {mib / _med(c['load_s']):.0f} | {_med(c['save_cpu_s']):.1f} / "
                f"{_med(c['load_cpu_s']):.1f} | {max(c['peak_rss_bytes']) / MiB:.0f} |"
            )
    if meta.get("s3tc") != "ok":
        lines.append(f"| - | s3 | - | {LABEL['s3tc']} | {meta.get('s3tc')} | | | | | |")
    lines += [
        "",
        "Ratios: the other's median time / ckpt's (above 1: ckpt faster; a row naming another method first "
        "compares that one instead of ckpt); in brackets the min-max of the per-run ratios (the methods alternate "
        "within a run). Bars from the issue: local >= 1.5x, S3 >= 3x. FsspecWriter vs the raw client is the most "
        "any writer could gain on FsspecWriter on this endpoint.",
        "",
        "| ranks | vs | save | load |",
        "|---|---|---|---|",
    ]
    for w in worlds:
        for ours, other, bar in RATIOS:
            a, b = by.get((ours, w)), by.get((other, w))
            if a is None or b is None or not a["save_s"] or not b["save_s"]:
                continue
            cells = []
            for phase in ("save_s", "load_s"):
                r = _med(b[phase]) / _med(a[phase])
                per_run = [y / x for x, y in zip(a[phase], b[phase], strict=False)]
                mark = "" if bar is None else (" ok" if r >= bar else " MISS")
                cells.append(f"{r:.2f}x{mark} [{min(per_run):.2f}-{max(per_run):.2f}]")
            mine = "" if ours in ("ckpt", "ckpt-s3") else f"{LABEL[ours]} vs "
            what = f"{mine}{LABEL[other]} ({WHERE[other]}{'' if bar is None else f', bar {bar:g}x'})"
            lines.append(f"| {w} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the driver ------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--quick", action="store_true", help="64 MiB local, 32 MiB S3, ranks 1 2, 2 runs: a smoke test")
    ap.add_argument("--runs", type=int, default=None, help="runs per case (default 5; 2 with --quick)")
    ap.add_argument("--ranks", type=int, nargs="+", default=None, help="rank counts (default 1 2 4; 1 2 with --quick)")
    ap.add_argument("--local-mib", type=float, default=None, help="state on local disk (default 1024; 64 with --quick)")
    ap.add_argument("--s3-mib", type=float, default=None, help="state on S3 (default 250; 32 with --quick)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--case-timeout", type=float, default=CASE_TIMEOUT_S, help="seconds per case before it is killed")
    args = ap.parse_args()
    args.runs = args.runs or (2 if args.quick else 5)
    args.ranks = args.ranks or ([1, 2] if args.quick else [1, 2, 4])
    args.local_mib = args.local_mib or (64.0 if args.quick else 1024.0)
    args.s3_mib = args.s3_mib or (32.0 if args.quick else 250.0)
    os.makedirs(args.out, exist_ok=True)
    s3tc = "ok" if s3tc_available() else "not installed (s3torchconnector is not importable)"
    methods = [m for m in args.methods if m != "s3tc" or s3tc == "ok"]
    if "s3tc" not in args.methods:
        s3tc = "not run (not in --methods)"
    size = {"local": state_bytes(int(args.local_mib * MiB)), "s3": state_bytes(int(args.s3_mib * MiB))}
    env = _env()  # no AWS profile, no metadata lookups; the spawned ranks inherit it
    os.environ.clear()
    os.environ.update(env)
    tmp = tempfile.mkdtemp(prefix="dcp-bench-")
    results: dict[tuple[str, int], dict[str, Any]] = {}
    t_start = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            fs = opts = None
            if any(WHERE[m] == "s3" for m in methods):
                upstream = stack.enter_context(start_endpoint("moto", tmp))
                import fsspec

                key, secret = CREDENTIALS["moto"]
                opts = {"key": key, "secret": secret, "endpoint_url": upstream}
                fs = fsspec.filesystem("s3", **opts, skip_instance_cache=True)
                if not fs.exists(BUCKET):
                    fs.call_s3("create_bucket", Bucket=BUCKET)
            for world in args.ranks:
                for run in range(args.runs):
                    k = run % len(methods)
                    for method in methods[k:] + methods[:k]:  # interleaved, the order rotating
                        c = results.setdefault((method, world), {
                            "method": method, "world": world, "storage": WHERE[method], "size_bytes": size[WHERE[method]],
                            "save_s": [], "load_s": [], "save_cpu_s": [], "load_cpu_s": [], "peak_rss_bytes": [],
                            "peak_rss_save_bytes": [], "failures": [], "teardown_errors": []})  # fmt: skip
                        for attempt in range(2):
                            name = f"{uuid.uuid4().hex[:8]}-{method}-w{world}"
                            if WHERE[method] == "local":
                                root = os.path.join(tmp, name)
                            else:
                                root = f"s3://{BUCKET}/{name}"
                            spec = {"method": method, "world": world, "size_bytes": size[WHERE[method]], "root": root,
                                    "opts": opts or {}}  # fmt: skip
                            try:
                                r = launch(spec, tmp, args.case_timeout)
                            except Exception as err:
                                c["failures"].append(str(err)[-2000:])
                                print(f"W={world} run {run} {method}: FAILED (try {attempt + 1}): {str(err)[-800:]}",
                                      file=sys.stderr, flush=True)  # fmt: skip
                                r = None
                            finally:
                                if WHERE[method] == "local":
                                    shutil.rmtree(root, ignore_errors=True)
                                elif fs is not None:
                                    try:
                                        fs.rm(root.removeprefix("s3://"), recursive=True)
                                    except Exception as err:  # nothing written, or moto busy: not fatal
                                        print(f"cleanup of {root}: {err!r}", file=sys.stderr, flush=True)
                            if r is not None:
                                break
                        if r is None:
                            continue
                        for f in ("save_s", "load_s", "save_cpu_s", "load_cpu_s", "peak_rss_bytes", "peak_rss_save_bytes"):
                            c[f].append(r[f])
                        if "teardown_error" in r:
                            c["teardown_errors"].append(r["teardown_error"])
                        print(f"W={world} run {run} {method:>9}: save {r['save_s']:6.2f} s  load {r['load_s']:6.2f} s"
                              f"  (checked)", file=sys.stderr, flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import torch

    meta = {
        "runs": args.runs, "ranks": args.ranks, "local_mib": args.local_mib, "s3_mib": args.s3_mib,
        "local_state_bytes": size["local"], "s3_state_bytes": size["s3"], "n_tensors": N_TENSORS, "cols": COLS,
        "methods": methods, "s3tc": s3tc, "quick": args.quick, "wall_s": round(time.monotonic() - t_start, 1),
        "command": "python -m benchmarks.dcp_bench " + " ".join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - (time.monotonic() - t_start))),
        "machine": f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}, torch {torch.__version__}",
    }  # fmt: skip
    cases = list(results.values())
    table = build_report(cases, meta)
    print(table)
    with open(os.path.join(args.out, "dcp_bench.json"), "w") as f:
        json.dump({"args": meta, "cases": cases}, f, indent=1)
    with open(os.path.join(args.out, "dcp_bench.md"), "w") as f:
        f.write(table + "\n")
    if any(not c["save_s"] for c in cases):
        sys.exit(1)


if __name__ == "__main__":
    main()
