"""Adopting existing safetensors files: a manifest over them, no copy; restored whole and
sharded; verified; never deleted by retirement or garbage collection."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import ckpt
from ckpt.cli import main
from ckpt.engine.owners import chunk
from ckpt.interop.adopt import adopt
from ckpt.interop.hf import export_hf
from tests.conftest import Store
from tests.interop.test_hf_export import _bits, _model, _save_sharded


def _restore_sharded(root: str, model: dict[str, torch.Tensor], n: int, opts: dict[str, Any] | None = None) -> None:
    """Each simulated rank restores its row slab of every tensor; the slabs equal the original."""
    for r in range(n):
        target: dict[str, Any] = {}
        for k, t in model.items():
            if t.ndim == 0:
                target[k] = None
                continue
            off, length = chunk(t.shape[0], n, r)
            sizes = (length, *t.shape[1:])
            target[k] = ckpt.Shard.empty(tuple(t.shape), (off,) + (0,) * (t.ndim - 1), sizes, t.dtype)
        out = ckpt.restore(root, target=target, storage_options=opts)
        for k, t in model.items():
            got = out[k] if t.ndim == 0 else out[k].tensor
            off, length = (0, 0) if t.ndim == 0 else chunk(t.shape[0], n, r)
            want = t if t.ndim == 0 else t.narrow(0, off, length)
            assert torch.equal(_bits(got.contiguous()), _bits(want.contiguous())), (k, r)


def test_export_adopt_restore_whole_and_sharded(tmp_path: Path) -> None:
    model = _model()
    _save_sharded(str(tmp_path / "run"), model, 2)
    export_hf(str(tmp_path / "run"), str(tmp_path / "hf"), prefix="model/", strip_prefix=True, max_shard_bytes=2000)
    before = {f: (tmp_path / "hf" / f).read_bytes() for f in os.listdir(tmp_path / "hf")}
    m = adopt(str(tmp_path / "hf"), step=0, block_bytes=128)
    assert set(m.files) == {f for f in before if f.endswith(".safetensors")}  # no copy, root-level paths
    assert m.user_metadata == {"ckpt.adopted": "1"}
    out = ckpt.restore(str(tmp_path / "hf"))
    assert set(out) == set(model)
    for k, t in model.items():
        assert out[k].dtype == t.dtype, k
        assert torch.equal(_bits(out[k]), _bits(t)), k
    _restore_sharded(str(tmp_path / "hf"), model, 3)
    assert ckpt.verify(str(tmp_path / "hf")).ok
    assert main(["verify", str(tmp_path / "hf")]) == 0
    assert {f: (tmp_path / "hf" / f).read_bytes() for f in before} == before  # untouched
    with pytest.raises(ckpt.CheckpointExistsError):
        adopt(str(tmp_path / "hf"), step=0)


def test_adopt_a_single_model_safetensors(tmp_path: Path) -> None:
    model = {k: v for k, v in _model(3).items() if v.numel()}
    (tmp_path / "m").mkdir()
    save_file(model, str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "config.json").write_text("{}")
    m = adopt(str(tmp_path / "m"), step=7)
    assert list(m.files) == ["model.safetensors"]
    assert m.step == 7
    out = ckpt.restore(str(tmp_path / "m"), 7)
    assert all(torch.equal(_bits(out[k]), _bits(v)) for k, v in model.items())
    assert ckpt.verify(str(tmp_path / "m")).ok


def test_a_corrupt_header_is_a_typed_error_naming_the_file(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    save_file({"a": torch.ones(4)}, str(d / "model-a.safetensors"))
    raw = bytearray((d / "model-a.safetensors").read_bytes())
    raw[8:9] = b"["  # the JSON header no longer starts with an object
    (d / "model-b.safetensors").write_bytes(raw)
    with pytest.raises(ckpt.HeaderError, match=r"model-b\.safetensors"):
        adopt(str(d))
    (d / "model-b.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")  # length past the end
    with pytest.raises(ckpt.NotSafetensorsError, match=r"model-b\.safetensors"):
        adopt(str(d))
    good = d / "model-a.safetensors"
    (d / "model-b.safetensors").write_bytes(good.read_bytes()[:-4])  # truncated data
    with pytest.raises(ckpt.HeaderError, match=r"model-b\.safetensors"):
        adopt(str(d))
    assert ckpt.list_steps(str(d)) == []


def test_index_must_agree_with_the_files(tmp_path: Path) -> None:
    ckpt.save(str(tmp_path / "run"), {"a": torch.ones(3), "b": torch.zeros(3)}, step=1)
    r = export_hf(str(tmp_path / "run"), str(tmp_path / "hf"), max_shard_bytes=100)
    assert len(r.files) == 2
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {"a": r.weight_map["b"], "b": r.weight_map["a"]}  # swapped
    index_path.write_text(json.dumps(index))
    with pytest.raises(ckpt.HeaderError, match="places in"):
        adopt(str(tmp_path / "hf"))


def test_rm_retention_and_gc_leave_adopted_files_alone(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    model = {"w": torch.arange(10.0)}
    save_file(model, str(d / "model.safetensors"))
    adopt(str(d), step=0)
    ckpt.save(str(d), {"w": torch.ones(2)}, step=1)
    ckpt.save(str(d), {"w": torch.ones(3)}, step=2)
    assert main(["gc", str(d), "--grace-hours", "0"]) == 0
    assert (d / "model.safetensors").exists()
    # retention: keep the newest only; step 0 (adopted) and step 1 are retired
    mgr = ckpt.CheckpointManager(str(d), ckpt.ManagerOptions(retention=ckpt.RetentionPolicy(keep_last=1)))
    mgr.apply_retention()
    assert ckpt.list_steps(str(d)) == [2]
    assert (d / "model.safetensors").read_bytes()[-40:] == torch.arange(10.0).numpy().tobytes()
    adopt(str(d), step=3)
    assert main(["rm", str(d), "3"]) == 0
    assert main(["gc", str(d), "--grace-hours", "0"]) == 0
    assert (d / "model.safetensors").exists()
    assert ckpt.list_steps(str(d)) == [2]
    adopt(str(d), step=4)
    assert torch.equal(ckpt.restore(str(d), 4)["w"], model["w"])


def test_cli_adopt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "m"
    d.mkdir()
    save_file({"w": torch.ones(3)}, str(d / "model.safetensors"))
    assert main(["adopt", str(d), "--step", "9", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["step"] == 9
    assert doc["files"] == ["model.safetensors"]
    assert main(["adopt", str(tmp_path / "empty")]) == 4


@pytest.mark.s3
def test_export_and_adopt_on_s3(s3_store: Store) -> None:
    model = _model(7)
    opts = s3_store.opts
    _save_sharded(s3_store.root, model, 2, opts)
    hf = s3_store.root + "-hf"
    export_hf(s3_store.root, hf, storage_options=opts, dst_storage_options=opts, prefix="model/",
              strip_prefix=True, max_shard_bytes=1500)  # fmt: skip
    m = adopt(hf, storage_options=opts)
    assert len(m.files) > 1
    _restore_sharded(hf, model, 2, opts)
    assert ckpt.verify(hf, storage_options=opts).ok
