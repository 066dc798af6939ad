"""What each rank of a 2-rank torch.distributed job runs in the CheckpointManager tests (forked
children, see tests/support/forker.py): a process group over gloo from a file store, then one scenario."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

ROWS, COLS = 512, 256  # "a": rows split between the ranks (512 KiB in all)


def _init(rank: int, world: int, init_file: str) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip


def _opts(opts_json: str) -> dict[str, Any] | None:
    return json.loads(opts_json) or None


def expected(step: int) -> dict[str, Any]:
    """What a checkpoint of ``step`` holds, restored whole in one process."""
    import torch

    return {
        "a": torch.full((ROWS, COLS), float(step)),
        "b": torch.full((100,), 3 * step, dtype=torch.int64),  # replicated on both ranks
        "meta": {"step": step},
    }


def rank_state(rank: int, world: int, step: int) -> dict[str, Any]:
    import torch

    import ckpt

    rows = ROWS // world
    return {
        "a": ckpt.Shard(torch.full((rows, COLS), float(step)), (ROWS, COLS), (rank * rows, 0)),
        "b": torch.full((100,), 3 * step, dtype=torch.int64),
        "meta": {"step": step},
    }


def _fill(state: dict[str, Any], step: int) -> None:
    state["a"].tensor.fill_(float(step))
    state["b"].fill_(3 * step)
    state["meta"]["step"] = step


def saving_loop(root: str, opts_json: str, seed: int, rank: int, world: int, init_file: str) -> None:
    """Save every step asynchronously (keep the last 2), resuming from the newest checkpoint,
    until killed."""
    import ckpt

    _init(rank, world, init_file)
    policy = ckpt.RetentionPolicy(keep_last=2)
    mgr = ckpt.CheckpointManager(root, ckpt.ManagerOptions(retention=policy, timeout_s=60), storage_options=_opts(opts_json))
    state = rank_state(rank, world, 0)
    state["meta"]["step"] = -1
    latest = mgr.restore(state)
    step = -1 if latest is None else latest
    if state["meta"]["step"] != step or (latest is not None and float(state["a"].tensor[0, 0]) != step):
        raise AssertionError(f"rank {rank}: restored step {latest} but its state says {state['meta']['step']}")
    rnd = random.Random(seed * 10 + rank)
    while True:
        step += 1
        _fill(state, step)
        mgr.save(step, state)
        if rnd.random() < 0.3:
            mgr.wait()


def scenario(name: str, root: str, rank: int, world: int, init_file: str, out: str) -> None:
    """Run one named scenario; write what this rank saw to ``out`` (JSON) for the test to check."""
    _init(rank, world, init_file)
    seen: dict[str, Any] = {"rank": rank}
    try:
        globals()[f"_{name}"](root, rank, world, seen)
    finally:
        with open(out, "w") as f:
            json.dump(seen, f)


def _train(root: str, rank: int, world: int, seen: dict[str, Any]) -> None:
    """Ten steps, a save every 2 (async, keep the last 2), then a fresh manager resumes."""
    import ckpt

    opts = ckpt.ManagerOptions(save_every=2, retention=ckpt.RetentionPolicy(keep_last=2))
    with ckpt.CheckpointManager(root, opts) as mgr:
        seen["world"] = mgr.world_size
        seen["started"] = mgr.restore(rank_state(rank, world, 0))
        state = rank_state(rank, world, 0)
        for step in range(10):
            _fill(state, step)
            mgr.save(step, state)
            _fill(state, -1)  # the training loop goes on changing the state: the save is a snapshot
    target = rank_state(rank, world, 0)
    _fill(target, 0)
    with ckpt.CheckpointManager(root, opts) as mgr:
        seen["resumed"] = mgr.restore(target)
    seen["restored_a"] = sorted({float(v) for v in target["a"].tensor.flatten().tolist()})
    seen["restored_b"] = sorted({int(v) for v in target["b"].tolist()})
    seen["restored_meta"] = target["meta"]


def _stop(root: str, rank: int, world: int, seen: dict[str, Any]) -> None:
    """Rank 1 alone is asked to stop at step 5 (as if only it got SIGTERM): both ranks must save
    step 5 together and exit with the preemption code."""
    import ckpt

    mgr = ckpt.CheckpointManager(root, ckpt.ManagerOptions(save_every=4))
    state = rank_state(rank, world, 0)
    for step in range(100):
        _fill(state, step)
        if rank == 1 and step == 5:
            mgr.request_stop()
        seen["last_step"] = step
        mgr.save(step, state)  # raises SystemExit(75) at step 5 on both ranks
    seen["not_stopped"] = True


def _fail(root: str, rank: int, world: int, seen: dict[str, Any]) -> None:
    """Rank 1's writes fail: the background save fails on both ranks, and the next call raises
    it, naming rank 1."""
    import ckpt
    from ckpt.testing import Recorder, Rule, register_faulty

    register_faulty()  # a fresh interpreter (the fork server): faulty:// is not registered yet
    rec = Recorder(rules=[Rule("pipe_file", path_contains="/00001-", error=OSError(28, "No space left on device"))])
    opts = ckpt.ManagerOptions(save_options=ckpt.SaveOptions(allow_non_atomic_commit=True))
    mgr = ckpt.CheckpointManager(f"faulty://{root}", opts, storage_options={"target_protocol": "file", "recorder": rec})
    state = rank_state(rank, world, 0)
    mgr.save(0, state)
    try:
        mgr.save(1, state)
        mgr.wait()
        seen["raised"] = None
    except ckpt.WorkerFailedError as err:
        seen["raised"] = f"{type(err).__name__}: {err}"
    seen["steps"] = ckpt.list_steps(root)


def _fallback(root: str, rank: int, world: int, seen: dict[str, Any]) -> None:
    """Steps 0..8 saved every 2; rank 1's shard file of step 8 is damaged (rank 0's is intact, and
    rank 0 reads nothing of rank 1's). A fresh manager on each rank must resume both ranks at
    step 6, not rank 0 at 8 and rank 1 failing; both skip saving step 8 again and save step 10."""
    import os
    import warnings

    import torch
    import torch.distributed as dist

    import ckpt

    rows = ROWS // world

    def state(step: int) -> dict[str, Any]:
        return {"a": ckpt.Shard(torch.full((rows, COLS), float(step)), (ROWS, COLS), (rank * rows, 0)),
                "meta": {"step": step}}  # fmt: skip

    opts = ckpt.ManagerOptions(save_every=2, async_save=False)
    with ckpt.CheckpointManager(root, opts) as mgr:
        for step in range(9):
            mgr.save(step, state(step))
    dist.barrier()
    if rank == 0:  # flip one byte of rank 1's rows in step 8 (same size: only the CRC tells)
        path = next(p for p in ckpt.read_manifest(root, 8).files if "/00001-" in p)
        full = os.path.join(root, path)
        os.chmod(full, 0o644)
        with open(full, "r+b") as f:
            f.seek(os.path.getsize(full) - 4096)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    target = state(-1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ckpt.CheckpointManager(root, opts) as mgr:
            seen["resumed"] = mgr.restore(target)
            seen["meta"] = target["meta"]
            seen["a"] = sorted({float(v) for v in target["a"].tensor.flatten().tolist()})
            seen["saved8"] = mgr.save(8, state(8))
            seen["saved10"] = mgr.save(10, state(10))
    seen["warnings"] = [str(w.message) for w in caught if issubclass(w.category, ckpt.CkptWarning)]


def _shared_resume(root: str, rank: int, world: int, seen: dict[str, Any]) -> None:
    """A replicated 4 MiB tensor plus each rank's rows, saved once; fresh managers resume it with
    and without shared reads (``ManagerOptions.shared_restore``); the data bytes each rank read
    from the root are counted (``ckpt.testing.wrap_storage``)."""
    import torch

    import ckpt
    from ckpt.testing import Recorder, wrap_storage

    g = torch.Generator().manual_seed(5)
    big = torch.randn(1 << 20, generator=g)  # the same on every rank: a replica of the weights

    def state(step: int) -> dict[str, Any]:
        s = rank_state(rank, world, step)
        s["w"] = big.clone() if step >= 0 else torch.zeros_like(big)
        return s

    opts = ckpt.ManagerOptions(async_save=False, plain_tensors="replicated")
    with ckpt.CheckpointManager(root, opts) as mgr:
        mgr.save(4, state(4))
    for shared in (True, False):
        target = state(-1)
        _fill(target, -1)
        rec = Recorder()
        with wrap_storage(rec), ckpt.CheckpointManager(root, dataclasses.replace(opts, shared_restore=shared)) as mgr:
            seen[f"resumed_{shared}"] = mgr.restore(target)
        seen[f"read_{shared}"] = sum(c.nbytes or 0 for c in rec.calls if c.path.startswith("data/") and c.op.startswith("read"))
        seen[f"exact_{shared}"] = bool(torch.equal(target["w"], big)) and target["meta"] == {"step": 4} and bool(
            torch.equal(target["b"], torch.full((100,), 12, dtype=torch.int64))
        ) and sorted({float(v) for v in target["a"].tensor.flatten().tolist()}) == [4.0]
