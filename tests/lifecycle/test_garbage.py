"""Garbage collection: the pure planner, then ``collect`` / ``ckpt gc`` on real backends."""

from __future__ import annotations

import os
import time

import pytest
import torch

import ckpt
from ckpt.cli import main
from ckpt.lifecycle import cleanup
from ckpt.storage import Listed, Upload, open_storage
from tests.conftest import Store

H = 3600.0
NOW = 1_000_000.0


def _f(path: str, age_h: float, size: int = 10) -> Listed:
    return Listed(path, size, NOW - age_h * H)


def test_unreferenced_attempts_go_only_when_their_newest_file_is_old() -> None:
    listed = [
        _f("steps/000000000001/manifest.json", 30),
        _f("data/000000000001-aaa/00000-0.safetensors", 30),  # committed
        _f("data/000000000002-bbb/00000-0.safetensors", 30),  # failed attempt, old
        _f("data/000000000002-bbb/00001-0.safetensors", 26),
        _f("data/000000000003-ccc/00000-0.safetensors", 30),  # in progress: one file is fresh
        _f("data/000000000003-ccc/00001-0.safetensors", 0.1),
        _f("LATEST", 30),
        _f("notes.txt", 300),  # not ckpt's
    ]
    referenced = {"steps/000000000001/manifest.json", "data/000000000001-aaa/00000-0.safetensors"}
    plan = cleanup.plan_gc(listed, [], referenced, now=NOW, grace_s=24 * H)
    assert plan.delete == ("data/000000000002-bbb/00000-0.safetensors", "data/000000000002-bbb/00001-0.safetensors")
    assert plan.delete_bytes == 20
    assert plan.too_recent == ("data/000000000003-ccc/00000-0.safetensors", "data/000000000003-ccc/00001-0.safetensors")


def test_temp_files_and_stale_uploads() -> None:
    listed = [
        _f("steps/000000000004/.manifest.json.0123456789abcdef0123456789abcdef.tmp", 25),
        _f(".LATEST.0123456789abcdef0123456789abcdef.tmp", 1),
        _f("steps/000000000005/manifest.json", 40),  # invalid or not: a manifest is never garbage
    ]
    uploads = [Upload("data/000000000006-x/00000-0.safetensors", "u1", NOW - 30 * H),
               Upload("data/000000000007-y/00000-0.safetensors", "u2", NOW - 1 * H)]  # fmt: skip
    plan = cleanup.plan_gc(listed, uploads, set(), now=NOW, grace_s=24 * H)
    assert plan.delete == ("steps/000000000004/.manifest.json.0123456789abcdef0123456789abcdef.tmp",)
    assert plan.too_recent == (".LATEST.0123456789abcdef0123456789abcdef.tmp",)
    assert [u.upload_id for u in plan.abort] == ["u1"]


def test_an_unreadable_manifest_blocks_data_collection() -> None:
    listed = [_f("data/000000000002-bbb/00000-0.safetensors", 100), _f("steps/000000000003/.x.0123456789abcdef0123456789abcdef.tmp", 100)]
    plan = cleanup.plan_gc(listed, [], set(), now=NOW, grace_s=H, unreadable=["steps/000000000009/manifest.json"])
    assert plan.delete == ("steps/000000000003/.x.0123456789abcdef0123456789abcdef.tmp",)
    assert plan.blocked_by == ("steps/000000000009/manifest.json",)


def _failed_attempt(store: Store, step: int) -> list[str]:
    """Leave the shard files of an attempt that never committed (a crash before the commit)."""
    a = ckpt.begin(store.root, step=step, storage_options=store.opts)
    rep = ckpt.write_shards(a, {"w": torch.ones(64)}, storage_options=store.opts)
    return sorted(rep["files"])


def test_collect_deletes_failed_attempts_and_keeps_every_checkpoint(store: Store) -> None:
    ckpt.save(store.root, {"w": torch.zeros(64)}, step=1, storage_options=store.opts)
    orphans = _failed_attempt(store, 2)
    st = open_storage(store.root, store.opts)
    assert all(st.exists(p) for p in orphans)
    young = cleanup.collect_garbage(st)  # default grace: a day; these files are seconds old
    assert young.delete == ()
    assert set(orphans) <= set(young.too_recent)
    dry = cleanup.collect_garbage(st, grace_s=0.0, now=time.time() + 1, dry_run=True)
    assert dry.delete == tuple(orphans)
    assert all(st.exists(p) for p in orphans)
    done = cleanup.collect_garbage(st, grace_s=0.0, now=time.time() + 1)
    assert done.delete == tuple(orphans)
    assert not any(st.exists(p) for p in orphans)
    assert ckpt.list_steps(store.root, storage_options=store.opts) == [1]
    assert ckpt.verify(store.root, 1, storage_options=store.opts).ok
    ckpt.save(store.root, {"w": torch.ones(64)}, step=2, storage_options=store.opts)  # the step is free


