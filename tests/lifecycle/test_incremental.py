"""Incremental saves (SaveOptions(incremental=True), docs/FORMAT.md 4.9): regions whose bytes did
not change since the base step are recorded as references to the base's bytes, decided by a
128-bit content hash; everything that touches data (restore, verify, retire, gc, cp, du) stays
exact with files shared between steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt import errors
from ckpt.cli import main as cli
from ckpt.format import layout
from tests.conftest import Store

INC = ckpt.SaveOptions(incremental=True, fsync=False)


def lora_state(seed: int = 0, step: int = 0) -> dict[str, Any]:
    """A frozen base (never changes) and adapters with their optimizer state (change each step)."""
    g = torch.Generator().manual_seed(seed)
    base = {f"layer{i}.w": torch.randn(256, 256, generator=g).to(torch.bfloat16) for i in range(4)}
    h = torch.Generator().manual_seed(1000 + step)
    return {
        "base": base,
        "lora": {"A": torch.randn(256, 8, generator=h), "B": torch.randn(8, 256, generator=h)},
        "optim": {"exp_avg": torch.randn(4096, generator=h), "step": step},
    }


def own_files(m: ckpt.Manifest) -> dict[str, int]:
    """The files of ``m``'s own attempt (what its save wrote), path -> size."""
    own = layout.data_dir(m.step, m.attempt) + "/"
    return {p: f.size for p, f in m.files.items() if p.startswith(own)}


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    else:
        assert a == b


