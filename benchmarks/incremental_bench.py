"""Incremental saves (issue 18): a LoRA-like fine-tune and a full fine-tune, saved every step.

    .venv/bin/python -m benchmarks.incremental_bench [--steps 20] [--runs 5] [--base-mib 1024] [--no-s3] [--out bench-out]

The state: a frozen base of bf16 matrices (``--base-mib``, default 1 GiB), LoRA adapters (fp32,
16 MiB) and their AdamW state (exp_avg and exp_avg_sq, fp32, 32 MiB), and a step counter.

- **LoRA**: ``--steps`` saves, one per training step; each step changes the adapters and the
  AdamW state, never the base. Each save is ``ckpt.save(..., SaveOptions(incremental=True))``
  (fsync on); reported per save: the bytes it wrote (its own attempt's files), its time, and the
  root's size at the end against base + steps x adapters. The time of a plain (full) save of the
  same state, median of ``--runs`` into fresh roots, is the reference. Every step is then
  restored and compared with the state it saved (untimed).
- **Full fine-tune**: every byte changes each step. Plain and incremental saves alternate,
  ``--runs`` of each (the incremental ones chained on their own root, after a first incremental
  save that has no base and hashes everything, reported apart).
- The same LoRA run on a moto S3 endpoint on 127.0.0.1 (``--s3-steps`` saves), unless ``--no-s3``.

Writes ``<out>/incremental.json`` and prints markdown tables.
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
from typing import Any

import torch

import ckpt
from ckpt.format import layout

MiB = 1 << 20
ADAPTER_MIB = 16


def make_state(base_mib: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    n = max(1, base_mib // 32)  # 32 MiB bf16 matrices
    base = {f"layers.{i}.weight": torch.randn(4096, 4096, generator=g).to(torch.bfloat16) for i in range(n)}
    per = ADAPTER_MIB * MiB // 4 // (2 * n)  # fp32 elements of one adapter matrix
    r = max(1, per // 4096)
    lora = {f"layers.{i}.lora_{ab}": torch.randn(*((4096, r) if ab == "A" else (r, 4096)), generator=g) * 0.01
            for i in range(n) for ab in "AB"}  # fmt: skip
    optim = {k: {"exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v)} for k, v in lora.items()}
    return {"model": {"base": base, "lora": lora}, "optim": {"state": optim, "step": 0}}


def train_step(state: dict[str, Any], step: int, *, full: bool) -> None:
    """Change what a step changes (in place, as an optimizer does)."""
    g = torch.Generator().manual_seed(10_000 + step)
    for k, p in state["model"]["lora"].items():
        grad = torch.randn(p.shape, generator=g)
        st = state["optim"]["state"][k]
        st["exp_avg"].mul_(0.9).add_(grad, alpha=0.1)
        st["exp_avg_sq"].mul_(0.999).addcmul_(grad, grad, value=0.001)
        p.add_(st["exp_avg"], alpha=-1e-3)
    if full:
        for p in state["model"]["base"].values():
            p.add_(1e-2 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(torch.bfloat16))
    state["optim"]["step"] = step


def state_bytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(state))


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def written(m: ckpt.Manifest) -> int:
    own = layout.data_dir(m.step, m.attempt) + "/"
    return sum(f.size for p, f in m.files.items() if p.startswith(own))


def stored(root: str, opts: dict[str, Any] | None) -> int:
    import fsspec

    if opts is None:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    fs = fsspec.filesystem("s3", **opts)
    return sum(int(v["size"]) for v in fs.find(root.removeprefix("s3://"), detail=True).values())


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """What to compare a restore with: the changing parts cloned (the base never changes)."""
    return {"lora": {k: v.clone() for k, v in state["model"]["lora"].items()},
            "optim": {k: {n: t.clone() for n, t in v.items()} for k, v in state["optim"]["state"].items()},
            "step": state["optim"]["step"]}  # fmt: skip


def lora_run(where: str, steps: int, runs: int, base_mib: int, opts: dict[str, Any] | None) -> dict[str, Any]:
    state = make_state(base_mib)
    total = state_bytes(state)
    base_bytes = sum(t.numel() * t.element_size() for t in state["model"]["base"].values())
    adapter_bytes = total - base_bytes
    full_s = []
    for _ in range(runs):  # the reference: plain saves of the same state into fresh roots
        root = f"{where}/full-{uuid.uuid4().hex[:8]}"
        t, _ = _timed(lambda root=root: ckpt.save(root, state, step=0, storage_options=opts))
        full_s.append(t)
        _rm(root, opts)
    root = f"{where}/lora-{uuid.uuid4().hex[:8]}"
    inc = ckpt.SaveOptions(incremental=True)
    rows, snaps = [], {}
    for step in range(steps + 1):
        if step:
            train_step(state, step, full=False)
        t, m = _timed(lambda step=step: ckpt.save(root, state, step=step, options=inc, storage_options=opts))
        rows.append({"step": step, "seconds": t, "written": written(m)})
        snaps[step] = _snapshot(state)
        print(f"{where}: LoRA step {step}: {t:.3f} s, wrote {written(m) / MiB:.1f} MiB", file=sys.stderr, flush=True)
    ok = True
    base = state["model"]["base"]
    for step, snap in snaps.items():  # every step restores exactly (untimed)
        back = ckpt.restore(root, step, storage_options=opts)
        ok &= all(torch.equal(back["model"]["base"][k], v) for k, v in base.items())
        ok &= all(torch.equal(back["model"]["lora"][k], v) for k, v in snap["lora"].items())
        ok &= all(torch.equal(back["optim"]["state"][k][n], t) for k, d in snap["optim"].items() for n, t in d.items())
        ok &= back["optim"]["step"] == snap["step"]
    size = stored(root, opts)
    _rm(root, opts)
    later = rows[1:]
    return {
        "state_bytes": total, "base_bytes": base_bytes, "adapter_bytes": adapter_bytes, "full_save_s": full_s,
        "first_save": rows[0], "saves": later, "root_bytes": size, "restored_exactly": bool(ok),
        "inc_s_median": statistics.median(r["seconds"] for r in later),
        "written_max": max(r["written"] for r in later),
    }  # fmt: skip


def full_run(where: str, runs: int, base_mib: int) -> dict[str, Any]:
    state = make_state(base_mib)
    plain, incr = [], []
    inc_root = f"{where}/ft-inc"
    first, _ = _timed(lambda: ckpt.save(inc_root, state, step=0, options=ckpt.SaveOptions(incremental=True)))
    for run in range(1, runs + 1):
        train_step(state, run, full=True)
        root = f"{where}/ft-plain-{run}"
        t, _ = _timed(lambda root=root, run=run: ckpt.save(root, state, step=run))
        plain.append(t)
        shutil.rmtree(root)
        t, m = _timed(lambda run=run: ckpt.save(inc_root, state, step=run, options=ckpt.SaveOptions(incremental=True)))
        incr.append(t)
        assert written(m) >= 0.99 * state_bytes(state), "a full fine-tune reused bytes"
        ckpt.retire(inc_root, [run - 1])  # keep the disk use flat; the last step stays
        print(f"full fine-tune run {run}: plain {plain[-1]:.3f} s, incremental {incr[-1]:.3f} s", file=sys.stderr, flush=True)
    shutil.rmtree(inc_root)
    return {"plain_s": plain, "incremental_s": incr, "first_incremental_s": first}


def _rm(root: str, opts: dict[str, Any] | None) -> None:
    if opts is None:
        shutil.rmtree(root, ignore_errors=True)
    else:
        import fsspec

        fsspec.filesystem("s3", **opts).rm(root.removeprefix("s3://"), recursive=True)


def report(r: dict[str, Any]) -> str:
    out = []
    med = statistics.median
    for name in ("local", "s3"):
        x = r.get(name)
        if not x:
            continue
        full = med(x["full_save_s"])
        out += [
            f"LoRA-like on {name}: state {x['state_bytes'] / MiB:.0f} MiB (base {x['base_bytes'] / MiB:.0f} MiB bf16, "
            f"adapters + AdamW {x['adapter_bytes'] / MiB:.0f} MiB), {len(x['saves'])} incremental saves",
            "",
            "| | value |",
            "|---|---:|",
            f"| full save (median of {len(x['full_save_s'])}) | {full:.3f} s |",
            f"| first incremental save (no base: writes and hashes all) | {x['first_save']['seconds']:.3f} s |",
            f"| incremental save, median | {x['inc_s_median']:.3f} s ({x['inc_s_median'] / full:.3f}x the full save) |",
            f"| incremental save, slowest | {max(s['seconds'] for s in x['saves']):.3f} s |",
            f"| bytes written per incremental save, most | {x['written_max'] / MiB:.1f} MiB "
            f"({x['written_max'] / x['state_bytes']:.2%} of the state) |",
            f"| root at the end | {x['root_bytes'] / MiB:.0f} MiB "
            f"({x['root_bytes'] / (x['base_bytes'] + (len(x['saves']) + 1) * x['adapter_bytes']):.3f}x base + "
            f"{len(x['saves']) + 1} x adapters) |",
            f"| every step restored exactly | {x['restored_exactly']} |",
            "",
        ]  # fmt: skip
    f = r.get("full")
    if f:
        p, i = med(f["plain_s"]), med(f["incremental_s"])
        out += [
            f"Full fine-tune (every byte changes), {len(f['plain_s'])} saves of each, alternating:",
            "",
            "| | median | runs |",
            "|---|---:|---|",
            f"| plain save | {p:.3f} s | {', '.join(f'{t:.2f}' for t in f['plain_s'])} |",
            f"| incremental save | {i:.3f} s ({i / p:.3f}x) | {', '.join(f'{t:.2f}' for t in f['incremental_s'])} |",
            f"| first incremental save (no base) | {f['first_incremental_s']:.3f} s | |",
            "",
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--s3-steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--base-mib", type=int, default=1024)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--only", default="local,full,s3")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))
    result: dict[str, Any] = {"args": vars(args), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory(prefix="ckpt-inc-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        if "local" in parts:
            result["local"] = lora_run(tmp, args.steps, args.runs, args.base_mib, None)
        if "full" in parts:
            result["full"] = full_run(tmp, args.runs, args.base_mib)
        if "s3" in parts and not args.no_s3:
            from benchmarks.s3_bench import start_endpoint

            with start_endpoint("moto", tmp) as url:
                import fsspec

                opts = {"key": "bench-key", "secret": "bench-secret", "endpoint_url": url, "skip_instance_cache": True}
                fsspec.filesystem("s3", **opts).call_s3("create_bucket", Bucket="ckpt-inc-bench")
                result["s3"] = lora_run("s3://ckpt-inc-bench", args.s3_steps, min(args.runs, 3), args.base_mib, opts)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "incremental.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(report(result))


if __name__ == "__main__":
    main()
