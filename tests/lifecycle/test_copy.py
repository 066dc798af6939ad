"""``ckpt.copy`` / ``ckpt cp``: planning (pure), copies between local disks, memory and a real S3
endpoint (moto), verification on the way, incremental checkpoints, the create-only commit,
and resuming after a real ``python -m ckpt cp`` is killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckpt
from ckpt.cli import main
from ckpt.format.manifest import FileEntry, Manifest, TensorEntry
from ckpt.lifecycle.commit import manifest_path
from ckpt.lifecycle.copy import CopyOptions, FileTask, plan_copy
from ckpt.options import SaveOptions
from ckpt.storage import open_storage
from tests.conftest import Store, make_state

REPO = Path(__file__).resolve().parents[2]
# one file per tensor: many small files
MANY_FILES = SaveOptions(max_file_bytes=1, min_file_bytes=1, parallel_files=64, fsync=False)


def _state(seed: int, n: int = 6, numel: int = 4096) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": {f"t{i}": torch.randn(numel, generator=g) for i in range(n)},
        "b": torch.arange(7, dtype=torch.bfloat16) + seed,
        "step": seed,
    }


def _equal(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict)
        assert a.keys() == b.keys()
        for k in a:
            _equal(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    elif isinstance(a, list | tuple):
        assert type(a) is type(b)
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _equal(x, y)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray)
        assert a.dtype == b.dtype
        assert a.tobytes() == b.tobytes()
    else:
        assert a == b


def _same_checkpoint(src: Store, dst: Store, step: int) -> None:
    """The copy restores bitwise-identically, verifies, and its manifest is the source's bytes."""
    ms = ckpt.read_manifest(src.root, step, storage_options=src.opts)
    md = ckpt.read_manifest(dst.root, step, storage_options=dst.opts)
    assert md.to_json() == ms.to_json()
    _equal(
        ckpt.restore(src.root, step, storage_options=src.opts),
        ckpt.restore(dst.root, step, storage_options=dst.opts),
    )
    ckpt.verify(dst.root, step, storage_options=dst.opts).raise_if_failed()


def _dst_files(store: Store) -> set[str]:
    return {f.path for f in open_storage(store.root, store.opts).list_files()}


def _local(tmp_path: Path, name: str) -> Store:
    return Store("local", str(tmp_path / name))


# --- planning (pure) -------------------------------------------------------------------------------


def _m(step: int, files: dict[str, tuple[int, int]], attempt: str = "a") -> Manifest:
    return Manifest(
        step=step, attempt=attempt, created="now", world_size=1, block_bytes=1 << 20,
        files={p: FileEntry(s, c) for p, (s, c) in files.items()}, tensors={}, objects={}, tree={},
    )  # fmt: skip


def test_plan_copies_missing_checks_present_and_replaces_wrong_sizes() -> None:
    m = _m(5, {"data/x/0": (100, 1), "data/x/1": (200, 2), "data/x/2": (300, 3)})
    plan = plan_copy([m], {"data/x/1": 200, "data/x/2": 299, "other": 5}, {})
    assert plan.commit == (5,)
    assert plan.present == ()
    assert plan.tasks == (
        FileTask("data/x/0", 100, 1, 5, "copy"),
        FileTask("data/x/1", 200, 2, 5, "check"),
        FileTask("data/x/2", 300, 3, 5, "replace"),
    )
    assert plan.needs[5] == ("data/x/0", "data/x/1", "data/x/2")
    assert plan.bytes_to_copy == 400
    assert plan.bytes_to_check == 200
    unchecked = plan_copy([m], {"data/x/1": 200}, {}, check_existing=False)
    assert [t.action for t in unchecked.tasks] == ["copy", "skip", "copy"]


def test_plan_shares_files_of_older_steps_once() -> None:
    old = _m(1, {"data/1/0": (10, 1)})
    new = _m(2, {"data/1/0": (10, 1), "data/2/0": (20, 2)})
    plan = plan_copy([new, old], {}, {})
    assert plan.commit == (1, 2)
    assert [(t.path, t.step) for t in plan.tasks] == [("data/1/0", 1), ("data/2/0", 2)]
    assert plan.needs == {1: ("data/1/0",), 2: ("data/1/0", "data/2/0")}
    # only the newer step: its older file is still copied (self-contained destination)
    only = plan_copy([new], {}, {})
    assert [(t.path, t.step) for t in only.tasks] == [("data/1/0", 2), ("data/2/0", 2)]


