"""Local-disk benchmark: ckpt vs torch.save, safetensors, DCP and the raw disk limits, same run.

    python -m benchmarks.local_bench [--sizes 64 256 1024] [--runs 5] [--out bench-out]
                                     [--quick] [--big] [--reshard-mib 1024] [--no-reshard]
    python -m benchmarks.local_bench --profile 256     # cProfile of ckpt.save / ckpt.restore

Every case runs in its own fresh subprocess on the same deterministic state (193 tensors: 77
2-D bf16/fp32 weights and 116 1-D fp32 vectors, a 19-layer transformer scaled to the size), so
``ru_maxrss`` is that case's peak. Per run, the methods are interleaved (the order rotates from
run to run), each method saves to a fresh directory, its restores read that directory, and it is
deleted before the next method. Restores are timed cold (the files evicted from the page cache
with ``posix_fadvise(DONTNEED)`` first) and then warm (again, in the same process). Saves fsync.

Cases (method: save / restore):
- raw: the state's bytes, tensor after tensor, written sequentially to one file (at most 64 MiB
  per call) + fsync / ``readinto`` preallocated tensors; raw-par: the same, cut in N files
  written / read by N threads (N = cores, 2 to 8); memcpy: ``copy_`` of every tensor into a
  preallocated one;
- ckpt: ``ckpt.save`` / ``ckpt.restore(target=...)`` into preallocated tensors (in place), and
  ``ckpt.restore`` into fresh tensors (ckpt-fresh);
- torch: ``torch.save`` + fsync / ``torch.load(weights_only=True, mmap=False)``;
- safetensors: ``save_file`` + fsync / ``load_file``; runai: runai-model-streamer's
  ``SafetensorsStreamer`` (C++ reader threads, read only) on the file safetensors wrote;
- dcp: ``dcp.save(FileSystemWriter(sync_files=True), no_dist=True)`` / ``dcp.load`` into
  preallocated tensors.
Resharding: 4 writers save row shards (``ckpt.begin``/``write_shards``/``commit``, one process);
3 readers restore their row ranges (``ckpt.Shard`` targets), timed one after the other (files
evicted before each) and summed, vs 4 readers asking for exactly the saved shards.

Raw JSON: ``<out>/local_bench.json``; tables: ``python -m benchmarks.report``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

MiB = 1 << 20
N_LAYERS = 19  # 19 x (4 2-D + 6 1-D) + embedding + final norm (2) = 77 2-D + 116 1-D = 193 tensors
SAVE_METHODS = ("raw", "raw-par", "ckpt", "torch", "safetensors", "dcp")
RESTORE_CASES = {  # save method -> restore cases reading what it wrote
    "raw": ("raw",),
    "raw-par": ("raw-par",),
    "ckpt": ("ckpt", "ckpt-fresh"),
    "torch": ("torch",),
    "safetensors": ("safetensors", "runai"),
    "dcp": ("dcp",),
}
RAW_STREAMS = min(8, max(2, os.cpu_count() or 2))  # raw-par: files written/read concurrently
RAW_CHUNK = 64 * MiB  # bytes per write()/readinto() call of the raw cases
CASE_TIMEOUT_S = 900
RESULT_TAG = "RESULT "


# --- the state ---------------------------------------------------------------------------------


def state_specs(size_bytes: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype name) of the benchmark state: 193 tensors of about ``size_bytes``."""
    layer_units = sum(12 * (2 if i % 2 else 4) for i in range(N_LAYERS))  # bytes per d**2
    d = max(64, int(math.sqrt(0.85 * size_bytes / layer_units)) // 64 * 64)
    out: list[tuple[str, tuple[int, ...], str]] = []
    for i in range(N_LAYERS):
        wd = "bfloat16" if i % 2 else "float32"
        p = f"model.layers.{i}."
        out += [
            (p + "attn.qkv.weight", (3 * d, d), wd),
            (p + "attn.proj.weight", (d, d), wd),
            (p + "attn.proj.bias", (d,), "float32"),
            (p + "mlp.fc1.weight", (4 * d, d), wd),
            (p + "mlp.fc2.weight", (d, 4 * d), wd),
            (p + "mlp.fc2.bias", (d,), "float32"),
            (p + "ln1.weight", (d,), "float32"),
            (p + "ln1.bias", (d,), "float32"),
            (p + "ln2.weight", (d,), "float32"),
            (p + "ln2.bias", (d,), "float32"),
        ]
    out += [("model.norm.weight", (d,), "float32"), ("model.norm.bias", (d,), "float32")]
    used = sum(_nbytes(s, dt) for _, s, dt in out)
    vocab = max(1, (size_bytes - used) // (d * 4))
    return [("model.embed.weight", (vocab, d), "float32"), *out]


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2}[dtype]


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * _itemsize(dtype)


def state_bytes(size_bytes: int) -> int:
    return sum(_nbytes(s, dt) for _, s, dt in state_specs(size_bytes))


_PATTERNS: dict[Any, Any] = {}  # dtype -> a seeded N(0, 0.02) block, twice over (rotations are slices)
_PERIOD = 1 << 20


def _fill(t: Any, i: int) -> None:
    """Deterministic contents of tensor ``i``: the seeded block rotated by ``i`` and tiled.

    No allocation: a temporary per tensor would leave the heap larger than the state, and
    inflate every RSS figure after it."""
    import torch

    if t.dtype not in _PATTERNS:
        base = torch.randn(_PERIOD, generator=torch.Generator().manual_seed(0)) * 0.02
        _PATTERNS[t.dtype] = torch.cat([base, base]).to(t.dtype)
    off = i * 7919 % _PERIOD
    p = _PATTERNS[t.dtype][off : off + _PERIOD]
    flat, n = t.view(-1), t.numel()
    full = n // _PERIOD
    if full:
        flat[: full * _PERIOD].view(full, _PERIOD).copy_(p.expand(full, _PERIOD))
    if n - full * _PERIOD:
        flat[full * _PERIOD :].copy_(p[: n - full * _PERIOD])


def make_state(specs: list[tuple[str, tuple[int, ...], str]], *, fill: bool) -> dict[str, Any]:
    """The state as separate tensors: filled, or zeros (a touched, preallocated target)."""
    import torch

    out = {}
    for i, (key, shape, dtype) in enumerate(specs):
        t = torch.empty(shape, dtype=getattr(torch, dtype))
        if fill:
            _fill(t, i)
        else:
            t.zero_()
        out[key] = t
    return out


def byte_views(state: dict[str, Any]) -> list[memoryview]:
    """The bytes of every tensor of ``state``, in order (zero-copy)."""
    import torch

    return [memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B") for t in state.values()]


def _check(got: dict[str, Any], specs: list[tuple[str, tuple[int, ...], str]]) -> None:
    """The restore returned the saved values (a sample of tensors, compared bit for bit)."""
    import torch

    assert len(got) == len(specs), f"restored {len(got)} tensors, saved {len(specs)}"
    for i in (1, 3, 11, len(specs) - 1):  # fp32 and bf16 weights, a bias, the last vector
        key, shape, dtype = specs[i]
        want = torch.empty(shape, dtype=getattr(torch, dtype))
        _fill(want, i)
        t = got[key]
        assert tuple(t.shape) == shape, f"{key}: wrong shape"
        assert t.dtype == want.dtype, f"{key}: wrong dtype"
        assert torch.equal(t.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), f"{key}: wrong values"


# --- measurement helpers -------------------------------------------------------------------------


def maxrss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Reset the peak-RSS high-water mark that ``ru_maxrss`` reports (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def evict(path: str) -> None:
    """Drop ``path`` (a file or every file under a directory) from the page cache."""
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages cannot be dropped; every method fsynced already
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_stream(path: str, views: list[memoryview]) -> None:
    """Create ``path`` holding ``views`` back to back, written sequentially, then fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for view in views:
            while view:
                n = os.write(fd, view[:RAW_CHUNK])
                view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_stream(path: str, views: list[memoryview]) -> None:
    """Fill ``views`` from ``path``'s bytes, in order, reading sequentially."""
    with open(path, "rb", buffering=0) as f:
        for view in views:
            got = 0
            while got < len(view):
                n = f.readinto(view[got : got + RAW_CHUNK])
                assert n, f"{path}: short read"
                got += n


def _groups(views: list[memoryview], n: int) -> list[list[memoryview]]:
    """``views`` cut into ``n`` consecutive groups of about equal bytes."""
    total, pos = sum(len(v) for v in views), 0
    out: list[list[memoryview]] = [[] for _ in range(n)]
    for v in views:
        out[min(n - 1, pos * n // max(total, 1))].append(v)
        pos += len(v)
    return out


def _in_threads(fn: Any, args: list[tuple[Any, ...]]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(args)) as pool:
        for f in [pool.submit(fn, *a) for a in args]:
            f.result()


# --- cases (run in the child) -----------------------------------------------------------------------


def _save(method: str, state: Any, path: str) -> None:
    import torch

    if method == "raw":
        _write_stream(path, byte_views(state))
    elif method == "raw-par":  # the same bytes cut in RAW_STREAMS files, one thread each
        os.makedirs(path)
        groups = _groups(byte_views(state), RAW_STREAMS)
        _in_threads(_write_stream, [(os.path.join(path, f"{i}.bin"), g) for i, g in enumerate(groups)])
    elif method == "ckpt":
        import ckpt

        ckpt.save(path, state, step=1)
    elif method == "torch":
        torch.save(state, path)
        _fsync_path(path)
    elif method == "safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
        _fsync_path(path)
    elif method == "dcp":
        import torch.distributed.checkpoint as dcp

        dcp.save(state, storage_writer=dcp.FileSystemWriter(path, sync_files=True), no_dist=True)
    else:
        raise ValueError(method)


def _restore(method: str, path: str, target: Any) -> Any:
    import torch

    if method == "raw":
        _read_stream(path, byte_views(target))
        return target
    if method == "raw-par":
        groups = _groups(byte_views(target), RAW_STREAMS)
        _in_threads(_read_stream, [(os.path.join(path, f"{i}.bin"), g) for i, g in enumerate(groups)])
        return target
    if method == "ckpt":
        import ckpt

        return ckpt.restore(path, target=target)
    if method == "ckpt-fresh":
        import ckpt

        return ckpt.restore(path)
    if method == "torch":
        return torch.load(path, weights_only=True, mmap=False)
    if method == "safetensors":
        from safetensors.torch import load_file

        got = load_file(path)
        for t in got.values():  # load_file maps the file lazily: touch every page, so it is read
            t.reshape(-1).view(torch.uint8)[::4096].sum()
        return got
    if method == "runai":  # runai-model-streamer (C++ reader threads) on the safetensors file
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as streamer:
            streamer.stream_file(path)  # owned=True: every tensor is its own copy, kept after exit
            return dict(streamer.get_tensors())
    if method == "dcp":
        import torch.distributed.checkpoint as dcp

        dcp.load(target, storage_reader=dcp.FileSystemReader(path), no_dist=True)
        return target
    raise ValueError(method)


def _import_for(method: str) -> dict[str, float]:
    """Import what a case needs before the baseline RSS is taken and the clock starts."""
    import torch

    if method.startswith("ckpt") or method.startswith("reshard"):
        t0 = time.perf_counter()
        import ckpt  # noqa: F401

        return {"first_call_import_s": time.perf_counter() - t0}  # ckpt imports no torch.distributed
    elif method == "safetensors":
        import safetensors.torch  # noqa: F401
    elif method == "dcp":
        import torch.distributed.checkpoint  # noqa: F401
    elif method == "runai":
        import runai_model_streamer  # noqa: F401
    return {}


FRESH = frozenset({"ckpt-fresh", "torch", "safetensors", "runai"})  # restores that allocate their result


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One case in this (fresh) process: times (s) and memory (bytes) per phase."""
    warnings.filterwarnings("ignore")
    method, phase, path = spec["method"], spec["phase"], spec["path"]
    info = _import_for(method)
    specs = state_specs(spec["size_bytes"])
    nbytes = sum(_nbytes(s, dt) for _, s, dt in specs)
    meter = Meter(nbytes)
    if method.startswith("reshard"):
        _reshard_child(spec, specs, meter)
    elif phase == "save":
        state = make_state(specs, fill=True)
        with meter.phase("save"):
            _save(method, state, path)
    elif phase == "copy":
        src = make_state(specs, fill=True)
        dst = make_state(specs, fill=False)
        with meter.phase("copy"):
            for d, s in zip(dst.values(), src.values(), strict=True):
                d.copy_(s)
        _check(dst, specs)
    else:  # restore
        target = None
        if method in ("raw", "raw-par", "ckpt", "dcp"):
            target = make_state(specs, fill=False)
        for temp in ("cold", "warm"):
            if temp == "cold":
                evict(path)
            gc.collect()
            with meter.phase(f"restore_{temp}", allocates=method in FRESH):
                got = _restore(method, path, target)
            if temp == "cold":
                _check(got, specs)
            del got
    return {**meter.result(), **info}


class Meter:
    """Times phases and their memory: the peak RSS during a phase (the kernel's high-water mark
    is reset just before it, via /proc/self/clear_refs) and the extra RSS, that peak minus the
    RSS just before the phase minus the state size where the phase allocates its result."""

    def __init__(self, state_bytes: int) -> None:
        self.state_bytes = state_bytes
        self.times: dict[str, float] = {}
        self.peak: dict[str, int] = {}
        self.extra: dict[str, int] = {}
        self.base_rss = rss_now()  # after the imports, before any state exists
        self.hwm_reset = True
        self.extras: dict[str, Any] = {}

    @contextlib.contextmanager
    def phase(self, name: str, *, allocates: bool = False) -> Iterator[None]:
        self.hwm_reset = reset_peak() and self.hwm_reset
        # without a reset the peak is the whole process's: count from the bare interpreter
        before = rss_now() if self.hwm_reset else self.base_rss + self.state_bytes
        t0 = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - t0
        self.peak[name] = maxrss()
        self.extra[name] = self.peak[name] - before - (self.state_bytes if allocates else 0)

    def result(self) -> dict[str, Any]:
        return {"times": self.times, "peak_rss": self.peak, "extra_rss": self.extra, "base_rss": self.base_rss,
                "state_bytes": self.state_bytes, "hwm_reset": self.hwm_reset, **self.extras}  # fmt: skip


# --- resharding -------------------------------------------------------------------------------------


def _rows(n: int, parts: int, r: int) -> tuple[int, int]:
    return n * r // parts, n * (r + 1) // parts


def _shard_state(state: dict[str, Any], parts: int, r: int) -> dict[str, Any]:
    import ckpt

    out = {}
    for key, t in state.items():
        lo, hi = _rows(t.shape[0], parts, r)
        out[key] = ckpt.Shard(t[lo:hi], tuple(t.shape), (lo,) + (0,) * (t.ndim - 1))
    return out


def _reshard_child(spec: dict[str, Any], specs: list[tuple[str, tuple[int, ...], str]], meter: Meter) -> None:
    import torch

    import ckpt
    from ckpt.engine.restore_plan import Request, plan_restore
    from ckpt.geometry.boxes import Box

    path, writers = spec["path"], spec["writers"]
    if spec["phase"] == "save":
        state = make_state(specs, fill=True)
        with meter.phase("save"):
            attempt = ckpt.begin(path, step=1, world_size=writers)
            reports = [ckpt.write_shards(attempt, _shard_state(state, writers, r), rank=r) for r in range(writers)]
            ckpt.commit(attempt, reports)
        return
    readers = spec["readers"]
    targets = []
    for r in range(readers):  # every reader's buffers exist (touched) before any is timed
        target = {}
        for key, shape, dtype in specs:
            lo, hi = _rows(shape[0], readers, r)
            buf = torch.zeros((hi - lo, *shape[1:]), dtype=getattr(torch, dtype))
            target[key] = ckpt.Shard(buf, shape, (lo,) + (0,) * (len(shape) - 1))
        targets.append(target)
    per_reader = []
    with meter.phase("restore_cold"):
        for target in targets:
            evict(path)  # each reader starts cold, as it would on its own machine (not timed)
            gc.collect()
            t0 = time.perf_counter()
            ckpt.restore(path, target=target)
            per_reader.append(time.perf_counter() - t0)
    meter.times["restore_cold"] = sum(per_reader)
    m = ckpt.read_manifest(path)
    opts = ckpt.RestoreOptions()
    read_bytes = 0
    for target in targets:
        reqs = [Request(k, Box(s.offsets, s.sizes)) for k, s in target.items()]
        plan = plan_restore(m, reqs, verify=opts.verify, max_gap_bytes=opts.gap_bytes(local=True), read_chunk_bytes=opts.chunk_bytes(local=True))
        read_bytes += plan.total_bytes
    for i in (0, len(specs) - 1):  # stitched back together, the readers hold the saved values
        key, shape, dtype = specs[i]
        want = torch.empty(shape, dtype=getattr(torch, dtype))
        _fill(want, i)
        got = torch.cat([t[key].tensor for t in targets])
        assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)), f"{key}: wrong values"
    meter.extras.update(per_reader_s=per_reader, read_bytes=read_bytes)


# --- driver (parent) ------------------------------------------------------------------------------


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one case in a fresh interpreter and return its result."""
    cmd = [sys.executable, "-m", "benchmarks.local_bench", "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CASE_TIMEOUT_S, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return dict(json.loads(line[len(RESULT_TAG) :]))
    raise RuntimeError(f"case {spec} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


class Recorder:
    """Collects per-run results into one record per (method, phase, size)."""

    def __init__(self) -> None:
        self.cases: dict[tuple[str, str, int], dict[str, Any]] = {}

    def add(self, method: str, size: int, res: dict[str, Any]) -> None:
        for phase, t in res["times"].items():
            rec = self.cases.setdefault(
                (method, phase, size),
                {"method": method, "phase": phase, "size_bytes": res["state_bytes"], "requested_bytes": size,
                 "times_s": [], "peak_rss_bytes": [], "extra_rss_bytes": []},
            )  # fmt: skip
            rec["times_s"].append(t)
            rec["peak_rss_bytes"].append(res["peak_rss"][phase])
            rec["extra_rss_bytes"].append(res["extra_rss"][phase])
            for k in ("per_reader_s", "read_bytes", "first_call_import_s", "hwm_reset"):
                if k in res:
                    rec.setdefault(k, []).append(res[k])


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_sizes(sizes_mib: list[int], runs: int, workdir: str, rec: Recorder) -> None:
    for size_mib in sizes_mib:
        size = size_mib * MiB
        for run in range(runs):
            order = SAVE_METHODS[run % len(SAVE_METHODS) :] + SAVE_METHODS[: run % len(SAVE_METHODS)]
            for method in order:  # interleaved, rotating: drift and order effects hit all alike
                d = tempfile.mkdtemp(prefix=f"{method}-", dir=workdir)
                path = os.path.join(d, "data")
                try:
                    res = run_case({"method": method, "phase": "save", "size_bytes": size, "path": path})
                    rec.add(method, size, res)
                    line = f"{size_mib} MiB run {run} {method}: save {res['times']['save']:.3f} s"
                    for rmethod in RESTORE_CASES[method]:
                        res = run_case({"method": rmethod, "phase": "restore", "size_bytes": size, "path": path})
                        rec.add(rmethod, size, res)
                        line += f", {rmethod} restore cold {res['times']['restore_cold']:.3f} s warm {res['times']['restore_warm']:.3f} s"
                    if method == "raw":
                        res = run_case({"method": "memcpy", "phase": "copy", "size_bytes": size, "path": path})
                        rec.add("memcpy", size, res)
                        line += f", memcpy {res['times']['copy']:.3f} s"
                    _log(line)
                finally:
                    shutil.rmtree(d, ignore_errors=True)


def bench_reshard(size_mib: int, runs: int, workdir: str, rec: Recorder, writers: int = 4, readers: int = 3) -> None:
    size = size_mib * MiB
    d = tempfile.mkdtemp(prefix="reshard-", dir=workdir)
    path = os.path.join(d, "root")
    try:
        res = run_case({"method": "reshard", "phase": "save", "size_bytes": size, "path": path, "writers": writers})
        rec.add(f"reshard-save-{writers}", size, res)
        _log(f"reshard {size_mib} MiB: {writers}-writer save {res['times']['save']:.3f} s")
        for run in range(runs):
            pairs = [(readers, "reshard"), (writers, "same")]
            for n, kind in pairs if run % 2 == 0 else pairs[::-1]:
                spec = {"method": "reshard", "phase": "restore", "size_bytes": size, "path": path, "writers": writers, "readers": n}
                res = run_case(spec)
                rec.add(f"reshard-{kind}-{writers}to{n}", size, res)
                _log(f"reshard {size_mib} MiB run {run}: {writers}->{n} readers {res['times']['restore_cold']:.3f} s "
                     f"({', '.join(f'{t:.3f}' for t in res['per_reader_s'])})")  # fmt: skip
    finally:
        shutil.rmtree(d, ignore_errors=True)


def profile(size_mib: int, top: int = 10) -> str:
    """cProfile of one ckpt.save and cold in-place ckpt.restore of the benchmark state, top
    functions by cumulative time. cProfile sees only the calling thread, so the restore is also
    profiled with ``num_threads=1``, which runs the reads and checksums in that thread."""
    import cProfile
    import io
    import pstats

    import torch.distributed.tensor  # noqa: F401  (ckpt's one-time import, see _import_for)

    import ckpt

    specs = state_specs(size_mib * MiB)
    out = io.StringIO()
    d = tempfile.mkdtemp(prefix="profile-")
    try:
        root = os.path.join(d, "root")
        state = make_state(specs, fill=True)
        for what, threads in (("save", 8), ("restore", 8), ("restore", 1)):
            if what == "restore":
                state = make_state(specs, fill=False)
                evict(root)
                gc.collect()
            pr = cProfile.Profile()
            t0 = time.perf_counter()
            pr.enable()
            if what == "save":
                ckpt.save(root, state, step=1)
            else:
                ckpt.restore(root, target=state, options=ckpt.RestoreOptions(num_threads=threads))
            pr.disable()
            took = time.perf_counter() - t0
            out.write(f"== ckpt.{what} of {size_mib} MiB, num_threads={threads}: {took:.3f} s (under cProfile)\n")
            pstats.Stats(pr, stream=out).sort_stats("cumulative").print_stats(top)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return out.getvalue()


def default_sizes(quick: bool, big: bool) -> list[int]:
    if quick:
        return [32]
    return [64, 256, 1024] + ([4096] if big else [])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", help="state sizes in MiB (default 64 256 1024; --big adds 4096)")
    ap.add_argument("--runs", type=int, help="runs per case (default 5; --quick: 2)")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--quick", action="store_true", help="one small size (32 MiB), 2 runs")
    ap.add_argument("--big", action="store_true", help="add 4 GiB")
    ap.add_argument("--reshard-mib", type=int, help="size of the resharding case (default 1024; --quick: 32)")
    ap.add_argument("--no-reshard", action="store_true")
    ap.add_argument("--workdir", help="where the checkpoints go (default: a temporary directory)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--profile", type=int, metavar="MIB", help="print a cProfile of ckpt.save/restore and exit")
    args = ap.parse_args(argv)
    if args.child:
        print(RESULT_TAG + json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    if args.profile:
        print(profile(args.profile))
        return
    sizes = args.sizes or default_sizes(args.quick, args.big)
    runs = args.runs or (2 if args.quick else 5)
    reshard_mib = args.reshard_mib or (32 if args.quick else 1024)
    os.makedirs(args.out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="ckpt-local-bench-", dir=args.workdir)
    rec = Recorder()
    t0 = time.time()
    try:
        bench_sizes(sizes, runs, workdir, rec)
        if not args.no_reshard:
            bench_reshard(reshard_mib, runs, workdir, rec)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "args": {"sizes_mib": sizes, "runs": runs, "reshard_mib": None if args.no_reshard else reshard_mib},
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.local_bench", *(argv or sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
        "wall_s": time.time() - t0,
        "tensors": len(state_specs(MiB)),
        "raw_streams": RAW_STREAMS,
        "cases": list(rec.cases.values()),
    }
    with open(os.path.join(args.out, "local_bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    from benchmarks import report

    print(report.local_markdown(result))


if __name__ == "__main__":
    main()