def test_unchanged_regions_are_referenced_and_only_changes_are_written(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    m1 = ckpt.save(root, lora_state(step=1), step=1, options=INC)
    assert m1.format_version == 3
    assert m1.content_hash == "blake3-128"
    assert all(h is not None and len(h) == 32 for t in m1.tensors.values() for h in t.shards.hashes or [None])
    s2 = lora_state(step=2)
    m2 = ckpt.save(root, s2, step=2, options=INC)
    base_bytes = sum(t.nbytes for k, t in m2.tensors.items() if k.startswith("base/"))
    assert sum(own_files(m2).values()) < 0.2 * base_bytes  # only the adapters and their state
    for k, t in m2.tensors.items():  # the base's tensors point at step 1's file, the rest at step 2's
        (shard,) = t.shards
        assert shard.file.startswith(layout.data_dir(1, m1.attempt) if k.startswith("base/") else layout.data_dir(2, m2.attempt))
    assert_same(ckpt.restore(root), s2)
    assert_same(ckpt.restore(root, step=1), lora_state(step=1))
    assert ckpt.verify(root, step=2).ok
    # a third step references step 1's file directly: references never chain
    m3 = ckpt.save(root, lora_state(step=3), step=3, options=INC)
    assert {p for p in m3.files if p not in own_files(m3)} == set(own_files(m1))


def test_equality_is_decided_by_the_bytes_not_the_tensor(tmp_path: Path) -> None:
    """A new tensor object with the same bytes is reused; a tensor changed in place after its
    first checksum block (same first-block CRC, same object) is written again."""
    root = str(tmp_path / "root")
    opts = ckpt.SaveOptions(incremental=True, fsync=False, block_bytes=64)
    w = torch.arange(1024, dtype=torch.float32)
    state = {"w": w, "same": torch.ones(100)}
    m1 = ckpt.save(root, state, step=1, options=opts)
    w[500] = -1.0  # in place: bytes 2000..2004, far past the first 64-byte block
    state["same"] = torch.ones(100)  # another object, the same bytes
    m2 = ckpt.save(root, state, step=2, options=opts)
    assert m2.tensors["w"].shards[0].file in own_files(m2)
    assert m2.tensors["same"].shards[0].file in own_files(m1)
    (h1,), (h2,) = m1.tensors["w"].shards.hashes, m2.tensors["w"].shards.hashes  # type: ignore[misc]
    assert h1 is not None
    assert h2 is not None
    assert h1 != h2
    assert torch.equal(ckpt.restore(root)["w"], w)


def test_a_region_that_changed_from_its_first_block_is_written_without_a_hash(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    ckpt.save(root, {"w": torch.zeros(1000), "k": torch.ones(10)}, step=1, options=INC)
    m2 = ckpt.save(root, {"w": torch.full((1000,), 2.0), "k": torch.ones(10)}, step=2, options=INC)
    assert m2.tensors["w"].shards.hashes == (None,)  # trained: its next value differs again
    m3 = ckpt.save(root, {"w": torch.full((1000,), 2.0), "k": torch.ones(10)}, step=3, options=INC)
    # unchanged since step 2 but step 2 recorded no hash: written again, now with one
    assert m3.tensors["w"].shards[0].file in own_files(m3)
    assert m3.tensors["w"].shards.hashes[0] is not None  # type: ignore[index]
    m4 = ckpt.save(root, {"w": torch.full((1000,), 2.0), "k": torch.ones(10)}, step=4, options=INC)
    assert m4.tensors["w"].shards[0].file in own_files(m3)
    assert not own_files(m4) or all(p not in own_files(m4) for p in (m4.tensors["w"].shards[0].file,))


def test_the_base_is_the_newest_step_before_or_the_one_named(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    a, b = {"x": torch.zeros(100)}, {"x": torch.ones(100)}
    m1 = ckpt.save(root, a, step=1, options=INC)
    ckpt.save(root, b, step=2, options=INC)
    m3 = ckpt.save(root, a, step=3, options=ckpt.SaveOptions(incremental=True, fsync=False, base_step=1))
    assert m3.tensors["x"].shards[0].file in own_files(m1)
    m4 = ckpt.save(root, a, step=4, options=INC)  # base: step 3, which references step 1's bytes
    assert m4.tensors["x"].shards[0].file in own_files(m1)
    # another block size: the base's CRCs are not this save's, so nothing is reused
    m5 = ckpt.save(root, a, step=5, options=ckpt.SaveOptions(incremental=True, fsync=False, block_bytes=4096))
    assert m5.tensors["x"].shards[0].file in own_files(m5)
    with pytest.raises(errors.CheckpointNotFoundError):
        ckpt.save(root, a, step=6, options=ckpt.SaveOptions(incremental=True, base_step=42))
    with pytest.raises(ValueError, match="only used by an incremental save"):
        ckpt.SaveOptions(base_step=1)
    with pytest.raises(ValueError, match="paged_manifest=False conflicts"):
        ckpt.SaveOptions(incremental=True, paged_manifest=False)


def test_a_plain_base_is_never_trusted_without_a_hash(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    state = {"x": torch.arange(100.0)}
    ckpt.save(root, state, step=1, options=ckpt.SaveOptions(fsync=False))  # v1: no hashes
    m2 = ckpt.save(root, state, step=2, options=INC)
    assert m2.tensors["x"].shards[0].file in own_files(m2)
    m3 = ckpt.save(root, state, step=3, options=INC)
    assert m3.tensors["x"].shards[0].file in own_files(m2)


def test_retiring_the_base_and_every_other_step_keeps_the_shared_bytes(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    states = {s: lora_state(step=s) for s in range(1, 5)}
    for s, st in states.items():
        ckpt.save(root, st, step=s, options=INC)
    retired = ckpt.retire(root, [1, 2, 3])
    assert retired[0].files_kept  # step 1's file holds the base every later step references
    plan = ckpt.collect(root, grace_s=0)
    assert ckpt.list_steps(root) == [4]
    assert_same(ckpt.restore(root), states[4])
    assert ckpt.verify(root).ok
    stored = {p.relative_to(root).as_posix() for p in Path(root, "data").rglob("*.safetensors")}
    assert stored == set(ckpt.read_manifest(root).files), plan  # nothing else kept, nothing missing
    # a copy of the step is self-contained: it restores with the source gone
    dst = str(tmp_path / "copy")
    ckpt.copy(root, dst, steps=[4])
    shutil.rmtree(root)
    assert_same(ckpt.restore(dst), states[4])
    assert ckpt.verify(dst).ok


def test_a_base_retired_during_the_save_withdraws_it(tmp_path: Path) -> None:
    """The coordinator's commit finds the base gone after its commit: a retirement may have
    scanned the references before it, so the step is withdrawn, not left referencing bytes that
    may be deleted."""
    root = str(tmp_path / "root")
    ckpt.save(root, lora_state(step=1), step=1, options=INC)
    a = ckpt.begin(root, step=2, options=INC)
    assert a.base_step == 1
    report = ckpt.write_shards(a, lora_state(step=2))
    ckpt.retire(root, [1])  # its files stay while nothing references them; gc would take them
    with pytest.raises(errors.BaseRetiredError, match="base step 1"):
        ckpt.commit(a, [report])
    assert ckpt.list_steps(root) == []
    # the base's files still there (step 10 references them too), the base itself retired: found
    # after the commit, which is withdrawn
    ckpt.save(root, lora_state(step=10), step=10, options=INC)
    ckpt.save(root, lora_state(step=11), step=11, options=INC)
    a = ckpt.begin(root, step=12, options=INC)
    assert a.base_step == 11
    report = ckpt.write_shards(a, lora_state(step=12))
    ckpt.retire(root, [11])
    with pytest.raises(errors.BaseRetiredError, match="was retired while this incremental save ran; the save was withdrawn"):
        ckpt.commit(a, [report])
    assert ckpt.list_steps(root) == [10]
    assert not Path(root, layout.data_dir(12, a.attempt)).exists()  # its own files went with it
    m = ckpt.save(root, lora_state(step=12), step=12, options=INC)  # again: the base is now step 10
    assert set(m.files) - set(own_files(m))
    assert_same(ckpt.restore(root), lora_state(step=12))


def test_several_writers_reuse_their_own_regions(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    full = torch.arange(64.0).reshape(8, 8)

    def save(step: int, bump: bool) -> ckpt.Manifest:
        a = ckpt.begin(root, step=step, world_size=2, options=INC)
        reports = []
        for r in range(2):
            part = full[4 * r : 4 * r + 4].clone()
            if bump and r == 1:
                part += 1
            reports.append(ckpt.write_shards(a, {"w": ckpt.Shard(part, (8, 8), (4 * r, 0)), "c": torch.ones(3)},
                                             rank=r, plain_tensors="replicated"))  # fmt: skip
        return ckpt.commit(a, reports)

    m1 = save(1, False)
    m2 = save(2, True)
    files = [s.file for s in m2.tensors["w"].shards]
    assert files[0] in own_files(m1)
    assert files[1] in own_files(m2)
    assert m2.tensors["c"].shards[0].file in own_files(m1)
    back = ckpt.restore(root)["w"]
    assert torch.equal(back[:4], full[:4])
    assert torch.equal(back[4:], full[4:] + 1)
    # restored by a different number of readers: each region from wherever it lives
    half = ckpt.restore(root, target={"w": ckpt.Shard.empty((8, 8), (2, 0), (4, 8), torch.float32)})["w"]
    assert torch.equal(half.tensor, torch.cat([full[2:4], full[4:6] + 1]))


def test_du_shows_referenced_and_stored_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "root")
    ms = [ckpt.save(root, lora_state(step=s), step=s, options=INC) for s in (1, 2, 3)]
    assert cli(["du", root, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["step"]: r for r in out["steps"]}
    assert rows[1]["new_bytes"] == rows[1]["referenced_bytes"] == ms[0].total_bytes
    for s, m in ((2, ms[1]), (3, ms[2])):
        assert rows[s]["referenced_bytes"] == m.total_bytes
        assert rows[s]["new_bytes"] == sum(own_files(m).values())
        assert rows[s]["shared_bytes"] == ms[0].total_bytes
    assert out["stored_bytes"] == sum(r["new_bytes"] for r in rows.values())
    stored = sum(p.stat().st_size for p in Path(root, "data").rglob("*.safetensors"))
    assert out["stored_bytes"] == stored
    assert cli(["du", root]) == 0
    assert "stored" in capsys.readouterr().out


@pytest.mark.s3
def test_incremental_saves_on_s3(s3_store: Store) -> None:
    root, opts = s3_store.root, s3_store.opts
    ckpt.save(root, lora_state(step=1), step=1, options=INC, storage_options=opts)
    s2 = lora_state(step=2)
    m2 = ckpt.save(root, s2, step=2, options=INC, storage_options=opts)
    assert sum(own_files(m2).values()) < 0.2 * m2.total_bytes
    assert_same(ckpt.restore(root, storage_options=opts), s2)
    ckpt.retire(root, [1], storage_options=opts)
    ckpt.collect(root, grace_s=0, storage_options=opts)
    assert_same(ckpt.restore(root, storage_options=opts), s2)
    assert ckpt.verify(root, storage_options=opts).ok


def test_the_manager_saves_incrementally_and_retention_keeps_what_is_shared(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    opts = ckpt.ManagerOptions(retention=ckpt.RetentionPolicy(keep_last=1), save_options=INC)
    with ckpt.CheckpointManager(root, opts) as mgr:
        for s in range(1, 5):
            mgr.save(s, lora_state(step=s))
        mgr.wait()
    assert ckpt.list_steps(root) == [4]
    m = ckpt.read_manifest(root)
    assert set(m.files) - set(own_files(m))  # still references the first step's base
    assert_same(ckpt.restore(root), lora_state(step=4))
    assert ckpt.verify(root).ok


def test_exports_and_show_of_an_incremental_step_are_unaffected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "root")
    ckpt.save(root, lora_state(step=1), step=1, options=INC)
    s2 = lora_state(step=2)
    ckpt.save(root, s2, step=2, options=INC)
    z, back, hf = str(tmp_path / "z"), str(tmp_path / "back"), str(tmp_path / "hf")
    assert cli(["export", "--format", "zarr", f"{root}@2", z]) == 0
    assert cli(["import", "--format", "zarr", z, back]) == 0
    assert_same(ckpt.restore(back), s2)
    assert cli(["export", "--format", "hf", f"{root}@2", hf]) == 0
    from safetensors.torch import load_file

    got: dict[str, torch.Tensor] = {}
    for f in Path(hf).glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert set(got) == {f"base/{k}" for k in s2["base"]} | {f"lora/{k}" for k in s2["lora"]} | {"optim/exp_avg"}
    for k, v in s2["base"].items():
        assert torch.equal(got[f"base/{k}"], v)
    capsys.readouterr()
    assert cli(["show", f"{root}@2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["format_version"] == 3
    assert len(shown["files"]) == 2  # its own file and the base's
