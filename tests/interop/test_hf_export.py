"""Hugging Face layout export: index + size-capped safetensors shards, consolidated tensors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ckpt
from ckpt.cli import main
from ckpt.engine.owners import chunk
from ckpt.interop.hf import INDEX_NAME, export_hf
from tests.lifecycle.test_save_restore import _random


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "embed.weight": _random(torch.bfloat16, (50, 16), seed),
        "layers.0.weight": _random(torch.float32, (16, 16), seed + 1),
        "layers.0.bias": _random(torch.float32, (16,), seed + 2),
        "layers.1.weight": _random(torch.float8_e4m3fn, (16, 16), seed + 3),
        "layers.1.scale": _random(torch.float32, (), seed + 4),
        "head.weight": _random(torch.float16, (16, 10), seed + 5),
        "empty": _random(torch.float32, (0, 3), seed + 6),
    }


def _shard(t: torch.Tensor, n: int, i: int) -> ckpt.Shard | torch.Tensor:
    if t.ndim == 0 or t.shape[0] < n:
        return t
    off, length = chunk(t.shape[0], n, i)
    return ckpt.Shard(t.narrow(0, off, length).clone(), tuple(t.shape), (off,) + (0,) * (t.ndim - 1))


def _save_sharded(root: str, model: dict[str, torch.Tensor], n: int, opts: dict[str, Any] | None = None) -> None:
    """``n`` writers, each holding a row slab of every tensor (a plain tensor is rank 0's)."""
    a = ckpt.begin(root, step=5, world_size=n, options=ckpt.SaveOptions(block_bytes=256), storage_options=opts)
    reports = []
    for r in range(n):
        part: dict[str, Any] = {}
        for k, t in model.items():
            s = _shard(t, n, r)
            if isinstance(s, ckpt.Shard) or r == 0:
                part[k] = s
        state: dict[str, Any] = {"model": part}
        if r == 0:
            state.update(optim={"exp_avg": {k: torch.zeros(2) for k in ("a", "b")}}, step=5)
        reports.append(ckpt.write_shards(a, state, rank=r, storage_options=opts))
    ckpt.commit(a, reports, storage_options=opts)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


def _load_export(dst: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    index = json.loads((dst / INDEX_NAME).read_text())
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(set(index["weight_map"].values())):
        loaded = load_file(str(dst / f))
        assert {k for k, v in index["weight_map"].items() if v == f} == set(loaded)
        tensors.update(loaded)
    return index, tensors


def test_sharded_checkpoint_is_consolidated_and_shards_respect_the_limit(tmp_path: Path) -> None:
    model = _model()
    _save_sharded(str(tmp_path / "run"), model, 3)
    m = ckpt.read_manifest(str(tmp_path / "run"))
    assert len(m.tensors["model/embed.weight"].shards) == 3  # really sharded
    limit = 2000
    r = export_hf(str(tmp_path / "run"), str(tmp_path / "hf"), prefix="model/", strip_prefix=True, max_shard_bytes=limit)
    index, tensors = _load_export(tmp_path / "hf")
    assert set(tensors) == set(model)  # the optimizer is not exported
    for k, t in model.items():
        assert (tensors[k].dtype, tensors[k].shape) == (t.dtype, t.shape), k
        assert torch.equal(_bits(tensors[k]), _bits(t)), k
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.values())
    assert len(r.files) > 1
    assert r.files[0] == f"model-00001-of-{len(r.files):05d}.safetensors"
    assert sorted(os.listdir(tmp_path / "hf")) == sorted([*r.files, INDEX_NAME])
    for f in r.files:
        size = os.path.getsize(tmp_path / "hf" / f)
        names = [k for k, v in index["weight_map"].items() if v == f]
        assert size <= limit or len(names) == 1, (f, size, names)
    assert r.skipped_objects == ("step",)


def test_a_tensor_bigger_than_the_limit_gets_its_own_file(tmp_path: Path) -> None:
    state = {"a": torch.ones(10), "big": torch.ones(1000), "b": torch.ones(10), "c": torch.ones(10)}
    ckpt.save(str(tmp_path / "run"), state, step=1)
    r = export_hf(str(tmp_path / "run"), str(tmp_path / "hf"), max_shard_bytes="1KB")
    assert [sorted(k for k, v in r.weight_map.items() if v == f) for f in r.files] == [["a"], ["big"], ["b", "c"]]
    assert os.path.getsize(tmp_path / "hf" / r.files[1]) > 1000
    assert all(os.path.getsize(tmp_path / "hf" / f) <= 1000 for f in (r.files[0], r.files[2]))


def test_prefix_selection_rename_and_separator(tmp_path: Path) -> None:
    state = {"model": {"enc": {"w": torch.ones(2)}, "dec.w": torch.zeros(3)}, "ema": {"w": torch.ones(1)}}
    ckpt.save(str(tmp_path / "run"), state, step=1)
    r = export_hf(str(tmp_path / "run"), str(tmp_path / "a"), prefix="model/", strip_prefix=True,
                  rename=("enc", "encoder"), separator=".")  # fmt: skip
    assert set(r.weight_map) == {"encoder.w", "dec.w"}
    r = export_hf(str(tmp_path / "run"), str(tmp_path / "b"), prefix="model/")
    assert set(r.weight_map) == {"model/enc/w", "model/dec.w"}
    _, tensors = _load_export(tmp_path / "b")
    assert torch.equal(tensors["model/dec.w"], torch.zeros(3))
    with pytest.raises(ckpt.PlanError, match="no tensor"):
        export_hf(str(tmp_path / "run"), str(tmp_path / "c"), prefix="nothing/")
    with pytest.raises(ckpt.PlanError, match="both be exported"):
        export_hf(str(tmp_path / "run"), str(tmp_path / "d"), rename=("model/dec.w", "model/enc/w"))
    with pytest.raises(ckpt.StorageError, match="already exists"):
        export_hf(str(tmp_path / "run"), str(tmp_path / "b"))


def test_cli_export_hf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model()
    ckpt.save(str(tmp_path / "run"), {"model": model, "step": 1}, step=1)
    code = main(["export", "--format", "hf", f"{tmp_path / 'run'}@1", str(tmp_path / "hf"),
                 "--prefix", "model/", "--strip-prefix", "--max-shard-size", "3KB", "--json"])  # fmt: skip
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["num_tensors"] == len(model)
    assert doc["skipped_objects"] == ["step"]
    assert len(doc["files"]) > 1
    _, tensors = _load_export(tmp_path / "hf")
    assert set(tensors) == set(model)
    assert main(["export", "--format", "hf", str(tmp_path / "run"), str(tmp_path / "x"), "--max-shard-size", "lots"]) == 2
