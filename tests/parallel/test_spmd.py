"""torchrun-style SPMD: real processes (torch.multiprocessing) over gloo, DTensors on 1-D and
2-D meshes, saving with ckpt.parallel.torchrun.save and restoring onto a different mesh."""

from __future__ import annotations

import os
import re
import socket
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

import ckpt
import ckpt.parallel.torchrun

SHAPE = (13, 10)  # divides by nothing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _full() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))


def _run(rank: int, world: int, port: int, fn_name: str, root: str, errfile: str, sync: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        globals()[fn_name](rank, world, root)
    except BaseException:
        with open(f"{errfile}.{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise
    else:
        if sync:
            dist.barrier()  # nobody tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def _spawn(fn_name: str, world: int, root: str, tmp_path: Any, *, expect_dead: tuple[int, ...] = ()) -> None:
    """Start ``world`` independent processes (a dying one does not take the others down) and
    fail with their tracebacks if any rank other than ``expect_dead`` failed."""
    errfile = str(tmp_path / "err")
    ctx = tmp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_run, args=(r, world, port, fn_name, root, errfile, not expect_dead)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    bad = [r for r, p in enumerate(procs) if p.exitcode != 0 and r not in expect_dead]
    for p in procs:
        if p.is_alive():
            p.kill()
    if bad:
        logs = []
        for r in bad:
            if os.path.exists(f"{errfile}.{r}"):
                with open(f"{errfile}.{r}") as f:
                    logs.append(f.read())
        raise AssertionError(f"ranks {bad} failed:\n" + "\n".join(logs))


def _save_2x2(rank: int, world: int, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2))
    full = _full()
    state = {
        "w": distribute_tensor(full, mesh, [Shard(0), Shard(1)]),  # 2-D sharded
        "rep": distribute_tensor(full * 2, mesh, [Shard(1), Replicate()]),  # sharded + replicated
        "bias": torch.arange(7.0),  # a plain tensor every rank holds: found by the exchange
        f"stage{rank % 2}": torch.full((3,), float(rank % 2)),  # held by two ranks each
        "step": 5,
    }
    assert ckpt.parallel.torchrun.save(root, state, step=5) == 5


def _restore_1d(rank: int, world: int, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (4,))
    target = {
        "w": distribute_tensor(torch.zeros(SHAPE), mesh, [Shard(0)]),
        "rep": distribute_tensor(torch.zeros(SHAPE), mesh, [Shard(1)]),
        "step": None,
    }
    back = ckpt.restore(root, target=target)
    assert back["step"] == 5
    assert back["w"] is target["w"]
    full = _full()
    assert torch.equal(target["w"].full_tensor(), full)
    assert torch.equal(target["rep"].full_tensor(), full * 2)


def _save_incremental(rank: int, world: int, root: str) -> None:
    from ckpt.format import layout

    opts = ckpt.SaveOptions(incremental=True, fsync=False)
    frozen = _full()
    state: dict[str, Any] = {
        "frozen": ckpt.Shard(frozen[rank : rank + 1].clone(), (world, SHAPE[1]), (rank, 0)),
        "trained": ckpt.Shard(torch.full((2,), float(rank)), (2 * world,), (2 * rank,)),
    }
    assert ckpt.parallel.torchrun.save(root, state, step=1, options=opts) == 1
    state["trained"].tensor.add_(10)
    assert ckpt.parallel.torchrun.save(root, state, step=2, options=opts) == 2
    m1, m2 = ckpt.read_manifest(root, 1), ckpt.read_manifest(root, 2)
    assert {s.file for s in m2.tensors["frozen"].shards} <= set(m1.files)  # every rank referenced its own
    assert all(s.file.startswith(layout.data_dir(2, m2.attempt)) for s in m2.tensors["trained"].shards)
    back = ckpt.restore(root)
    assert torch.equal(back["frozen"], frozen[:world])
    assert torch.equal(back["trained"], torch.arange(world).repeat_interleave(2).float() + 10)


def test_incremental_saves_of_4_ranks(tmp_path: Any) -> None:
    _spawn("_save_incremental", 4, str(tmp_path / "run"), tmp_path)


def _fail_rank_2(rank: int, world: int, root: str) -> None:
    state: dict[str, Any] = {"x": ckpt.Shard(torch.ones(1), (world,), (rank,))}
    if rank == 2:
        state["bad"] = object()
    with pytest.raises(ckpt.WorkerFailedError, match="rank 2") as info:
        ckpt.parallel.torchrun.save(root, state, step=1, timeout_s=60)
    assert list(info.value.failures) == [2]
    assert ckpt.list_steps(root) == []
    state.pop("bad", None)
    assert ckpt.parallel.torchrun.save(root, state, step=1, timeout_s=60) == 1  # the step is still free


def test_dtensor_2x2_mesh_to_1d_mesh(tmp_path: Any) -> None:
    root = str(tmp_path / "run")
    _spawn("_save_2x2", 4, root, tmp_path)
    m = ckpt.read_manifest(root)
    assert len(m.tensors["w"].shards) == 4
    assert len(m.tensors["rep"].shards) == 2  # two replicas of each column block: written once
    assert [len(m.tensors[k].shards) for k in ("bias", "stage0", "stage1")] == [1, 1, 1]
    assert torch.equal(ckpt.restore(root)["w"], _full())
    _spawn("_restore_1d", 4, root, tmp_path)


def test_one_rank_failing_fails_every_rank(tmp_path: Any) -> None:
    _spawn("_fail_rank_2", 4, str(tmp_path / "run"), tmp_path)


def _rank_3_dies(rank: int, world: int, root: str) -> None:
    import signal
    import time

    state = {"x": ckpt.Shard(torch.ones(1), (world,), (rank,))}
    assert ckpt.parallel.torchrun.save(root, state, step=0, timeout_s=15) == 0
    if rank == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(ckpt.WorkerFailedError) as info:
        ckpt.parallel.torchrun.save(root, state, step=1, timeout_s=15)
    assert time.monotonic() - t0 < 60
    if rank == 0:  # the coordinator names the rank that never arrived
        assert re.search(r"[Rr]anks? [0-9, ]*3", str(info.value)), str(info.value)
    assert ckpt.list_steps(root) == [0]


def test_a_dead_rank_fails_the_others_within_the_timeout(tmp_path: Any) -> None:
    """Rank 3 is SIGKILLed before it writes: ranks 0-2 each raise WorkerFailedError within the
    timeout (checked inside each rank) and nothing is committed."""
    _spawn("_rank_3_dies", 4, str(tmp_path / "run"), tmp_path, expect_dead=(3,))
    assert ckpt.list_steps(str(tmp_path / "run")) == [0]
