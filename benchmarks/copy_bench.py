"""Copy throughput: ``ckpt.copy`` against a raw fsspec copy of the same files.

    python -m benchmarks.copy_bench [--size-mib 256] [--runs 3] [--threads 8] [--no-s3] [--out FILE]

One checkpoint of ``--size-mib`` MiB (16 fp32 tensors, saved with the default SaveOptions: 4
shard files) is written to a local directory, then copied, ``--runs`` times each, runs
interleaved:

- ``local -> local``: ``ckpt.copy`` (CRC32C of every block and file checked, data files and
  directories fsynced, manifest committed create-only), the same with ``fsync=False``, and a raw
  copy: fsspec ``LocalFileSystem.cp_file`` of every file (data files and the manifest) on a pool
  of ``--threads`` threads, no checksum, no fsync;
- ``local -> moto S3``: ``ckpt.copy`` to a fresh prefix of a bucket on a moto server (started in
  a subprocess on 127.0.0.1), and a raw copy: s3fs ``put_file`` of every file on a pool of
  ``--threads`` threads.

Every destination starts empty. Reported: the median seconds and MB/s (10**6 bytes per second
of checkpoint bytes) and the ratio of ckpt's MB/s to the raw copy's. moto is CPU-bound and
shares the machine's cores with the client, so the S3 numbers measure moto as much as ckpt.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MiB = 1 << 20


def _state(size_mib: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    n = 16
    return {f"t{i}": torch.randn(size_mib * MiB // 4 // n, generator=g) for i in range(n)} | {"step": 1}


def _files(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root) for n in names if n != "LATEST"]
    return sorted(out)


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--no-s3", action="store_true", help="skip the moto S3 cases")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()

    import fsspec

    import ckpt

    tmp = tempfile.mkdtemp(prefix="ckpt-copy-bench-")
    src = os.path.join(tmp, "src")
    ckpt.save(src, _state(args.size_mib), step=1)
    files = _files(src)
    nbytes = sum(os.path.getsize(os.path.join(src, f)) for f in files)
    local = fsspec.filesystem("file")
    times: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        fn()
        times.setdefault(name, []).append(time.perf_counter() - t0)

    def raw_local(dst: str) -> None:
        def one(rel: str) -> None:
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            local.cp_file(os.path.join(src, rel), os.path.join(dst, rel))

        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(one, files))

    opts = ckpt.CopyOptions(num_threads=args.threads)
    for run in range(args.runs):
        for name, fn in [
            ("local->local ckpt", lambda d: ckpt.copy(src, d, options=opts)),
            ("local->local ckpt fsync=False", lambda d: ckpt.copy(src, d, options=ckpt.CopyOptions(num_threads=args.threads, fsync=False))),
            ("local->local raw fsspec", raw_local),
        ]:
            dst = os.path.join(tmp, f"dst-{run}")
            timed(name, lambda fn=fn, dst=dst: fn(dst))  # type: ignore[misc]
            if name.endswith("ckpt"):
                ckpt.verify(dst).raise_if_failed()  # untimed
            shutil.rmtree(dst)
        print(f"local run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)

    if not args.no_s3:
        from benchmarks.s3_bench import start_endpoint

        with start_endpoint("moto", tmp) as url:
            s3_opts = {"key": "bench-key", "secret": "bench-secret", "endpoint_url": url, "skip_instance_cache": True}
            s3 = fsspec.filesystem("s3", **s3_opts)
            bucket = "ckpt-copy-bench"
            s3.call_s3("create_bucket", Bucket=bucket)

            def raw_s3(prefix: str) -> None:
                with ThreadPoolExecutor(args.threads) as pool:
                    list(pool.map(lambda rel: s3.put_file(os.path.join(src, rel), f"{prefix}/{rel}"), files))

            for run in range(args.runs):
                for name, fn in [
                    ("local->s3 ckpt", lambda p: ckpt.copy(src, f"s3://{p}", dst_storage_options=s3_opts, options=opts)),
                    ("local->s3 raw fsspec", raw_s3),
                ]:
                    prefix = f"{bucket}/{uuid.uuid4().hex[:8]}"
                    timed(name, lambda fn=fn, prefix=prefix: fn(prefix))  # type: ignore[misc]
                    s3.rm(prefix, recursive=True)
                print(f"s3 run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)
    shutil.rmtree(tmp)

    results = {}
    print(f"\ncopy of one checkpoint: {nbytes / MiB:.1f} MiB in {len(files) - 1} data files + manifest; "
          f"median of {args.runs}, {args.threads} threads\n")  # fmt: skip
    print(f"{'case':34} {'seconds':>8} {'MB/s':>8} {'vs raw':>7}")
    for name, ts in times.items():
        mbps = nbytes / _median(ts) / 1e6
        base = times[name.split(" ", 1)[0] + " raw fsspec"]
        ratio = mbps / (nbytes / _median(base) / 1e6)
        results[name] = {"seconds": ts, "median_s": _median(ts), "mb_per_s": mbps, "vs_raw": ratio}
        print(f"{name:34} {_median(ts):8.3f} {mbps:8.1f} {ratio:7.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bytes": nbytes, "runs": args.runs, "threads": args.threads, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
