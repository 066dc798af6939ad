"""Many-tensor benchmark: states of tens of thousands of small tensors (per-parameter optimizer
states, adapters, MoE experts), ckpt vs torch.save/torch.load, safetensors and DCP, same run.

    python -m benchmarks.keys_bench [--cases 20000 100000] [--runs 5] [--ls-steps 100] [--out bench-out] [--quick]

Cases (deterministic, seed 0): ``20000`` tensors of 1-30 KiB fp32 (about 300 MiB) and ``100000``
tensors of 0.25-4 KiB (about 200 MiB), laid out as a model and an Adam-like optimizer state
(``{"model": {...}, "optim": {"state": {i: {"m1", "m2", "m3"}}, "param_groups": [...]}}`` plus a
step counter and metadata), so the plain data nests as it does in real states.

Per run, the methods are interleaved (the order rotates), each saving to a fresh directory;
restores are timed cold (files evicted with ``posix_fadvise(DONTNEED)``), then the directory is
deleted. Methods, save / restore:
- ckpt: ``ckpt.save`` (fsync) / ``ckpt.restore`` into fresh tensors;
- torch: ``torch.save`` + fsync / ``torch.load`` (its default, ``weights_only=True``), and
  ``torch-unsafe``: ``torch.load(weights_only=False)`` (the pickle path, faster, not safe);
- safetensors: ``save_file`` of the flat tensors + fsync / ``load_file`` (tensors only: the plain
  data is not saved, so it does less than the others);
- dcp: ``dcp.save(FileSystemWriter(sync_files=True), no_dist=True)`` / ``dcp.load`` into
  preallocated tensors (DCP restores in place only).

Also, on the 20k case: ``ckpt.restore`` of 10 keys (a target naming them), ``ckpt ls`` of a root of
``--ls-steps`` steps of that many keys (tiny tensors: the manifests are as large, the data is
not), ``ckpt --help`` and ``ckpt ls`` of an empty root (subprocesses, start-up included).

Raw JSON: ``<out>/keys_bench.json``; table: ``<out>/keys_bench.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

import ckpt

CASES = {20000: (1 << 10, 30 << 10), 100000: (1 << 8, 4 << 10)}  # tensors -> byte range per tensor


def make_state(n: int, lo: int, hi: int, *, seed: int = 0) -> dict[str, Any]:
    """``n`` fp32 tensors of ``lo``..``hi`` bytes: a quarter model weights, the rest Adam-like
    per-parameter states, plus plain data."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lo, hi, (n,), generator=g).tolist()
    model: dict[str, torch.Tensor] = {}
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for i, nbytes in enumerate(sizes):
        t = torch.randn(max(1, nbytes // 4), generator=g)
        if i % 4 == 0:
            model[f"layers.{i // 4}.weight"] = t
        else:
            per_param.setdefault(i // 4, {})[f"m{i % 4}"] = t
    groups = [{"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.01, "params": sorted(per_param)}]
    return {"model": model, "optim": {"state": per_param, "param_groups": groups}, "step": 7,
            "meta": {"run": "keys_bench", "tags": ["a", "b"]}}  # fmt: skip


def flat_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in state["model"].items()}
    for i, d in state["optim"]["state"].items():
        out.update({f"optim.{i}.{k}": v for k, v in d.items()})
    return out


def nbytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in flat_tensors(state).values())


def evict(root: str) -> None:
    """Drop ``root``'s files from the page cache (cold reads)."""
    for d, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(d, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def _fsynced(path: str, write: Callable[[str], None]) -> None:
    write(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _dcp_like(state: dict[str, Any]) -> dict[str, Any]:
    """The state with fresh tensors of the same shapes (DCP loads in place)."""
    return torch.utils._pytree.tree_map(lambda x: torch.empty_like(x) if isinstance(x, torch.Tensor) else x, state)


def run_method(method: str, state: dict[str, Any], d: str) -> dict[str, float]:
    """Save ``state`` with ``method`` under ``d`` and restore it cold; the two times."""
    import safetensors.torch as st
    import torch.distributed.checkpoint as dcp

    os.makedirs(d, exist_ok=True)
    f = os.path.join(d, "state.bin")
    if method == "ckpt":
        save_s, _ = _timed(lambda: ckpt.save(d, state, step=1))
        evict(d)
        load_s, out = _timed(lambda: ckpt.restore(d, step=1))
    elif method in ("torch", "torch-unsafe"):
        save_s, _ = _timed(lambda: _fsynced(f, lambda p: torch.save(state, p)))
        evict(d)
        load_s, out = _timed(lambda: torch.load(f, weights_only=method == "torch"))
    elif method == "safetensors":
        flat = flat_tensors(state)
        save_s, _ = _timed(lambda: _fsynced(f, lambda p: st.save_file(flat, p)))
        evict(d)
        load_s, out = _timed(lambda: st.load_file(f))
    elif method == "dcp":
        save_s, _ = _timed(lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(d, sync_files=True), no_dist=True))
        evict(d)
        dest = _dcp_like(state)
        load_s, _ = _timed(lambda: dcp.load(dest, storage_reader=dcp.FileSystemReader(d), no_dist=True))
        out = dest
    else:
        raise ValueError(method)
    del out
    return {"save_s": save_s, "restore_s": load_s}


def _cli(args: list[str], cwd: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ckpt", *args], capture_output=True, cwd=cwd)
    elapsed = time.perf_counter() - t0
    if proc.returncode not in (0, 3):  # 3: no checkpoint (an empty root)
        raise RuntimeError(f"ckpt {' '.join(args)} failed: {proc.stderr.decode()[-400:]}")
    return elapsed


def extras(state: dict[str, Any], base: str, runs: int, ls_steps: int) -> dict[str, list[float]]:
    """Restoring 10 keys, ``ckpt ls`` of many steps, start-up of ``--help`` and of an empty ``ls``."""
    out: dict[str, list[float]] = {"restore_10_keys_s": [], "ls_steps_s": [], "help_s": [], "ls_empty_s": []}
    d = os.path.join(base, "ten")
    ckpt.save(d, state, step=1)
    names = list(state["model"])[:10]
    for _ in range(runs):
        target = {"model": dict.fromkeys(names)}
        t, got = _timed(lambda target=target: ckpt.restore(d, step=1, target=target))
        assert sorted(got["model"]) == sorted(names)
        out["restore_10_keys_s"].append(t)
    shutil.rmtree(d)
    many = os.path.join(base, "many")
    tiny = torch.utils._pytree.tree_map(lambda x: x[:1].clone() if isinstance(x, torch.Tensor) else x, state)
    for s in range(ls_steps):
        ckpt.save(many, tiny, step=s, options=ckpt.SaveOptions(fsync=False))
    empty = os.path.join(base, "empty")
    os.makedirs(empty)
    for _ in range(runs):
        out["ls_steps_s"].append(_cli(["ls", many], base))
        out["help_s"].append(_cli(["--help"], base))
        out["ls_empty_s"].append(_cli(["ls", empty], base))
    shutil.rmtree(many)
    return out


METHODS = ("ckpt", "torch", "torch-unsafe", "safetensors", "dcp")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, nargs="+", default=sorted(CASES), choices=sorted(CASES))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ls-steps", type=int, default=100)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--quick", action="store_true", help="2 runs, the 20k case, 10 steps to list")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.cases, args.ls_steps = 2, [20000], 10
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    result: dict[str, Any] = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M"), "cases": {}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("CKPT_BENCH_TMP")) as base:
        for n in args.cases:
            state = make_state(n, *CASES[n])
            rec: dict[str, Any] = {"tensors": n, "bytes": nbytes(state), "methods": {m: [] for m in args.methods}}
            methods = list(args.methods)
            for r in range(args.runs):
                for m in methods[r % len(methods):] + methods[: r % len(methods)]:
                    d = os.path.join(base, f"{m}-{r}")
                    rec["methods"][m].append(run_method(m, state, d))
                    shutil.rmtree(d)
                    print(f"{n} run {r} {m}: {rec['methods'][m][-1]}", flush=True)
            if n == 20000:
                rec["extras"] = extras(state, base, args.runs, args.ls_steps)
                print(f"{n} extras: {rec['extras']}", flush=True)
            result["cases"][str(n)] = rec
            del state
    with open(os.path.join(args.out, "keys_bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = report(result)
    with open(os.path.join(args.out, "keys_bench.md"), "w") as f:
        f.write(md)
    print(md)


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def report(result: dict[str, Any]) -> str:
    """Markdown tables: medians, and each method's time over ckpt's (above 1: ckpt is faster)."""
    lines: list[str] = [f"Command: `python -m benchmarks.keys_bench {' '.join(result['argv'])}` ({result['date']})", ""]
    for n, rec in result["cases"].items():
        mib = rec["bytes"] / 2**20
        lines += [f"**{int(n):,} tensors, {mib:.0f} MiB** (medians of {len(next(iter(rec['methods'].values())))} runs)", "",
                  "| method | save s | restore s (cold) | save: ckpt / this | restore: ckpt / this |",
                  "|---|---|---|---|---|"]  # fmt: skip
        base = rec["methods"].get("ckpt")
        for m, runs in rec["methods"].items():
            s, r = _med([x["save_s"] for x in runs]), _med([x["restore_s"] for x in runs])
            if base:
                cs, cr = _med([x["save_s"] for x in base]), _med([x["restore_s"] for x in base])
                lines.append(f"| {m} | {s:.2f} | {r:.2f} | {cs / s:.2f}x | {cr / r:.2f}x |")
            else:
                lines.append(f"| {m} | {s:.2f} | {r:.2f} | | |")
        lines.append("")
        ex = rec.get("extras")
        if ex:
            lines += ["| operation | median s |", "|---|---|"]
            lines += [f"| {k.removesuffix('_s').replace('_', ' ')} | {_med(v):.3f} |" for k, v in ex.items()]
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