def test_plan_present_identical_is_a_no_op_and_different_is_refused() -> None:
    m1, m2 = _m(1, {"data/1/0": (10, 1)}), _m(2, {"data/2/0": (10, 2)})
    plan = plan_copy([m1, m2], {}, {1: m1.to_json()})
    assert plan.present == (1,)
    assert plan.commit == (2,)
    assert [t.path for t in plan.tasks] == ["data/2/0"]
    other = _m(1, {"data/1/0": (10, 1)}, attempt="b")
    with pytest.raises(ckpt.CheckpointExistsError, match="step 1 is already committed"):
        plan_copy([m1, m2], {}, {1: other.to_json()})


def test_plan_refuses_manifests_that_disagree_on_a_file() -> None:
    a, b = _m(1, {"data/1/0": (10, 1)}), _m(2, {"data/1/0": (10, 7)})
    with pytest.raises(ckpt.PlanError, match="data/1/0"):
        plan_copy([a, b], {}, {})


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="num_threads"):
        CopyOptions(num_threads=0)
    with pytest.raises(ValueError, match="max_bytes_per_s"):
        CopyOptions(max_bytes_per_s=0)


# --- copies between backends ---------------------------------------------------------------------


def test_local_to_local_all_steps(tmp_path: Path) -> None:
    src, dst = _local(tmp_path, "src"), _local(tmp_path, "dst")
    for step in (1, 2, 3):
        ckpt.save(src.root, make_state(step), step=step)
    seen: list[ckpt.Progress] = []
    r = ckpt.copy(src.root, dst.root, progress=seen.append)
    assert r.steps_copied == (1, 2, 3)
    assert r.steps_present == ()
    assert r.files_copied == 3
    assert r.files_skipped == 0
    assert r.bytes_copied == sum(ckpt.read_manifest(src.root, s).total_bytes for s in (1, 2, 3))
    assert seen[-1].bytes_done == r.bytes_copied
    for step in (1, 2, 3):
        _same_checkpoint(src, dst, step)
    assert ckpt.list_steps(dst.root) == [1, 2, 3]
    assert json.loads(Path(dst.root, "LATEST").read_text()) == {"step": 3}


@pytest.mark.s3
def test_local_to_s3_one_step(tmp_path: Path, s3_store: Store) -> None:
    src = _local(tmp_path, "src")
    for step in (1, 2):
        ckpt.save(src.root, _state(step), step=step, options=MANY_FILES)
    r = ckpt.copy(src.root, s3_store.root, [2], dst_storage_options=s3_store.opts,
                  options=CopyOptions(chunk_bytes=8192))  # fmt: skip
    assert r.steps_copied == (2,)
    assert r.files_copied == len(ckpt.read_manifest(src.root, 2).files) == 7
    assert ckpt.list_steps(s3_store.root, storage_options=s3_store.opts) == [2]
    _same_checkpoint(src, s3_store, 2)
    assert not any(p.startswith("data/000000000001-") for p in _dst_files(s3_store))


@pytest.mark.s3
def test_s3_to_local_several_steps(tmp_path: Path, s3_store: Store) -> None:
    for step in (1, 2, 3):
        ckpt.save(s3_store.root, _state(step), step=step, storage_options=s3_store.opts)
    dst = _local(tmp_path, "dst")
    r = ckpt.copy(s3_store.root, dst.root, [1, 3], src_storage_options=s3_store.opts)
    assert r.steps_copied == (1, 3)
    assert ckpt.list_steps(dst.root) == [1, 3]
    for step in (1, 3):
        _same_checkpoint(s3_store, dst, step)
    assert json.loads(Path(dst.root, "LATEST").read_text()) == {"step": 3}


def test_memory_to_local_and_missing_step(tmp_path: Path, memory_store: Store) -> None:
    ckpt.save(memory_store.root, _state(4), step=4)
    dst = _local(tmp_path, "dst")
    with pytest.raises(ckpt.CheckpointNotFoundError, match="step 5"):
        ckpt.copy(memory_store.root, dst.root, [4, 5])
    assert not Path(dst.root, manifest_path(4)).exists()  # a missing step fails before any copy
    r = ckpt.copy(memory_store.root, dst.root)
    assert r.steps_copied == (4,)
    _same_checkpoint(memory_store, dst, 4)
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.copy(str(tmp_path / "empty"), dst.root)


