"""Every public function that takes a root (or a source/destination) takes a ``pathlib.Path`` as
well as a string: Lightning, torchtitan and Hugging Face hand over ``Path`` objects."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

import ckpt
from ckpt.lifecycle.attempt import Attempt


def _state() -> dict[str, object]:
    return {"w": torch.arange(12.0).reshape(3, 4), "epoch": 3}


def test_the_lifecycle_functions_take_paths(tmp_path: Path) -> None:
    root = tmp_path / "run"
    ckpt.save(root, _state(), step=1)
    assert ckpt.list_steps(root) == [1]
    assert ckpt.latest_step(root) == 1
    assert ckpt.read_manifest(root).step == 1
    assert ckpt.verify(root).ok
    assert torch.equal(ckpt.restore(root)["w"], _state()["w"])  # type: ignore[call-overload]
    assert torch.equal(ckpt.restore(root, target={"w": torch.zeros(3, 4), "epoch": 0})["w"], _state()["w"])

    a: Attempt = ckpt.begin(root, step=2, world_size=1)
    assert isinstance(a.root, str)  # a plain record: it crosses process boundaries
    report = ckpt.write_shards(a, _state(), rank=0)
    ckpt.commit(a, [report])
    assert ckpt.list_steps(root) == [1, 2]

    dst = tmp_path / "copy"
    ckpt.copy(root, dst)
    assert ckpt.list_steps(dst) == [1, 2]
    assert [r.step for r in ckpt.retire(dst, [1])] == [1]
    assert ckpt.collect(dst, grace_s=0).delete == ()  # retire removed step 1's files itself


def test_the_manager_takes_a_path(tmp_path: Path) -> None:
    mgr = ckpt.CheckpointManager(tmp_path / "run")
    mgr.save(5, _state(), force=True)
    mgr.wait()
    assert ckpt.list_steps(tmp_path / "run") == [5]
    target = {"w": torch.zeros(3, 4), "epoch": 0}
    assert mgr.restore(target) == 5
    assert target["epoch"] == 3
    mgr.close()


def test_interop_takes_paths(tmp_path: Path) -> None:
    root = tmp_path / "run"
    ckpt.save(root, _state(), step=1)
    ckpt.export_hf(root, tmp_path / "hf")
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "hf").iterdir())
    ckpt.export_zarr(root, tmp_path / "z")
    ckpt.import_zarr(tmp_path / "z", tmp_path / "back")
    assert ckpt.list_steps(tmp_path / "back") == [1]

    adopted = tmp_path / "adopted"
    adopted.mkdir()
    save_file({"w": torch.ones(2)}, str(adopted / "model.safetensors"))
    assert ckpt.adopt(adopted).step == 0


def test_a_root_of_another_type_is_a_typed_error_naming_it(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(ckpt.RootTypeError, match=r"root must be a str or os.PathLike.*not int"):
        ckpt.save(7, _state(), step=0)  # type: ignore[arg-type]
    with pytest.raises(ckpt.RootTypeError, match=r"dst_root must be a str or os.PathLike.*not NoneType"):
        ckpt.copy(tmp_path, None)  # type: ignore[arg-type]
