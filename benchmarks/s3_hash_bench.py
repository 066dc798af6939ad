"""How many times a save to S3 hashes each byte, and what ``ckpt verify --quick`` asks S3 for.

    python -m benchmarks.s3_hash_bench [--size-mib 250] [--runs 3] [--baseline DIR] [--one-file] [--out DIR]

One moto endpoint on 127.0.0.1 (a subprocess, as in ``s3_bench``, so its own hashing is not
counted). Each run saves the ``s3_bench`` state (64 tensors, ``--size-mib`` MiB) with
``ckpt.save`` in a fresh process (default options: 4 files, each one PutObject at 250 MiB;
``--one-file``: one file, a multipart upload above 128 MiB), once with this checkout and, with ``--baseline DIR``, once
with the checkout at ``DIR`` (e.g. a ``git worktree`` of main), interleaved. The process counts
the bytes given to every hash a save can run, by wrapping the functions in the process (nothing
in ``ckpt`` is changed): ``crc32c.crc32c`` (ckpt's CRC-32C: the executor's blocks, any body the
S3 backend hashes itself, the manifest), ``botocore.httpchecksum.crc32`` (botocore's own
flexible checksum, CRC32 by default since botocore 1.36; zlib's, as awscrt is not installed)
and ``botocore.auth.SigV4Auth.payload`` (SigV4's SHA-256 of a signed body: the body's length
is counted when it returns a digest rather than ``UNSIGNED-PAYLOAD``). Reported per hash as bytes
hashed / bytes saved (1.0 = one pass over the data), with the save's wall time.

Then, for this checkout, ``ckpt verify --quick`` and a full ``ckpt verify`` of the saved step
run through the counting proxy (``ckpt.testing.proxy``): the requests each made, by method, and
how many were GETs of data files. Results: ``DIR/s3_hash_bench.json`` and the table printed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MiB = 1 << 20


def _count_hashes() -> collections.Counter[str]:
    """Wrap the hash functions a save may run so that they count the bytes they are given."""
    import botocore.auth
    import botocore.httpchecksum
    import botocore.utils
    import crc32c

    counts: collections.Counter[str] = collections.Counter()

    def nbytes(data: Any) -> int:
        return memoryview(data).nbytes

    real_crc32c = crc32c.crc32c

    def counted_crc32c(data: Any, *args: Any, **kwargs: Any) -> int:
        counts["crc32c"] += nbytes(data)
        return int(real_crc32c(data, *args, **kwargs))

    real_crc32 = botocore.httpchecksum.crc32

    def counted_crc32(data: Any, *args: Any) -> int:
        counts["botocore crc32"] += nbytes(data)
        return int(real_crc32(data, *args))

    real_payload = botocore.auth.SigV4Auth.payload

    def counted_payload(self: Any, request: Any) -> str:
        digest = str(real_payload(self, request))
        if len(digest) == 64 and digest != botocore.auth.EMPTY_SHA256_HASH:  # a SHA-256 of the body
            counts["botocore sha256"] += botocore.utils.determine_content_length(request.body) or 0
        return digest

    crc32c.crc32c = counted_crc32c
    botocore.httpchecksum.crc32 = counted_crc32  # type: ignore[attr-defined]
    botocore.auth.SigV4Auth.payload = counted_payload  # type: ignore[method-assign]
    return counts


def run_case(spec: dict[str, Any]) -> None:
    """Child: one save with the checkout on PYTHONPATH; prints one JSON line."""
    sys.path.insert(0, spec["path"])  # ckpt and benchmarks.s3_bench (the state) of that checkout
    counts = _count_hashes()
    import ckpt
    from benchmarks.s3_bench import make_local_state

    state = make_local_state(spec["size_mib"] * MiB, 0, 1)
    opts = {"key": "bench-key", "secret": "bench-secret", "endpoint_url": spec["endpoint"], "skip_instance_cache": True}
    root = f"s3://{spec['bucket']}/{spec['name']}"
    t0 = time.perf_counter()
    options = ckpt.SaveOptions(parallel_files=1) if spec.get("one_file") else None
    m = ckpt.save(root, state, step=1, storage_options=opts, options=options)
    save_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "tree": spec["tree"], "save_s": save_s, "bytes_saved": sum(f.size for f in m.files.values()),
        "files": len(m.files), "hashed": dict(counts),
    }  # fmt: skip
    if spec.get("verify"):
        out["verify"] = _verifies(root, opts, spec["endpoint"])
    print(json.dumps(out), flush=True)


def _verifies(root: str, opts: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """``ckpt verify --quick`` and ``ckpt verify`` through the counting proxy: their requests."""
    from ckpt.cli import main
    from ckpt.testing.proxy import LatencyProxy

    out: dict[str, Any] = {}
    with LatencyProxy(endpoint) as proxy:
        argv = [a for k, v in {**opts, "endpoint_url": proxy.url}.items() for a in ("--storage-option", f"{k}={json.dumps(v) if isinstance(v, bool) else v}")]
        for name, extra in (("quick", ["--quick"]), ("full", [])):
            proxy.reset()
            buf = io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(buf):
                rc = main([*argv, "verify", root, "--json", *extra])
            seconds = time.perf_counter() - t0
            doc = json.loads(buf.getvalue())["steps"][0]
            out[name] = {
                "rc": rc, "seconds": seconds, "requests": proxy.counts, "bytes_read": doc["bytes_read"],
                "data_gets": sum(1 for s in proxy.seen if s.method == "GET" and "/data/" in s.path),
                "data_heads": sum(1 for s in proxy.seen if s.method == "HEAD" and "/data/" in s.path),
                "size_only": len(doc.get("size_only", [])), "bytes_out": proxy.stats()["bytes_out"],
            }  # fmt: skip
    return out


def _child(tree: str, spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=tree, AWS_EC2_METADATA_DISABLED="true")
    for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_REQUEST_CHECKSUM_CALCULATION"):
        env.pop(k, None)
    cmd = [sys.executable, os.path.join(HERE, "s3_hash_bench.py"), "--_case", json.dumps(spec)]
    done = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"case {spec} failed:\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=250)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", help="another checkout of ckpt to compare with (e.g. main)")
    ap.add_argument("--one-file", action="store_true", help="SaveOptions(parallel_files=1): one file, multipart above 128 MiB")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--_case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._case:
        run_case(json.loads(args._case))
        return
    sys.path.insert(0, REPO)
    from benchmarks.s3_bench import BUCKET, start_endpoint

    trees = {"this": REPO, **({"baseline": os.path.abspath(args.baseline)} if args.baseline else {})}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, start_endpoint("moto", tmp) as endpoint:
        import fsspec

        fs = fsspec.filesystem("s3", key="bench-key", secret="bench-secret", endpoint_url=endpoint, skip_instance_cache=True)
        fs.call_s3("create_bucket", Bucket=BUCKET)
        for run in range(args.runs):
            for label, tree in trees.items():
                spec = {"tree": label, "path": tree, "endpoint": endpoint, "bucket": BUCKET, "size_mib": args.size_mib,
                        "name": f"{label}-{run}-{uuid.uuid4().hex[:8]}", "verify": label == "this" and run == 0, "one_file": args.one_file}  # fmt: skip
                r = _child(tree, spec)
                results.append(r)
                print(f"run {run} {label}: save {r['save_s']:.2f} s, hashed {r['hashed']}", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "s3_hash_bench.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(_report(results))


def _report(results: list[dict[str, Any]]) -> str:
    lines = [
        "| checkout | bytes saved | crc32c (ckpt) | botocore crc32 | botocore sha256 | save s (median) |",
        "|---|---|---|---|---|---|",
    ]
    for label in dict.fromkeys(r["tree"] for r in results):
        rs = [r for r in results if r["tree"] == label]
        saved = rs[0]["bytes_saved"]
        passes = [f"{rs[0]['hashed'].get(h, 0) / saved:.4f}" for h in ("crc32c", "botocore crc32", "botocore sha256")]
        med = statistics.median(r["save_s"] for r in rs)
        lines.append(f"| {label} | {saved / MiB:.1f} MiB | {' | '.join(passes)} | {med:.2f} ({len(rs)} runs) |")
    for r in results:
        for name, v in (r.get("verify") or {}).items():
            lines.append(
                f"\nverify {'--quick' if name == 'quick' else '(full)'}: exit {v['rc']}, {v['seconds']:.2f} s, "
                f"requests {v['requests']}, GETs of data files {v['data_gets']}, HEADs of data files "
                f"{v['data_heads']}, bytes read {v['bytes_read']}, bytes from S3 {v['bytes_out']}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