def _incremental(src: Store) -> Manifest:
    """Step 3 reuses step 1's file of ``w/t0`` and step 2's other files, as an incremental
    save would: its manifest points into two older attempts' data directories."""
    ckpt.save(src.root, _state(1), step=1, options=MANY_FILES)
    ckpt.save(src.root, _state(2), step=2, options=MANY_FILES)
    m1, m2 = ckpt.read_manifest(src.root, 1), ckpt.read_manifest(src.root, 2)
    picked = {k: (m1 if k == "w/t0" else m2).tensors[k] for k in m2.tensors}
    tensors = {k: TensorEntry.of(t.dtype, t.shape, list(t.shards)) for k, t in picked.items()}
    files = {p: m2.files[p] for k in tensors for p in tensors[k].shards.used_paths() if p in m2.files}
    files.update({p: m1.files[p] for p in m1.tensors["w/t0"].shards.used_paths()})
    m3 = Manifest(
        step=3, attempt=uuid.uuid4().hex[:16], created=m2.created, world_size=1,
        block_bytes=m2.block_bytes, files=files, tensors=tensors, objects=m2.objects, tree=m2.tree,
    )  # fmt: skip
    assert open_storage(src.root).put_if_absent(manifest_path(3), m3.to_json(), fsync=False)
    return ckpt.read_manifest(src.root, 3)


def test_incremental_step_is_copied_self_contained(tmp_path: Path) -> None:
    src, dst = _local(tmp_path, "src"), _local(tmp_path, "dst")
    m3 = _incremental(src)
    assert {p.split("/")[1][:12] for p in m3.files} == {"000000000001", "000000000002"}
    ckpt.verify(src.root, 3).raise_if_failed()
    r = ckpt.copy(src.root, dst.root, [3])
    assert r.steps_copied == (3,)
    assert r.files_copied == len(m3.files)
    assert _dst_files(dst) == {*m3.files, manifest_path(3), "LATEST"}  # nothing else of steps 1, 2
    _same_checkpoint(src, dst, 3)
    restored = ckpt.restore(dst.root, 3)
    assert torch.equal(restored["w"]["t0"], _state(1)["w"]["t0"])
    assert torch.equal(restored["w"]["t1"], _state(2)["w"]["t1"])
    # then the older steps: step 1's shared file is already there (checked, skipped)
    r = ckpt.copy(src.root, dst.root)
    assert r.steps_copied == (1, 2)
    assert r.steps_present == (3,)
    assert r.files_skipped == len(m3.files)
    assert r.files_copied == 14 - len(m3.files)
    for step in (1, 2, 3):
        _same_checkpoint(src, dst, step)


# --- verification on the way ---------------------------------------------------------------------


def _flip(root: str, rel: str, offset: int) -> None:
    with open(os.path.join(root, rel), "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("dst_kind", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_corrupt_source_block_is_refused_naming_file_and_key(
    tmp_path: Path, dst_kind: str, request: pytest.FixtureRequest
) -> None:
    src = _local(tmp_path, "src")
    dst: Store = _local(tmp_path, "dst") if dst_kind == "local" else request.getfixturevalue("s3_store")
    m = ckpt.save(src.root, _state(1, numel=64 * 1024), step=1)
    shard = m.tensors["w/t3"].shards[0]
    _flip(src.root, shard.file, shard.byte_range.start + 1000)
    with pytest.raises(ckpt.ChecksumMismatchError) as info:
        ckpt.copy(src.root, dst.root, dst_storage_options=dst.opts, options=CopyOptions(chunk_bytes=64 * 1024))
    assert shard.file in str(info.value)
    assert "'w/t3'" in str(info.value)  # the block check caught it (before the file's crc32c)
    assert ckpt.list_steps(dst.root, storage_options=dst.opts) == []
    assert shard.file not in _dst_files(dst)  # the write was aborted: nothing published
    if dst_kind == "s3":
        assert open_storage(dst.root, dst.opts).multipart_uploads() == []


def test_corrupt_source_header_is_caught_by_the_file_crc(tmp_path: Path) -> None:
    src, dst = _local(tmp_path, "src"), _local(tmp_path, "dst")
    m = ckpt.save(src.root, _state(1), step=1)
    (path,) = m.files
    head = Path(src.root, path).read_bytes()[:200]
    at = head.index(b'"format"') + 2  # a byte of the header's JSON, outside every shard's blocks
    _flip(src.root, path, at)
    with pytest.raises(ckpt.ChecksumMismatchError, match="crc32c of the file") as info:
        ckpt.copy(src.root, dst.root)
    assert path in str(info.value)
    assert not Path(dst.root, manifest_path(1)).exists()
    assert not Path(dst.root, path).exists()


