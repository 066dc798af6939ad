"""Training interference: how much a background save slows the training steps that run beside it.

    python -m benchmarks.interference_bench [--out bench-out] [--runs 5] [--size-mib 1024]
                                            [--methods ckpt dcp-thread dcp-process torch-thread]
                                            [--threads 1] [--load 0] [--quick]

The stall benchmark measures how long ``save()`` blocks; this one measures what happens after it
returns. A background save shares the CPU (2 cores here) and the GIL with the training thread:
its copies, checksums and writes run on the cores training wants, and any stretch of Python it
runs holds the GIL that every torch call of the training loop must take back after its kernel.

The training step is fixed: an MLP (``LAYERS`` Linear layers of ``WIDTH`` features, ReLU
between them), batch ``BATCH``, MSE loss, forward + backward + ``torch.optim.SGD(momentum=0.9)``
step, all on the CPU with ``torch.set_num_threads(--threads)`` (default 1: one core trains,
the other is left to the save, as a GPU job leaves the host cores to its input and checkpoint
threads). The saved state is separate from the model: ``N_TENSORS`` fp32 tensors of
``--size-mib / N_TENSORS`` MiB each (default 1 GiB: 16 x 64 MiB), filled once.

Each (method, run) is a fresh process that:

1. warms up (``WARMUP`` steps) and makes one untimed save of the state (staging buffers, DCP's
   checkpoint process and the like are set up there: the timed save is a steady one);
2. times ``ALONE`` training steps with nothing else running;
3. starts the timed background save (the time the call blocks is the *stall*), then runs
   training steps until the save is complete (polled between steps, so the save's wall time is
   known to within one step), timing each;
4. times ``ALONE`` more steps alone (the baseline is the median of both alone sets);
5. ckpt only: one synchronous save of the same state (``ManagerOptions(async_save=False)``, a
   second manager on its own root) for the stall <= 10% of a sync save check.

Methods (the checkpoint directory is on the local disk under the temp dir, removed after each
case; every save fsyncs):

- ``ckpt``: ``ckpt.CheckpointManager(root).save(step, state)`` (async, the default options);
  done when ``committed_step`` is the step;
- ``dcp-thread``: ``dcp.async_save(state, storage_writer=FileSystemWriter(dir, sync_files=True),
  async_checkpointer_type=AsyncCheckpointerType.THREAD)`` (its default stager: a synchronous
  copy into fresh CPU memory), one gloo process group of one rank; done when the future is;
- ``dcp-process``: the same with ``AsyncCheckpointerType.PROCESS`` (a spawned checkpoint process
  that DCP keeps for the later saves);
- ``torch-thread``: a reference: the state cloned in the calling thread, then ``torch.save`` of
  the clone + fsync on a plain ``threading.Thread``.

Reported per method (medians over runs; each run's values are per process): the mean and median
step time during the save; *ratio (mean)* = mean step during the save / alone (the alone median):
the slowdown (the steps during a save are not alike: a save's copy phase can slow them several
times over and its fsync wait hardly at all, which a median hides; the mean is what the training
pays); *ratio (median)* = median step during / alone; absolute slowdown = mean during - alone
(ms per step); *lost* = the sum over the steps run during the save of (step - alone): the
training time the save cost in all; the save's wall time (call to
complete), the stall, steps run during the save, and for ckpt the sync save time. Runs rotate the
methods' order. ``--load N`` starts N busy processes (a Python spin loop each, at the default
priority) for the whole run: training and the save then compete with other work for the cores,
as on a machine running data loaders or other jobs. Raw JSON: ``<out>/interference_bench.json``;
tables: ``interference_bench.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from benchmarks._child import RESULT_TAG, run_in_child

MiB = 1 << 20
N_TENSORS = 16
WIDTH, LAYERS, BATCH = 512, 8, 64
WARMUP, ALONE = 10, 40
CASE_TIMEOUT_S = 900
METHODS = ("ckpt", "dcp-thread", "dcp-process", "torch-thread")
LABELS = {
    "ckpt": "ckpt CheckpointManager (async)",
    "dcp-thread": "DCP async_save, THREAD",
    "dcp-process": "DCP async_save, PROCESS",
    "torch-thread": "torch.save on a thread",
}


# --- the child: one method, one run --------------------------------------------------------


def _trainer(threads: int) -> Any:
    """A function running one training step; it returns the step's seconds."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers: list[Any] = []
    for i in range(LAYERS):
        layers.append(torch.nn.Linear(WIDTH, WIDTH))
        if i < LAYERS - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH)
    loss_fn = torch.nn.MSELoss()

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def _state(size_bytes: int) -> dict[str, Any]:
    import torch

    n = max(1, size_bytes // N_TENSORS // 4)
    g = torch.Generator().manual_seed(1)
    block = torch.randn(1 << 16, generator=g)
    state = {}
    for i in range(N_TENSORS):
        t = torch.empty(n)
        t.view(-1)[: n - n % block.numel()].view(-1, block.numel()).copy_(block)  # tiled: cheap to fill
        t[n - n % block.numel() :] = float(i)
        state[f"opt.slot{i:02d}"] = t
    return state


class _Save:
    """One method's background save: ``start(step)`` returns when the save call returns;
    ``done()`` says whether the save is complete; ``finish()`` waits and raises its error."""

    def start(self, step: int) -> None:
        raise NotImplementedError

    def done(self) -> bool:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return


class _Ckpt(_Save):
    def __init__(self, root: str, state: dict[str, Any]) -> None:
        import ckpt

        self.ckpt, self.root, self.state = ckpt, root, state
        opts = ckpt.ManagerOptions(retention=ckpt.RetentionPolicy(keep_last=1))
        self.mgr = ckpt.CheckpointManager(root, opts)
        self.step = -1

    def start(self, step: int) -> None:
        self.step = step
        self.mgr.save(step, self.state)

    def done(self) -> bool:
        return self.mgr.committed_step == self.step

    def finish(self) -> None:
        self.mgr.wait()

    def sync_save_s(self) -> float:
        ckpt = self.ckpt
        opts = ckpt.ManagerOptions(async_save=False, retention=ckpt.RetentionPolicy(keep_last=1))
        with ckpt.CheckpointManager(self.root + "-sync", opts) as mgr:
            t0 = time.perf_counter()
            mgr.save(0, self.state)
            return time.perf_counter() - t0

    def close(self) -> None:
        self.mgr.close()


class _Dcp(_Save):
    def __init__(self, root: str, state: dict[str, Any], kind: str) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
        self.dcp, self.root, self.state = dcp, root, state
        self.kind = AsyncCheckpointerType.PROCESS if kind == "process" else AsyncCheckpointerType.THREAD
        self.future: Any = None

    def start(self, step: int) -> None:
        writer = self.dcp.FileSystemWriter(os.path.join(self.root, str(step)), sync_files=True)
        self.future = self.dcp.async_save(self.state, storage_writer=writer, async_checkpointer_type=self.kind)
        if hasattr(self.future, "upload_completion"):  # an AsyncSaveResponse (async staging)
            self.future = self.future.upload_completion

    def done(self) -> bool:
        return bool(self.future.done())

    def finish(self) -> None:
        self.future.result()
        shutil.rmtree(self.root, ignore_errors=True)  # keep one checkpoint at a time, as ckpt does

    def close(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()


class _TorchThread(_Save):
    def __init__(self, root: str, state: dict[str, Any]) -> None:
        self.root, self.state = root, state
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        os.makedirs(root, exist_ok=True)

    def start(self, step: int) -> None:
        import torch

        copy = {k: v.clone() for k, v in self.state.items()}
        path = os.path.join(self.root, f"{step}.pt")

        def write() -> None:
            try:
                torch.save(copy, path)
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except BaseException as err:
                self.error = err

        self.thread = threading.Thread(target=write, name="torch-save")
        self.thread.start()

    def done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def finish(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error


def _make(method: str, root: str, state: dict[str, Any]) -> _Save:
    if method == "ckpt":
        return _Ckpt(root, state)
    if method in ("dcp-thread", "dcp-process"):
        return _Dcp(root, state, method.split("-")[1])
    if method == "torch-thread":
        return _TorchThread(root, state)
    raise ValueError(f"unknown method {method!r}")


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    step = _trainer(spec["threads"])
    state = _state(spec["size_bytes"])
    saver = _make(spec["method"], spec["root"], state)
    try:
        for _ in range(WARMUP):
            step()
        saver.start(0)  # untimed: buffers, processes, first-touch memory
        saver.finish()
        before = [step() for _ in range(ALONE)]
        t0 = time.perf_counter()
        saver.start(1)
        stall = time.perf_counter() - t0
        during: list[float] = []
        while not saver.done():
            during.append(step())
        wall = time.perf_counter() - t0
        saver.finish()
        after = [step() for _ in range(ALONE)]
        sync = saver.sync_save_s() if isinstance(saver, _Ckpt) else None
    finally:
        saver.close()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    return {"alone_before_s": before, "alone_after_s": after, "during_s": during, "stall_s": stall,
            "save_wall_s": wall, "sync_save_s": sync, "state_bytes": nbytes}  # fmt: skip


# --- the parent ------------------------------------------------------------------------------


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    return run_in_child("benchmarks.interference_bench", spec, timeout_s=CASE_TIMEOUT_S, what=str(spec["method"]))


def summarize(run: dict[str, Any]) -> dict[str, float]:
    """One run's figures (seconds unless named otherwise)."""
    alone = statistics.median(run["alone_before_s"] + run["alone_after_s"])
    during = run["during_s"] or [alone]
    med = statistics.median(during)
    return {
        "alone_s": alone,
        "during_median_s": med,
        "during_mean_s": statistics.fmean(during),
        "ratio": statistics.fmean(during) / alone,
        "ratio_median": med / alone,
        "slowdown_s": statistics.fmean(during) - alone,
        "lost_s": sum(d - alone for d in during),
        "steps": float(len(run["during_s"])),
        "save_wall_s": run["save_wall_s"],
        "stall_s": run["stall_s"],
    }


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def build_report(result: dict[str, Any]) -> str:
    """The markdown table of ``result`` (the JSON this program writes)."""
    rows = []
    head = ("| method | alone step | during save: mean | median | ratio (mean) | ratio (median) | slowdown / step "
            "| lost in all | steps | save wall | stall |")  # fmt: skip
    rows += [head, "|" + "---|" * 11]
    sums: dict[str, dict[str, list[float]]] = {}
    for case in result["cases"]:
        per = [summarize(r) for r in case["runs"]]
        s = {k: [p[k] for p in per] for k in per[0]}
        sums[case["method"]] = s
        ratio = s["ratio"]
        rows.append(
            f"| {LABELS.get(case['method'], case['method'])} | {_med(s['alone_s']) * 1e3:.1f} ms "
            f"| {_med(s['during_mean_s']) * 1e3:.1f} ms | {_med(s['during_median_s']) * 1e3:.1f} ms "
            f"| {_med(ratio):.2f}x [{min(ratio):.2f}-{max(ratio):.2f}] | {_med(s['ratio_median']):.2f}x "
            f"| {_med(s['slowdown_s']) * 1e3:+.1f} ms "
            f"| {_med(s['lost_s']):.2f} s | {_med(s['steps']):.0f} | {_med(s['save_wall_s']):.2f} s "
            f"| {_med(s['stall_s']) * 1e3:.0f} ms |"
        )
    lines = ["\n".join(rows)]
    ck = next((c for c in result["cases"] if c["method"] == "ckpt"), None)
    if ck is not None:
        sync = [r["sync_save_s"] for r in ck["runs"] if r.get("sync_save_s") is not None]
        if sync:
            st = _med(sums["ckpt"]["stall_s"])
            lines.append(f"ckpt sync save (same state, same processes): {_med(sync):.2f} s "
                         f"[{min(sync):.2f}-{max(sync):.2f}]; async stall / sync save = {st / _med(sync):.1%} "
                         f"(target <= 10%).")  # fmt: skip
    if "ckpt" in sums and "dcp-thread" in sums:
        per_run = [c / d for c, d in zip(sums["ckpt"]["ratio"], sums["dcp-thread"]["ratio"], strict=False)]
        lines.append(
            f"ckpt's ratio (mean) / DCP THREAD's, per run: median {_med(per_run):.2f} "
            f"[{min(per_run):.2f}-{max(per_run):.2f}] (target <= 1.00)."
        )
    a = result["args"]
    lines.append(f"{a['size_bytes'] / MiB:.0f} MiB state ({N_TENSORS} fp32 tensors), {a['runs']} runs, "
                 f"{a['threads']} torch thread(s), {a.get('load', 0)} busy processes beside; MLP {LAYERS} x Linear({WIDTH}, {WIDTH}), batch {BATCH}, SGD; "
                 f"medians over runs, [min-max] of the per-run values.")  # fmt: skip
    return "\n\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--runs", type=int, help="runs per method (default 5; --quick: 2)")
    ap.add_argument("--size-mib", "--size", type=int, help="saved state in MiB (default 1024; --quick: 128)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads of the training step")
    ap.add_argument("--load", type=int, default=0,
                    help="busy processes (a Python spin loop each, nice 0) competing for the cores during the runs")  # fmt: skip
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(RESULT_TAG + json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    runs = args.runs or (2 if args.quick else 5)
    size = (args.size_mib or (128 if args.quick else 1024)) * MiB
    os.makedirs(args.out, exist_ok=True)
    tmp_parent = "/work/tmp" if os.path.isdir("/work/tmp") else None
    t_start = time.time()
    records: dict[str, dict[str, Any]] = {m: {"method": m, "runs": []} for m in args.methods}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        _run_all(args, runs, size, tmp_parent, records)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    result = {"cases": list(records.values()),
              "args": {"runs": runs, "size_bytes": size, "threads": args.threads, "methods": args.methods,
                       "load": args.load, "quick": args.quick},
              "wall_s": time.time() - t_start}  # fmt: skip
    with open(os.path.join(args.out, "interference_bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = build_report(result)
    with open(os.path.join(args.out, "interference_bench.md"), "w") as f:
        f.write(text + "\n")
    print(text)


def _run_all(args: argparse.Namespace, runs: int, size: int, tmp_parent: str | None,
             records: dict[str, dict[str, Any]]) -> None:  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ckpt-interf-", dir=tmp_parent) as tmp:
        for run in range(runs):
            k = run % len(args.methods)
            for method in args.methods[k:] + args.methods[:k]:  # the order rotates from run to run
                root = os.path.join(tmp, f"{method}-{run}")
                print(f"interference: run {run + 1}/{runs} {method}", file=sys.stderr, flush=True)
                spec = {"method": method, "size_bytes": size, "root": root, "threads": args.threads}
                try:
                    res = run_case(spec)
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                    shutil.rmtree(root + "-sync", ignore_errors=True)
                records[method]["runs"].append(res)
                s = summarize(res)
                print(f"  alone {s['alone_s'] * 1e3:.1f} ms, during {s['during_median_s'] * 1e3:.1f} ms "
                      f"({s['ratio']:.2f}x, {s['steps']:.0f} steps), save {s['save_wall_s']:.2f} s, "
                      f"stall {s['stall_s'] * 1e3:.0f} ms", file=sys.stderr, flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
