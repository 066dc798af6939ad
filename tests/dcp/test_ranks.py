"""ckpt.dcp across ranks: 2 real gloo processes save DTensors with dcp.save, then 3 ranks and one
process load them with dcp.load, on local disk and on S3 (moto). The ranks are forked from the
fork server (tests/support/forker.py) and run tests/support/dcp_ranks.py."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
import ckpt.dcp
from tests.conftest import Store
from tests.support.dcp_ranks import full
from tests.support.forker import forker, run_ranks


def _run(name: str, store: Store, world: int, tmp_path: Path) -> list[dict[str, Any]]:
    opts = json.dumps(store.opts)
    with forker() as fk:
        seen, _ = run_ranks(fk, "tests.support.dcp_ranks:scenario",
                            lambda r, init, out: [name, store.root, opts, r, world, init, out], world, str(tmp_path), name)  # fmt: skip
    return seen


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def disk_or_s3(request: pytest.FixtureRequest) -> Store:
    return request.getfixturevalue(f"{request.param}_store")  # type: ignore[no-any-return]


def test_two_ranks_save_dtensors_and_three_ranks_and_one_process_load_them(disk_or_s3: Store, tmp_path: Path) -> None:
    store = disk_or_s3
    _run("save", store, 2, tmp_path)
    m = ckpt.read_manifest(store.root, storage_options=store.opts)
    assert (m.step, m.world_size) == (4, 2)
    assert len(m.tensors["model/w"].shards) == 2  # each rank wrote its rows
    assert len(m.tensors["model/rep"].shards) == 1  # the replica was written once
    assert ckpt.verify(store.root, storage_options=store.opts).ok

    seen = _run("load", store, 3, tmp_path)
    for s in seen:
        assert (s["w_ok"], s["rep_ok"], s["bias_ok"]) == (True, True, True), s
        assert s["extra"] == {"epoch": 4, "dtype": "torch.float16", "groups": [{"lr": 0.5, "params": [0, 1]}]}

    import torch.distributed.checkpoint as dcp

    one = {"model": {"w": torch.zeros(13, 6), "rep": torch.zeros(13, 6)}, "extra": {"epoch": 0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that no process group is set up
        dcp.load(one, storage_reader=ckpt.dcp.StorageReader(store.root, storage_options=store.opts),
                 planner=ckpt.dcp.LoadPlanner())  # fmt: skip
    assert torch.equal(one["model"]["w"], full("w"))
    assert torch.equal(one["model"]["rep"], full("rep"))
    assert one["extra"]["epoch"] == 4

    back = ckpt.restore(store.root, storage_options=store.opts)
    assert torch.equal(back["model"]["w"], full("w"))
    assert back["extra"]["groups"] == [{"lr": 0.5, "params": [0, 1]}]
