"""One containment rule for links under a local root (docs/guarantees.md, "Links"): ckpt never
reads, writes, lists into or deletes through a symbolic link below the root; the root itself may
be a link. A save into a linked ``data/`` or ``steps/`` is refused before anything is written;
``ckpt rm``, retention and ``ckpt gc`` never delete files outside the root; restore names a
linked or FIFO shard for what it is."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt.cli import main as cli_main


def _state(v: float = 1.0) -> dict[str, object]:
    return {"w": torch.full((64, 16), v), "step": int(v)}


def _outside_files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def _move_out(root: Path, rel: str, outside: Path) -> Path:
    """What an admin does: move ``root/rel`` to a bigger disk and leave a link behind."""
    dest = outside / rel.replace("/", "_")
    shutil.move(str(root / rel), str(dest))
    os.symlink(dest, root / rel)
    return dest


@pytest.mark.parametrize("linked", ["data", "steps"])
def test_a_save_into_a_linked_directory_is_refused_before_anything_is_written(
    tmp_path: Path, linked: str
) -> None:
    root, outside = tmp_path / "run", tmp_path / "bigger-disk"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / linked)
    with pytest.raises(ckpt.UnsafePathError, match=rf"run/{linked}: is a symbolic link .*root itself may be a link"):
        ckpt.save(str(root), _state(), step=1)
    assert _outside_files(outside) == []  # nothing written through the link
    mgr = ckpt.CheckpointManager(str(root), ckpt.ManagerOptions(async_save=False))
    with pytest.raises(ckpt.UnsafePathError, match=f"{linked}: is a symbolic link"):
        mgr.save(0, _state())
    mgr.close()
    assert _outside_files(outside) == []


def test_writers_refuse_a_data_directory_linked_after_begin(tmp_path: Path) -> None:
    root, outside = tmp_path / "run", tmp_path / "bigger-disk"
    outside.mkdir()
    a = ckpt.begin(str(root), step=1)
    root.mkdir(exist_ok=True)
    os.symlink(outside, root / "data")
    with pytest.raises(ckpt.UnsafePathError, match="data: is a symbolic link"):
        ckpt.write_shards(a, _state())
    assert _outside_files(outside) == []


def test_a_linked_attempt_directory_is_refused_by_restore_verify_rm_and_retention(tmp_path: Path) -> None:
    root, outside = tmp_path / "run", tmp_path / "bigger-disk"
    outside.mkdir()
    m = ckpt.save(str(root), _state(1.0), step=1)
    attempt_dir = os.path.dirname(next(iter(m.files)))
    moved = _move_out(root, attempt_dir, outside)
    before = _outside_files(outside)
    assert before
    with pytest.raises(ckpt.UnsafePathError, match=f"{attempt_dir}: is a symbolic link"):
        ckpt.restore(str(root), 1)
    assert not ckpt.verify(str(root), 1).ok
    # ckpt rm: refused before anything is deleted, and nothing outside the root is touched
    assert cli_main(["rm", str(root), "1"]) != 0
    assert _outside_files(outside) == before
    assert ckpt.list_steps(str(root)) == [1]
    # retention (keep the last 1) after later saves: step 1 is not retired through the link
    opts = ckpt.ManagerOptions(async_save=False, retention=ckpt.RetentionPolicy(keep_last=1))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with ckpt.CheckpointManager(str(root), opts) as mgr:
            assert mgr.save(2, _state(2.0))
            assert mgr.save(3, _state(3.0))
    assert _outside_files(outside) == before
    assert any("is a symbolic link" in str(w.message) for w in seen), [str(w.message) for w in seen]
    assert ckpt.list_steps(str(root)) == [1, 3]  # 2 retired normally, 1 kept: it sits behind a link
    assert torch.equal(ckpt.restore(str(root))["w"], torch.full((64, 16), 3.0))
    # gc lists links as themselves, never what they point to
    plan = ckpt.lifecycle.cleanup.collect_garbage(ckpt.storage.open_storage(str(root)), grace_s=0.0)
    assert not [p for p in plan.delete if p.startswith(attempt_dir)]
    assert _outside_files(outside) == before
    assert moved.is_dir()


def test_a_linked_data_directory_loses_no_file_outside_the_root_to_rm_or_gc(tmp_path: Path) -> None:
    root, outside = tmp_path / "run", tmp_path / "bigger-disk"
    outside.mkdir()
    ckpt.save(str(root), _state(1.0), step=1)
    ckpt.save(str(root), _state(2.0), step=2)
    _move_out(root, "data", outside)
    before = _outside_files(outside)
    assert cli_main(["rm", str(root), "1"]) != 0
    assert cli_main(["gc", str(root), "--grace-hours", "0"]) == 0
    assert _outside_files(outside) == before
    assert ckpt.list_steps(str(root)) == [1, 2]


def test_a_root_that_is_itself_a_link_works_for_every_operation(tmp_path: Path) -> None:
    real, link = tmp_path / "disk" / "run", tmp_path / "run-link"
    real.mkdir(parents=True)
    os.symlink(real, link)
    for step in (1, 2):
        ckpt.save(str(link), _state(float(step)), step=step)
    assert torch.equal(ckpt.restore(str(link), 1)["w"], torch.full((64, 16), 1.0))
    assert ckpt.verify(str(link), 2).ok
    assert cli_main(["rm", str(link), "1"]) == 0
    assert ckpt.list_steps(str(link)) == [2]
    assert [p.name for p in (real / "data").iterdir()] == [os.path.dirname(next(iter(ckpt.read_manifest(str(link), 2).files))).split("/")[1]]


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_restore_names_a_linked_or_fifo_shard_for_what_it_is(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "run"
    m = ckpt.save(str(root), _state(), step=1)
    shard = root / next(iter(m.files))
    size = shard.stat().st_size
    copy = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(shard, copy)
    shard.unlink()
    if kind == "symlink":
        os.symlink(copy, shard)  # the same bytes, behind a link
        want = "is a symbolic link; ckpt never follows links"
    else:
        os.mkfifo(shard)
        want = "is a FIFO, not a regular file"
    assert copy.stat().st_size == size
    with pytest.raises(ckpt.UnsafePathError, match=want) as err:
        ckpt.restore(str(root), 1)
    assert "truncated or extended" not in str(err.value)
    rep = ckpt.verify(str(root), 1)
    assert not rep.ok
