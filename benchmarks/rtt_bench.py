"""Round trips before data moves: ckpt on S3 through a +latency proxy, against one raw request.

    python -m benchmarks.rtt_bench [--size-mib 64] [--latency-ms 20] [--runs 5] [--tensors 4]
                                   [--out DIR] [--log]

Starts moto (ThreadedMotoServer, a subprocess, 127.0.0.1) and one latency proxy
(ckpt/testing/proxy.py, a subprocess) adding ``--latency-ms`` to every request, then in THIS
process, which stays up for every run (so a save's endpoint probe is paid once, by the untimed
warm-up save, as in a training job):

- ``raw PUT``: s3fs ``pipe_file`` of the safetensors-serialized state as one PutObject;
- ``ckpt.save``: ``ckpt.save`` of the same tensors (a new step each run);
- ``raw GET``: s3fs ``cat_file`` of that object as one GetObject (``max_concurrency=1``);
- ``restore newest``: ``ckpt.restore(root, target=...)`` (step=None: the newest step);
- ``restore named``: ``ckpt.restore(root, step, target=...)``.

The raw client is s3fs with the options ckpt is given (``key``, ``secret``, ``endpoint_url``)
and the same retry settings ckpt gives its own client; every client is warmed up (connected)
before the timed runs. Runs are interleaved across the five operations; times are medians of
``--runs`` [min-max]; the ratio is raw median / ckpt median (above 1: ckpt faster). The
requests of each ckpt call are read from the proxy's counters (by HTTP method); ``--log``
makes the proxy print every request (method, path, status, seconds) on stderr, in order.
Results: the table on stdout and ``DIR/rtt_bench.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from benchmarks.s3_bench import BUCKET, CREDENTIALS, _server, start_endpoint

MiB = 1 << 20
OPS = ("raw PUT", "ckpt.save", "raw GET", "restore newest", "restore named")


def _state(size_bytes: int, n: int) -> dict[str, Any]:
    import torch

    rows = max(1, size_bytes // n // (4 * 1024))
    g = torch.Generator().manual_seed(7)
    return {f"layers.{i}.weight": torch.randn((rows, 1024), generator=g) for i in range(n)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import fsspec
    import torch
    from safetensors.torch import save as st_save

    import ckpt
    from ckpt.testing.proxy import fetch_stats

    tmp = tempfile.mkdtemp(prefix="rtt-bench-")
    key, secret = CREDENTIALS["moto"]
    with start_endpoint("moto", tmp) as upstream, contextlib.ExitStack() as stack:
        cmd = [sys.executable, "-m", "ckpt.testing.proxy", "--upstream", upstream, "--latency-ms", str(args.latency_ms)]
        if args.log:
            cmd.append("--log")
        _, proxy = stack.enter_context(_server(cmd, "proxy", stderr=None if args.log else subprocess.DEVNULL))
        admin = fsspec.filesystem("s3", key=key, secret=secret, endpoint_url=upstream, skip_instance_cache=True)
        if not admin.exists(BUCKET):
            admin.call_s3("create_bucket", Bucket=BUCKET)
        prefix = f"{BUCKET}/rtt-{uuid.uuid4().hex[:8]}"
        root = f"s3://{prefix}/ckpt"
        opts = {"key": key, "secret": secret, "endpoint_url": proxy}
        # the raw client: the same options, botocore's and s3fs's retries off as ckpt's are
        raw = fsspec.filesystem("s3", **opts, skip_instance_cache=True,
                                config_kwargs={"retries": {"mode": "standard", "total_max_attempts": 1}})  # fmt: skip
        raw.retries = 1
        state = _state(int(args.size_mib * MiB), args.tensors)
        payload = st_save(state)
        target = {k: torch.empty_like(v) for k, v in state.items()}
        obj = f"{prefix}/raw/state.safetensors"

        def counted(fn: Any) -> tuple[float, dict[str, int]]:
            before = fetch_stats(proxy)["requests"]
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            after = fetch_stats(proxy)["requests"]
            by = {m: after.get(m, 0) - before.get(m, 0) for m in sorted(set(before) | set(after))}
            return dt, {m: n for m, n in by.items() if n}

        step = 0

        def do(op: str) -> None:
            nonlocal step
            if op == "raw PUT":
                raw.pipe_file(obj, payload, chunksize=len(payload))
            elif op == "raw GET":
                got = raw.cat_file(obj, max_concurrency=1)
                assert len(got) == len(payload)
            elif op == "ckpt.save":
                step += 1
                ckpt.save(root, state, step=step, storage_options=opts)
            elif op == "restore newest":
                ckpt.restore(root, target=target, storage_options=opts)
            else:
                ckpt.restore(root, max(1, step - 1), target=target, storage_options=opts)

        # warm-up (untimed): connections, the probe of the first save of the process
        warm: dict[str, dict[str, int]] = {}
        for op in OPS:
            warm[op] = counted(lambda op=op: do(op))[1]
        times: dict[str, list[float]] = {op: [] for op in OPS}
        counts: dict[str, list[dict[str, int]]] = {op: [] for op in OPS}
        for r in range(args.runs):
            for op in OPS:
                dt, by = counted(lambda op=op: do(op))
                times[op].append(dt)
                counts[op].append(by)
                print(f"run {r} {op:>15}: {dt:6.3f} s  {by}", file=sys.stderr, flush=True)
        for k, v in target.items():  # the last restore was of an older step: same values
            if not torch.equal(v, state[k]):
                raise SystemExit(f"{k}: restored wrong values")
        admin.rm(prefix, recursive=True)
    return {"times_s": times, "requests": counts, "first": warm, "args": vars(args),
            "state_bytes": len(payload)}  # fmt: skip


def report(res: dict[str, Any]) -> str:
    a = res["args"]
    t = res["times_s"]
    med = {op: statistics.median(v) for op, v in t.items()}

    def req(by: dict[str, int]) -> str:
        return ", ".join(f"{m} {n}" for m, n in sorted(by.items())) + f" (= {sum(by.values())})"

    lines = [
        f"S3 round trips: moto on 127.0.0.1 behind a +{a['latency_ms']:g} ms/request proxy, "
        f"{res['state_bytes'] / MiB:.0f} MiB in {a['tensors']} fp32 tensors, one process (the first save's "
        f"probe in the untimed warm-up); medians of {a['runs']} runs [min-max]",
        "",
        "| operation | time s | vs raw | requests (median run) | first call of the process |",
        "|---|---|---|---|---|",
    ]
    for op in OPS:
        v = t[op]
        ref = "raw PUT" if op == "ckpt.save" else "raw GET" if op.startswith("restore") else None
        ratio = f"{med[ref] / med[op]:.2f}x" if ref else "-"
        mid = sorted(range(len(v)), key=v.__getitem__)[(len(v) - 1) // 2]
        lines.append(f"| {op} | {med[op]:.3f} [{min(v):.3f}-{max(v):.3f}] | {ratio} | "
                     f"{req(res['requests'][op][mid])} | {req(res['first'][op])} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=float, default=64.0)
    ap.add_argument("--tensors", type=int, default=4)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None, help="write rtt_bench.json here")
    ap.add_argument("--log", action="store_true", help="the proxy prints every request on stderr")
    args = ap.parse_args()
    res = run(args)
    print(report(res))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "rtt_bench.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
