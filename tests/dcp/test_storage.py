"""ckpt.dcp in one process (DCP without a process group): dcp.save / dcp.async_save with
ckpt.dcp.StorageWriter write an ordinary ckpt checkpoint; dcp.load with ckpt.dcp.StorageReader
reads it and ckpt.save's checkpoints; non-tensor values are typed JSON, opaque bytes only on
request, and nothing in the root is a pickle or a DCP ``.metadata`` file."""

from __future__ import annotations

import argparse
import io
import pathlib
import pickle
import warnings
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

import ckpt
import ckpt.dcp
from ckpt.cli import main as cli
from tests.conftest import Store


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return {
        "model": model.state_dict(),
        "per/layer": {"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)},
        "extra": {
            "epoch": 7, "lr": 0.25, "name": "run-1", "flag": True, "none": None, "big": 2**70,
            "betas": (0.9, 0.999), "groups": [{"lr": 0.1, "params": [0, 1]}],
            "dtype": torch.bfloat16, "path": pathlib.Path("/data/set"), "args": argparse.Namespace(seed=1, tag="x"),
        },
    }  # fmt: skip


def _zeros_like(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: _zeros_like(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_zeros_like(v) for v in state]
    return None


def _files(store: Store) -> dict[str, bytes]:
    fs, path = fsspec.core.url_to_fs(store.root, **store.opts)
    return {p[len(path) + 1 :]: fs.cat_file(p) for p in fs.find(path)}


def _assert_plain_ckpt_root(store: Store) -> None:
    """Only ckpt's names, no DCP metadata file, no pickle anywhere."""
    files = _files(store)
    assert files
    for name, data in files.items():
        assert name == "LATEST" or name.endswith(("/manifest.json", ".safetensors")), name
        assert not name.endswith((".metadata", ".distcp")), name
        assert not data.startswith(b"\x80"), f"{name} looks like a pickle"
        assert b"torch._utils" not in data, name
        assert b"_rebuild_tensor" not in data, name


def test_dcp_save_writes_a_ckpt_checkpoint_that_dcp_load_and_ckpt_restore_read(store: Store) -> None:
    state = _state()
    dcp.save(state, storage_writer=ckpt.dcp.StorageWriter(store.root, step=3, storage_options=store.opts),
             planner=ckpt.dcp.SavePlanner())  # fmt: skip
    _assert_plain_ckpt_root(store)
    assert ckpt.list_steps(store.root, storage_options=store.opts) == [3]
    assert ckpt.verify(store.root, storage_options=store.opts).ok

    target = _zeros_like(state)
    target["extra"]["groups"] = [{"lr": 0.0, "params": []}]
    dcp.load(target, storage_reader=ckpt.dcp.StorageReader(store.root, storage_options=store.opts),
             planner=ckpt.dcp.LoadPlanner())  # fmt: skip
    for k, v in state["model"].items():
        assert torch.equal(target["model"][k], v), k
    assert torch.equal(target["per/layer"]["w"], state["per/layer"]["w"])
    assert target["extra"] == {**state["extra"], "args": target["extra"]["args"]}
    assert vars(target["extra"]["args"]) == {"seed": 1, "tag": "x"}
    assert target["extra"]["dtype"] is torch.bfloat16

    back = ckpt.restore(store.root, storage_options=store.opts)  # the nested structure, not FQNs
    assert set(back) == {"model", "per/layer", "extra"}
    assert torch.equal(back["model"]["0.weight"], state["model"]["0.weight"])
    assert back["extra"]["groups"] == [{"lr": 0.1, "params": [0, 1]}]
    assert back["extra"]["betas"] == (0.9, 0.999)
    assert back["extra"]["dtype"] == {"$dcp": "torch.dtype", "value": "bfloat16"}  # typed, not decoded by ckpt.restore
    m = ckpt.read_manifest(store.root, storage_options=store.opts)
    assert "per~1layer/w" in m.tensors  # the key of FQN "per/layer.w": path segments escaped


def test_dcp_save_can_be_incremental(local_store: Store) -> None:
    """The DCP writer is a ckpt writer: with SaveOptions(incremental=True) a second dcp.save
    references the unchanged tensors of the first and dcp.load reads both steps exactly."""
    from ckpt.format import layout

    root, opts = local_store.root, ckpt.SaveOptions(incremental=True, fsync=False)
    state = _state()
    dcp.save(state, storage_writer=ckpt.dcp.StorageWriter(root, step=1, options=opts), planner=ckpt.dcp.SavePlanner())
    changed = next(iter(state["model"]))
    state["model"][changed] = state["model"][changed] + 1
    dcp.save(state, storage_writer=ckpt.dcp.StorageWriter(root, step=2, options=opts), planner=ckpt.dcp.SavePlanner())
    m = ckpt.read_manifest(root, 2)
    own = layout.data_dir(2, m.attempt) + "/"
    assert m.format_version == 3
    assert m.tensors[f"model/{changed}"].shards[0].file.startswith(own)
    assert any(not t.shards[0].file.startswith(own) for k, t in m.tensors.items() if k != f"model/{changed}")
    target = _zeros_like(state)
    target["extra"]["groups"] = [{"lr": 0.0, "params": []}]
    dcp.load(target, storage_reader=ckpt.dcp.StorageReader(root, step=2), planner=ckpt.dcp.LoadPlanner())
    for k, v in state["model"].items():
        assert torch.equal(target["model"][k], v), k
    assert ckpt.verify(root, 2).ok


def test_ckpt_save_loads_with_dcp_load(store: Store) -> None:
    state = _state()
    ckpt.save(store.root, {**state, "extra": {"epoch": 7, "betas": (0.9, 0.999), "bucket": [1, 2]}}, step=1,
              storage_options=store.opts)  # fmt: skip
    target = _zeros_like(state)
    target["extra"] = {"epoch": 0, "betas": None, "bucket": None}
    dcp.load(target, storage_reader=ckpt.dcp.StorageReader(store.root, storage_options=store.opts),
             planner=ckpt.dcp.LoadPlanner())  # fmt: skip
    for k, v in state["model"].items():
        assert torch.equal(target["model"][k], v), k
    assert target["extra"] == {"epoch": 7, "betas": (0.9, 0.999), "bucket": [1, 2]}


def test_nested_empty_dicts_survive_a_save_that_dcp_would_flatten_away(local_store: Store) -> None:
    # DCP's flattening has no leaf for an empty dict (a Lightning loop's "state_dict": {}); the
    # save planner keeps it as the value {}
    state = {"w": torch.ones(2), "loops": {"fit": {"state_dict": {}, "n": 3}, "none": {}}, "cbs": {}}
    dcp.save(state, storage_writer=ckpt.dcp.StorageWriter(local_store.root, step=0), planner=ckpt.dcp.SavePlanner())
    back = ckpt.restore(local_store.root)
    assert back["loops"] == {"fit": {"state_dict": {}, "n": 3}, "none": {}}
    assert back["cbs"] == {}
    target: dict[str, Any] = {"w": torch.zeros(2), "loops": {"fit": {"state_dict": None, "n": 0}, "none": None}, "cbs": None}
    dcp.load(target, storage_reader=ckpt.dcp.StorageReader(local_store.root), planner=ckpt.dcp.LoadPlanner())
    assert target["loops"] == state["loops"]
    assert target["cbs"] == {}
    assert state["loops"]["none"] == {}  # the caller's dicts are not changed


def test_a_resharded_read_loads_part_of_a_tensor_into_a_noncontiguous_target(local_store: Store) -> None:
    w = torch.arange(24.0).reshape(4, 6)
    ckpt.save(local_store.root, {"w": w}, step=0)
    target = {"w": torch.zeros(6, 4).t()}  # a transposed (non-contiguous) destination
    dcp.load(target, storage_reader=ckpt.dcp.StorageReader(local_store.root), planner=ckpt.dcp.LoadPlanner())
    assert torch.equal(target["w"], w)


def test_the_default_planner_is_refused_for_non_tensor_values_naming_the_key(local_store: Store) -> None:
    with pytest.raises(CheckpointException) as info:
        dcp.save({"w": torch.ones(2), "epoch": 3}, storage_writer=ckpt.dcp.StorageWriter(local_store.root, step=1))
    err = info.value.failures[0][0] if isinstance(info.value.failures[0], tuple) else info.value.failures[0]
    assert isinstance(err, ckpt.OpaqueBytesError)
    assert "'epoch'" in str(err)
    assert "ckpt.dcp.SavePlanner" in str(err)
    assert ckpt.list_steps(local_store.root) == []


def test_opaque_bytes_are_stored_and_handed_back_only_on_request(local_store: Store) -> None:
    root = local_store.root
    dcp.save({"w": torch.ones(2), "epoch": 3},
             storage_writer=ckpt.dcp.StorageWriter(root, step=1, allow_opaque_bytes=True))  # fmt: skip
    assert ckpt.verify(root).ok
    stored = ckpt.restore(root)["epoch"]
    assert stored["$dcp"] == "opaque"
    assert isinstance(stored["value"], bytes)
    assert stored["value"][:2] == b"PK"  # torch.save's zip, kept byte for byte

    target: dict[str, Any] = {"w": torch.zeros(2), "epoch": 0}
    with pytest.raises(CheckpointException, match="allow_opaque_bytes"):
        dcp.load(target, storage_reader=ckpt.dcp.StorageReader(root))
    with pytest.raises(CheckpointException, match="never unpickles"):
        dcp.load(target, storage_reader=ckpt.dcp.StorageReader(root, allow_opaque_bytes=True),
                 planner=ckpt.dcp.LoadPlanner())  # fmt: skip
    assert target["epoch"] == 0
    dcp.load(target, storage_reader=ckpt.dcp.StorageReader(root, allow_opaque_bytes=True), planner=DefaultLoadPlanner())
    assert target["epoch"] == 3
    assert torch.equal(target["w"], torch.ones(2))


def test_typed_values_are_not_handed_to_a_planner_that_would_unpickle_them(local_store: Store) -> None:
    dcp.save({"epoch": 3}, storage_writer=ckpt.dcp.StorageWriter(local_store.root, step=1), planner=ckpt.dcp.SavePlanner())
    with pytest.raises(CheckpointException, match=r"ckpt\.dcp\.LoadPlanner"):
        dcp.load({"epoch": 0}, storage_reader=ckpt.dcp.StorageReader(local_store.root))


def test_a_value_without_a_typed_form_is_refused_before_anything_is_written(local_store: Store) -> None:
    with pytest.raises(CheckpointException, match="'obj'") as info:
        dcp.save({"w": torch.ones(2), "obj": object()}, storage_writer=ckpt.dcp.StorageWriter(local_store.root, step=1),
                 planner=ckpt.dcp.SavePlanner())  # fmt: skip
    assert info.value.args[0] == "plan"  # refused while planning, before any rank writes
    assert not pathlib.Path(local_store.root).exists()


def test_a_committed_step_is_refused_and_step_none_reads_the_newest(local_store: Store) -> None:
    root = local_store.root
    for step in (1, 2):
        dcp.save({"w": torch.full((2,), float(step))}, storage_writer=ckpt.dcp.StorageWriter(root, step=step))
    with pytest.raises(CheckpointException, match="already committed"):
        dcp.save({"w": torch.ones(2)}, storage_writer=ckpt.dcp.StorageWriter(root, step=2))
    target = {"w": torch.zeros(2)}
    dcp.load(target, storage_reader=ckpt.dcp.StorageReader(root))
    assert target["w"].tolist() == [2.0, 2.0]
    dcp.load(target, storage_reader=ckpt.dcp.StorageReader(root, step=1))
    assert target["w"].tolist() == [1.0, 1.0]


def test_async_save_commits_when_its_future_completes(local_store: Store) -> None:
    state = {"w": torch.arange(10.0), "epoch": 5}
    fut = dcp.async_save(state, storage_writer=ckpt.dcp.StorageWriter(local_store.root, step=9),
                         planner=ckpt.dcp.SavePlanner())  # fmt: skip
    result = fut.upload_completion if hasattr(fut, "upload_completion") else fut
    result.result(timeout=120)
    back = ckpt.restore(local_store.root)
    assert torch.equal(back["w"], torch.arange(10.0))
    assert back["epoch"] == 5


def test_ckpt_verify_on_the_command_line_passes_on_a_dcp_save(local_store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    dcp.save(_state(), storage_writer=ckpt.dcp.StorageWriter(local_store.root, step=3), planner=ckpt.dcp.SavePlanner())
    assert cli(["verify", local_store.root]) == 0
    assert cli(["show", local_store.root]) == 0


def test_the_save_planner_gives_json_to_other_storages_and_the_load_planner_reads_it(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "fs")
    dcp.save({"w": torch.ones(2), "dtype": torch.float16, "epoch": 2}, storage_writer=dcp.FileSystemWriter(path),
             planner=ckpt.dcp.SavePlanner())  # fmt: skip
    target: dict[str, Any] = {"w": torch.zeros(2), "dtype": None, "epoch": 0}
    dcp.load(target, storage_reader=dcp.FileSystemReader(path), planner=ckpt.dcp.LoadPlanner())
    assert target["dtype"] is torch.float16
    assert target["epoch"] == 2
    planner = ckpt.dcp.LoadPlanner()
    planner.set_up_planner({"x": 0}, None, True)
    with pytest.raises(ckpt.OpaqueBytesError, match="never unpickles"):
        planner.load_bytes(_read_item("x"), io.BytesIO(pickle.dumps(1)))


def _read_item(fqn: str) -> Any:
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    idx = MetadataIndex(fqn)
    return ReadItem(LoadItemType.BYTE_IO, idx, torch.Size([]), idx, torch.Size([]), torch.Size([]))


def test_no_unpickling_is_reached_on_ckpt_paths(local_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ckpt.dcp's planners, neither torch.load nor pickle runs on save or load."""

    def banned(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickling was reached")

    monkeypatch.setattr(torch, "load", banned)
    monkeypatch.setattr(pickle, "loads", banned)
    monkeypatch.setattr(pickle, "load", banned)
    state = _state()
    dcp.save(state, storage_writer=ckpt.dcp.StorageWriter(local_store.root, step=1), planner=ckpt.dcp.SavePlanner())
    target = _zeros_like(state)
    target["extra"]["groups"] = [{"lr": 0.0, "params": []}]
    dcp.load(target, storage_reader=ckpt.dcp.StorageReader(local_store.root), planner=ckpt.dcp.LoadPlanner())
    assert target["extra"]["epoch"] == 7


def test_ranks_that_resolved_different_steps_are_refused(local_store: Store) -> None:
    from torch.distributed.checkpoint.planner import LoadPlan

    ckpt.save(local_store.root, {"w": torch.ones(2)}, step=1)
    reader = ckpt.dcp.StorageReader(local_store.root)
    reader.read_metadata()
    with pytest.raises(ckpt.PlanError, match="coordinator step 2"):
        reader.read_data(LoadPlan([], storage_data={"ckpt.step": 2, "ckpt.attempt": "x"}), ckpt.dcp.LoadPlanner())