def test_truncated_source_is_refused(tmp_path: Path) -> None:
    src, dst = _local(tmp_path, "src"), _local(tmp_path, "dst")
    m = ckpt.save(src.root, _state(1), step=1)
    (path,) = m.files
    os.truncate(os.path.join(src.root, path), m.files[path].size - 10)
    with pytest.raises(ckpt.ShardSizeMismatchError, match=path):
        ckpt.copy(src.root, dst.root)
    assert ckpt.list_steps(dst.root) == []


# --- commit rules --------------------------------------------------------------------------------


def test_identical_destination_is_a_no_op(tmp_path: Path) -> None:
    src, dst = _local(tmp_path, "src"), _local(tmp_path, "dst")
    ckpt.save(src.root, _state(1), step=1)
    ckpt.copy(src.root, dst.root)
    before = {p: os.stat(os.path.join(dst.root, p)).st_mtime_ns for p in _dst_files(dst)}
    r = ckpt.copy(src.root, dst.root)
    assert r.steps_copied == ()
    assert r.steps_present == (1,)
    assert (r.files_copied, r.files_skipped, r.bytes_copied, r.bytes_checked) == (0, 0, 0, 0)
    assert {p: os.stat(os.path.join(dst.root, p)).st_mtime_ns for p in _dst_files(dst)} == before


def test_destination_with_another_checkpoint_of_the_step_is_refused(tmp_path: Path) -> None:
    src, dst = _local(tmp_path, "src"), _local(tmp_path, "dst")
    ckpt.save(src.root, _state(1), step=1)
    ckpt.save(src.root, _state(2), step=2)
    ckpt.save(dst.root, _state(9), step=2)
    before = _dst_files(dst)
    with pytest.raises(ckpt.CheckpointExistsError, match="step 2"):
        ckpt.copy(src.root, dst.root)
    assert _dst_files(dst) == before  # refused before anything was copied, step 1 included


def test_latest_only_moves_forward(tmp_path: Path) -> None:
    src, dst = _local(tmp_path, "src"), _local(tmp_path, "dst")
    ckpt.save(src.root, _state(1), step=1)
    ckpt.save(dst.root, _state(5), step=5)
    ckpt.copy(src.root, dst.root)
    assert json.loads(Path(dst.root, "LATEST").read_text()) == {"step": 5}
    assert ckpt.latest_step(dst.root) == 5


# --- resuming ------------------------------------------------------------------------------------


def test_rerun_copies_only_what_is_missing(tmp_path: Path) -> None:
    src, dst = _local(tmp_path, "src"), _local(tmp_path, "dst")
    m = ckpt.save(src.root, _state(1), step=1, options=MANY_FILES)
    paths = sorted(m.files)
    assert len(paths) == 7
    ckpt.copy(src.root, dst.root)
    # as an interrupted copy leaves it: no manifest, a file missing, one cut short, one damaged
    os.unlink(os.path.join(dst.root, manifest_path(1)))
    os.unlink(os.path.join(dst.root, paths[0]))
    os.truncate(os.path.join(dst.root, paths[1]), 100)
    _flip(dst.root, paths[2], m.files[paths[2]].size - 1)
    r = ckpt.copy(src.root, dst.root)
    assert r.steps_copied == (1,)
    assert (r.files_copied, r.files_replaced, r.files_skipped) == (3, 2, 4)
    assert r.bytes_checked == sum(m.files[p].size for p in paths[2:])
    _same_checkpoint(src, dst, 1)
    # without the crc32c check, a file of the right size is trusted
    os.unlink(os.path.join(dst.root, manifest_path(1)))
    r = ckpt.copy(src.root, dst.root, options=CopyOptions(check_existing=False))
    assert (r.files_copied, r.files_skipped, r.bytes_checked) == (0, 7, 0)


def test_a_damaged_file_of_a_committed_destination_step_is_never_replaced(tmp_path: Path) -> None:
    src, dst = _local(tmp_path, "src"), _local(tmp_path, "dst")
    _incremental(src)
    ckpt.copy(src.root, dst.root, [1])
    m1 = ckpt.read_manifest(src.root, 1)
    shared = next(iter(m1.tensors["w/t0"].shards.used_paths()))
    _flip(dst.root, shared, m1.files[shared].size - 1)
    with pytest.raises(ckpt.ChecksumMismatchError, match="committed checkpoint at the destination"):
        ckpt.copy(src.root, dst.root, [3])
    assert Path(dst.root, shared).exists()
    assert ckpt.list_steps(dst.root) == [1]


