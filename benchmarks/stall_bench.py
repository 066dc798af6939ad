"""Training stall of an async save vs a sync save of the same state, local disk and S3 (moto).

    python -m benchmarks.stall_bench [--out bench-out] [--runs 5] [--size-mib 1024]
                                     [--s3-size-mib 1024] [--backends local s3] [--quick]

Each case runs in its own fresh process on the local benchmark's deterministic state (193
tensors, bf16/fp32, ``benchmarks.local_bench.state_specs``). A case makes ``SAVES`` consecutive
saves of that state through ``ckpt.CheckpointManager`` (retention ``keep_last=1``, so old
checkpoints are retired as a real run would):

- ``sync``: ``ManagerOptions(async_save=False)``: ``save()`` blocks for the write and commit;
- ``async``: the default: ``save()`` blocks while the tensors are copied into host staging
  buffers; the time until the commit is measured with ``wait()`` right after.

The first save of an async manager allocates its staging buffers (fresh memory is slow on this
VM); the later ones reuse them: both are reported (``first``, ``steady`` = median of the later
saves). The stall is the time the training thread is blocked in ``save()``. Peak memory: the
kernel's RSS high-water mark is reset before the first save; ``extra`` = peak - RSS before it
(the state exists by then), so async's extra includes its staging copy of the state.

Before the saves, the case calls ``mgr.restore(state)`` as a training loop does to resume (there
is nothing to restore yet): the storage client is built there, outside the measured peak.

S3: the program starts moto on 127.0.0.1 (port 0) as ``benchmarks.s3_bench`` does; the S3 size
defaults to 1 GiB, as the issue asks (``--s3-size-mib`` for less: moto is CPU-bound on 2 cores). Raw JSON: ``<out>/stall_bench.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

from benchmarks._child import RESULT_TAG, run_in_child

MiB = 1 << 20
SAVES = 4
CASE_TIMEOUT_S = 1200


def run_child(spec: dict[str, Any]) -> dict[str, Any]:

    import ckpt
    from benchmarks.local_bench import make_state, reset_peak, rss_now, state_specs

    state = make_state(state_specs(spec["size_bytes"]), fill=True)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    opts = ckpt.ManagerOptions(async_save=spec["mode"] == "async", retention=ckpt.RetentionPolicy(keep_last=1))
    mgr = ckpt.CheckpointManager(spec["root"], opts, storage_options=spec.get("storage_options"))
    # A training loop asks for the checkpoint to resume from before it trains: that first call
    # builds the storage client (botocore loads its service model), memory the saves don't add.
    mgr.restore(state)
    reset_peak()
    before = rss_now()
    stalls, totals = [], []
    for step in range(SAVES):
        t0 = time.perf_counter()
        mgr.save(step, state)
        stalls.append(time.perf_counter() - t0)
        mgr.wait()
        totals.append(time.perf_counter() - t0)
        for t in state.values():  # the training step changes the state in place
            t.add_(1)
    mgr.close()
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"stall_s": stalls, "total_s": totals, "state_bytes": nbytes, "extra_rss_bytes": peak - before}


def _s3_options(url: str) -> dict[str, Any]:
    from benchmarks.s3_bench import CREDENTIALS

    key, secret = CREDENTIALS["moto"]
    return {"key": key, "secret": secret, "endpoint_url": url}


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    return run_in_child("benchmarks.stall_bench", spec, timeout_s=CASE_TIMEOUT_S, what=f"{spec['backend']}/{spec['mode']}")


def _summary(rec: dict[str, Any]) -> dict[str, Any]:
    first = [r["stall_s"][0] for r in rec["runs"]]
    steady = [statistics.median(r["stall_s"][1:]) for r in rec["runs"]]
    total = [statistics.median(r["total_s"][1:]) for r in rec["runs"]]
    extra = [r["extra_rss_bytes"] for r in rec["runs"]]
    return {"first_stall_s": first, "steady_stall_s": steady, "steady_total_s": total, "extra_rss_bytes": extra}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--runs", type=int, help="runs per case (default 5; --quick: 2)")
    ap.add_argument("--size-mib", type=int, help="local state size (default 1024; --quick: 64)")
    ap.add_argument("--s3-size-mib", type=int, help="S3 state size (default 1024; --quick: 32)")
    ap.add_argument("--backends", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(RESULT_TAG + json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    runs = args.runs or (2 if args.quick else 5)
    sizes = {"local": (args.size_mib or (64 if args.quick else 1024)) * MiB,
             "s3": (args.s3_size_mib or (32 if args.quick else 1024)) * MiB}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    records: dict[tuple[str, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ckpt-stall-") as tmp, contextlib.ExitStack() as stack:
        s3_opts: dict[str, Any] | None = None
        if "s3" in args.backends:
            import s3fs

            from benchmarks.s3_bench import start_endpoint

            url = stack.enter_context(start_endpoint("moto", tmp))
            s3_opts = _s3_options(url)
            s3fs.S3FileSystem(skip_instance_cache=True, **s3_opts).call_s3("create_bucket", Bucket="ckpt-stall-bench")
        for run in range(runs):
            for backend in args.backends:
                modes = ("sync", "async") if run % 2 == 0 else ("async", "sync")  # alternate the order
                for mode in modes:
                    if backend == "local":
                        root = os.path.join(tmp, f"{mode}-{run}")
                        spec = {"backend": backend, "mode": mode, "size_bytes": sizes[backend], "root": root}
                    else:
                        root = f"s3://ckpt-stall-bench/{mode}-{run}-{uuid.uuid4().hex[:6]}"
                        spec = {"backend": backend, "mode": mode, "size_bytes": sizes[backend], "root": root,
                                "storage_options": s3_opts}  # fmt: skip
                    print(f"stall: run {run + 1}/{runs} {backend} {mode}", file=sys.stderr, flush=True)
                    res = run_case(spec)
                    rec = records.setdefault((backend, mode), {"backend": backend, "mode": mode, "runs": []})
                    rec["runs"].append(res)
                    if backend == "local":
                        shutil.rmtree(root, ignore_errors=True)
    cases = []
    for rec in records.values():
        cases.append({"backend": rec["backend"], "mode": rec["mode"], "state_bytes": rec["runs"][0]["state_bytes"],
                      "saves_per_run": SAVES, **_summary(rec), "raw_runs": rec["runs"]})  # fmt: skip
    result = {"cases": cases, "args": {"runs": runs, "sizes": sizes, "backends": args.backends, "quick": args.quick},
              "wall_s": time.time() - t_start}  # fmt: skip
    with open(os.path.join(args.out, "stall_bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    from benchmarks.report import stall_markdown

    print(stall_markdown(result))


if __name__ == "__main__":
    main()