def test_ckpt_gc_cli(local_store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt.save(local_store.root, {"w": torch.zeros(64)}, step=1)
    orphans = _failed_attempt(local_store, 2)
    old = time.time() - 2 * 24 * H
    for p in orphans:
        os.utime(os.path.join(local_store.root, p), (old, old))
    assert main(["gc", local_store.root, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete 1 file" in out
    assert os.path.exists(os.path.join(local_store.root, orphans[0]))
    assert main(["gc", local_store.root]) == 0
    assert "deleted 1 file" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(local_store.root, os.path.dirname(orphans[0])))  # its directory too
    assert ckpt.verify(local_store.root, 1).ok




def test_files_that_are_not_ckpts_are_never_collected_nor_retired(store: Store) -> None:
    """A note in a step directory (with or without a manifest), a file of another name in an
    attempt directory, a dot-file that is not ckpt's temp name: gc and rm leave them, whatever
    their age."""
    ckpt.save(store.root, {"w": torch.zeros(64)}, step=1, storage_options=store.opts)
    m = ckpt.save(store.root, {"w": torch.ones(64)}, step=2, storage_options=store.opts)
    attempt_dir = os.path.dirname(next(iter(m.files)))
    st = open_storage(store.root, store.opts)
    theirs = [
        "steps/000000000005/notes.txt",  # a step directory without a manifest
        "steps/000000000001/notes.txt",  # beside a manifest
        f"{attempt_dir}/README.md",
        "data/000000000003-abc/weights.bin",
        "steps/000000000002/.notes.tmp",
    ]
    for p in theirs:
        st.put(p, b"mine", fsync=False)
    plan = cleanup.collect_garbage(st, grace_s=0.0, now=time.time() + 10 * 24 * H)
    assert not set(plan.delete) & set(theirs)
    assert all(st.exists(p) for p in theirs)
    cleanup.retire_steps(st, [1, 2])  # what `ckpt rm` and retention run
    assert ckpt.list_steps(store.root, storage_options=store.opts) == []
    assert all(st.exists(p) for p in theirs), [p for p in theirs if not st.exists(p)]
    assert not st.exists(next(iter(m.files)))  # ckpt's own data went


@pytest.mark.s3
def test_stale_multipart_uploads_under_the_root_are_aborted(s3_store: Store) -> None:
    st = open_storage(s3_store.root, s3_store.opts)
    bucket, key, _ = st.fs.split_path(st.path("data/000000000009-abc/00000-0.safetensors"))
    mine = st.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    other = st.fs.call_s3("create_multipart_upload", Bucket=bucket, Key="elsewhere/x")["UploadId"]  # not under the root
    assert [u.upload_id for u in st.multipart_uploads()] == [mine]
    # (moto reports a fixed Initiated time from 2010, so the grace period is exercised by the
    # pure planner's test above, not here)
    done = cleanup.collect_garbage(st, grace_s=0.0, now=time.time() + 1)
    assert [u.upload_id for u in done.abort] == [mine]
    assert st.multipart_uploads() == []
    left = st.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert [u["UploadId"] for u in left] == [other]  # outside the root: never touched


def test_retire_and_collect_take_a_root_like_save_and_verify(store: Store) -> None:
    """The public maintenance API has the shape of ``save``/``verify``: a root and
    ``storage_options``, no Storage object."""
    for step in (1, 2):
        ckpt.save(store.root, {"w": torch.full((64,), float(step))}, step=step, storage_options=store.opts)
    orphans = _failed_attempt(store, 3)
    done = ckpt.retire(store.root, [1], storage_options=store.opts)
    assert [r.step for r in done] == [1]
    assert isinstance(done[0], ckpt.Retired)
    assert done[0].files_deleted
    assert ckpt.list_steps(store.root, storage_options=store.opts) == [2]
    plan = ckpt.collect(store.root, grace_s=0.0, dry_run=True, storage_options=store.opts)
    assert isinstance(plan, ckpt.GcPlan)
    assert set(orphans) <= set(plan.delete)
    assert set(orphans) <= set(ckpt.collect(store.root, grace_s=0.0, storage_options=store.opts).delete)
    assert ckpt.verify(store.root, 2, storage_options=store.opts).ok