def test_killed_cp_resumes_copying_only_the_missing_files(tmp_path: Path) -> None:
    src, dst = _local(tmp_path, "src"), _local(tmp_path, "dst")
    m = ckpt.save(src.root, _state(1, n=24, numel=64 * 1024), step=1, options=MANY_FILES)
    total = len(m.files)
    assert total == 25
    cmd = [sys.executable, "-m", "ckpt", "cp", src.root, dst.root, "--json", "--quiet"]
    # 25 files of 256 KiB at 2 MiB/s, one at a time, 64 KiB per write: about 3 s
    slow = subprocess.Popen([*cmd, "--threads", "1", "--chunk-size", "64KiB", "--limit-rate", "2MiB"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    def complete() -> int:
        return sum(
            os.path.exists(p := os.path.join(dst.root, rel)) and os.path.getsize(p) == f.size
            for rel, f in m.files.items()
        )

    deadline = time.monotonic() + 60
    while complete() < 5 and time.monotonic() < deadline and slow.poll() is None:
        time.sleep(0.01)
    slow.send_signal(signal.SIGKILL)
    slow.communicate()
    assert slow.returncode == -signal.SIGKILL
    done = complete()
    assert 5 <= done < total
    assert not Path(dst.root, manifest_path(1)).exists()  # the step does not exist yet
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["steps_copied"] == [1]
    assert report["files_skipped"] == done
    assert report["files_copied"] == total - done
    assert report["files_replaced"] <= 1  # the file cut short by the kill, if any
    assert report["bytes_checked"] == done * m.files[sorted(m.files)[1]].size
    _same_checkpoint(src, dst, 1)


# --- the command line ----------------------------------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_cp_json_steps_and_quiet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = _local(tmp_path, "src"), _local(tmp_path, "dst")
    for step in (1, 2, 3):
        ckpt.save(src.root, _state(step), step=step)
    rc, out, err = _run(capsys, "cp", f"{src.root}@1", dst.root, "--step", "3", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert set(doc) == {"src", "dst", "steps_copied", "steps_present", "files_copied", "files_skipped",
                        "files_replaced", "bytes_copied", "bytes_checked", "seconds", "mb_per_s"}  # fmt: skip
    assert doc["steps_copied"] == [1, 3]
    assert doc["files_copied"] == 2
    assert doc["bytes_copied"] == sum(ckpt.read_manifest(src.root, s).total_bytes for s in (1, 3))
    assert doc["mb_per_s"] > 0
    assert ckpt.list_steps(dst.root) == [1, 3]
    rc, out, err = _run(capsys, "cp", src.root, dst.root, "-q")
    assert rc == 0
    assert "copied step 2" in out
    assert "already at the destination (identical manifest): steps 1, 3" in out
    assert err == ""
    _same_checkpoint(src, dst, 2)


def test_cli_cp_errors_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = _local(tmp_path, "src"), _local(tmp_path, "dst")
    m = ckpt.save(src.root, _state(1), step=1)
    rc, out, err = _run(capsys, "cp", f"{src.root}@7", dst.root, "--json")
    assert (rc, out) == (3, "")
    assert "step 7" in err
    rc, _, err = _run(capsys, "cp", src.root, dst.root, "--chunk-size", "lots")
    assert rc == 2
    (path,) = m.files
    _flip(src.root, path, m.files[path].size - 1)
    rc, out, err = _run(capsys, "cp", src.root, dst.root, "--json")
    assert (rc, out) == (1, "")
    assert path in err
    assert "ckpt: error:" in err
    ckpt.save(dst.root, _state(2), step=1)
    rc, out, err = _run(capsys, "cp", src.root, dst.root)
    assert rc == 4
    assert "already committed" in err


@pytest.mark.s3
def test_cli_cp_to_s3_with_per_side_options(
    tmp_path: Path, s3_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    src, back = _local(tmp_path, "src"), _local(tmp_path, "back")
    ckpt.save(src.root, _state(1), step=1)
    dst_opts = [f"--dst-opt={k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in s3_store.opts.items()]
    src_opts = [a.replace("--dst-opt", "--src-opt") for a in dst_opts]
    rc, out, err = _run(capsys, "cp", src.root, s3_store.root, "--json", *dst_opts)
    assert rc == 0, err
    assert json.loads(out)["steps_copied"] == [1]
    assert s3_store.opts["secret"] not in out + err
    rc, out, err = _run(capsys, "cp", s3_store.root, back.root, "--json", *src_opts)
    assert rc == 0, err
    _same_checkpoint(src, back, 1)
    _same_checkpoint(s3_store, back, 1)
