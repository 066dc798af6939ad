"""What each rank runs in the ckpt.dcp multi-rank tests (forked children, tests/support/forker.py):
a gloo process group from a file store, then one scenario of dcp.save / dcp.load with
ckpt.dcp's storage plugins and planners. Each rank writes what it saw to a JSON file."""

from __future__ import annotations

import json
from typing import Any

from tests.support.forker import rank_scenario

ROWS, COLS = 13, 6  # rows divide by neither 2 nor 3


def full(name: str) -> Any:
    import torch

    seed = {"w": 1, "rep": 2}[name]
    return torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(seed))


def scenario(name: str, root: str, opts_json: str, rank: int, world: int, init_file: str, out: str) -> None:
    import datetime
    import warnings

    import torch.distributed as dist

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    rank_scenario(rank, out, lambda seen: globals()[f"_{name}"](root, json.loads(opts_json) or None, rank, world, seen))


def _save(root: str, opts: dict[str, Any] | None, rank: int, world: int, seen: dict[str, Any]) -> None:
    """Each rank holds a row shard of "w" (a DTensor), a replicated DTensor, a plain tensor and
    non-tensor values every rank holds alike: DCP writes each once."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import ckpt.dcp

    mesh = init_device_mesh("cpu", (world,))
    state = {
        "model": {"w": distribute_tensor(full("w"), mesh, [Shard(0)]),
                  "rep": distribute_tensor(full("rep"), mesh, [Replicate()])},
        "bias": torch.arange(7.0),
        "extra": {"epoch": 4, "dtype": torch.float16, "groups": [{"lr": 0.5, "params": [0, 1]}]},
    }  # fmt: skip
    dcp.save(state, storage_writer=ckpt.dcp.StorageWriter(root, step=4, storage_options=opts),
             planner=ckpt.dcp.SavePlanner())  # fmt: skip
    seen["saved"] = True


def _load(root: str, opts: dict[str, Any] | None, rank: int, world: int, seen: dict[str, Any]) -> None:
    """Load onto another world size: "w" split by rows, "rep" split by columns."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import ckpt.dcp

    mesh = init_device_mesh("cpu", (world,))
    target = {
        "model": {"w": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)]),
                  "rep": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(1)])},
        "bias": torch.zeros(7),
        "extra": {"epoch": 0, "dtype": None, "groups": [{"lr": 0.0, "params": []}]},
    }  # fmt: skip
    dcp.load(target, storage_reader=ckpt.dcp.StorageReader(root, storage_options=opts),
             planner=ckpt.dcp.LoadPlanner())  # fmt: skip
    seen["w_ok"] = bool(torch.equal(target["model"]["w"].full_tensor(), full("w")))
    seen["rep_ok"] = bool(torch.equal(target["model"]["rep"].full_tensor(), full("rep")))
    seen["bias_ok"] = bool(torch.equal(target["bias"], torch.arange(7.0)))
    extra = target["extra"]
    seen["extra"] = {"epoch": extra["epoch"], "dtype": str(extra["dtype"]), "groups": extra["groups"]}
