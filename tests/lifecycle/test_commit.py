"""The commit protocol on every backend: create-only manifest, racing committers, failed and
killed saves that leave nothing visible, lost-response retries."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Any

import pytest
import torch

import ckpt
from ckpt.lifecycle import commit as commit_mod
from ckpt.storage import open_storage
from ckpt.testing import Recorder, Rule
from tests.conftest import Store


def test_second_create_of_same_object_fails(store: Store) -> None:
    s = open_storage(store.root, store.opts)
    assert s.put_if_absent("steps/000000000001/manifest.json", b"one", fsync=True)
    assert not s.put_if_absent("steps/000000000001/manifest.json", b"two", fsync=True)
    assert s.read("steps/000000000001/manifest.json") == b"one"


def _race_worker(root: str, opts: dict[str, Any], attempt: ckpt.Attempt, barrier: Any, out: Any) -> None:
    report = ckpt.write_shards(attempt, {"who": torch.tensor([attempt.attempt.__hash__() % 1000])}, storage_options=opts)
    barrier.wait(timeout=60)
    try:
        ckpt.commit(attempt, [report], storage_options=opts)
        out.put(("won", attempt.attempt))
    except ckpt.CheckpointExistsError:
        out.put(("lost", attempt.attempt))


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_two_processes_racing_to_commit_one_wins(kind: str, request: pytest.FixtureRequest) -> None:
    store: Store = request.getfixturevalue(f"{kind}_store")
    ctx = mp.get_context("spawn")
    for trial in range(3):
        step = trial
        attempts = [ckpt.begin(store.root, step=step, storage_options=store.opts) for _ in range(2)]
        barrier, out = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_race_worker, args=(store.root, store.opts, a, barrier, out)) for a in attempts]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0
        results = sorted(out.get(timeout=5) for _ in procs)
        assert [r for r, _ in results] == ["lost", "won"]
        winner = next(a for r, a in results if r == "won")
        assert ckpt.read_manifest(store.root, step, storage_options=store.opts).attempt == winner
        ckpt.restore(store.root, step, storage_options=store.opts)  # the winner's data is intact


def test_lost_response_retry_is_our_own_commit(memory_store: Store) -> None:
    a = ckpt.begin(memory_store.root, step=5)
    report = ckpt.write_shards(a, {"x": torch.ones(3)})
    m = ckpt.commit(a, [report])
    storage = open_storage(memory_store.root)
    commit_mod.publish(storage, m, fsync=False, update_latest=False)  # the retry finds our attempt: fine
    b = ckpt.Attempt(a.root, a.step, "someoneelse", a.world_size, a.options)
    other = commit_mod.build_manifest(b, [{**report, "attempt": "someoneelse"}], created="x")
    with pytest.raises(ckpt.CheckpointExistsError, match="committed by attempt"):
        commit_mod.publish(storage, other, fsync=False, update_latest=False)


def test_begin_refuses_a_committed_step(store: Store) -> None:
    ckpt.save(store.root, {"x": torch.ones(1)}, step=3, storage_options=store.opts)
    with pytest.raises(ckpt.CheckpointExistsError, match="step 3"):
        ckpt.save(store.root, {"x": torch.zeros(1)}, step=3, storage_options=store.opts)
    assert ckpt.restore(store.root, storage_options=store.opts)["x"].item() == 1.0


@pytest.mark.parametrize("target", ["memory", pytest.param("s3", marks=pytest.mark.s3)])
@pytest.mark.parametrize("fail_on", ["data", "manifest"])
def test_save_failing_midway_leaves_nothing_visible(target: str, fail_on: str, request: pytest.FixtureRequest) -> None:
    rec = Recorder()
    if target == "s3":
        s3: Store = request.getfixturevalue("s3_store")
        opts: dict[str, Any] = {"target_protocol": "s3", "target_options": s3.opts, "recorder": rec}
        root = "faulty://" + s3.root.removeprefix("s3://")
    else:
        opts = {"target_protocol": "memory", "recorder": rec}
        root = f"faulty://fail-{uuid.uuid4().hex[:8]}/run"
    state = {f"t{i}": torch.randn(1000) for i in range(4)}
    save_opts = ckpt.SaveOptions(max_file_bytes=4000, num_threads=1)
    path = "/data/" if fail_on == "data" else "manifest.json"
    rec.rules.append(Rule("pipe_file", path_contains=path, error=OSError("injected"), skip=1 if fail_on == "data" else 0))
    with pytest.raises(ckpt.StorageError, match="injected"):
        ckpt.save(root, state, step=1, options=save_opts, storage_options=opts)
    assert ckpt.list_steps(root, storage_options=opts) == []
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.restore(root, storage_options=opts)
    rec.rules.clear()
    ckpt.save(root, state, step=1, options=save_opts, storage_options=opts)  # a retry of the step works
    assert torch.equal(ckpt.restore(root, storage_options=opts)["t3"], state["t3"])


def test_commit_refuses_incomplete_or_inconsistent_reports(memory_store: Store) -> None:
    a = ckpt.begin(memory_store.root, step=1, world_size=2)
    r0 = ckpt.write_shards(a, {"x": torch.ones(2)}, rank=0)
    with pytest.raises(ckpt.PlanError, match=r"ranks \[1\]"):
        ckpt.commit(a, [r0])
    r1 = ckpt.write_shards(a, {"x": torch.ones(2)}, rank=1)
    with pytest.raises(ckpt.PlanError, match="rank 0 and rank 1 both wrote"):
        ckpt.commit(a, [r0, r1])
    b = ckpt.begin(memory_store.root, step=1, world_size=2)
    b0 = ckpt.write_shards(b, {"x": torch.ones(2)}, rank=0)
    b1 = ckpt.write_shards(b, {"x": torch.ones(3)}, rank=1)
    with pytest.raises(ckpt.PlanError, match=r"rank 1 has F32 \[3\]"):
        ckpt.commit(b, [b0, b1])
    with pytest.raises(ckpt.PlanError, match="for step 1 attempt"):
        ckpt.commit(a, [r0, b1])
    with pytest.raises(ckpt.PlanError, match="reported twice"):
        ckpt.commit(a, [r0, r0])
    assert ckpt.list_steps(memory_store.root) == []


@pytest.mark.parametrize("how", ["save", "write_shards"])
def test_local_commit_fsyncs_shards_before_linking_the_manifest(
    local_store: Store, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def link(src: str, dst: str) -> None:
        events.append(("link", dst))
        real_link(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    state = {f"t{i}": torch.randn(1000) for i in range(8)}  # several files: every one must be synced
    opts = ckpt.SaveOptions(max_file_bytes=8000)
    if how == "save":
        ckpt.save(local_store.root, state, step=2, options=opts)
    else:
        a = ckpt.begin(local_store.root, step=2, options=opts)
        ckpt.commit(a, [ckpt.write_shards(a, state, rank=0)])
    kinds = [k for k, _ in events]
    link_at = kinds.index("link")
    synced_before = [p for k, p in events[:link_at] if k == "fsync"]
    shards = {os.path.join(d, f) for d, _, fs in os.walk(local_store.root) for f in fs if f.endswith(".safetensors")}
    assert len(shards) > 2
    assert shards <= set(synced_before)
    assert any(p.endswith("/data") for p in synced_before)
    assert any(".manifest.json." in p for p in synced_before)  # the temp manifest itself
    assert any(p.endswith("/steps/000000000002") for k, p in events[link_at:] if k == "fsync")


def test_a_failed_flush_of_a_shard_commits_nothing(local_store: Store) -> None:
    """The save flushes its files while it builds the manifest: a flush that fails must stop the
    commit (the manifest would name bytes a crash could lose)."""
    from ckpt.testing import wrap_storage

    rec = Recorder(rules=[Rule("sync_files", path_contains=".safetensors", error=OSError("injected fsync failure"))])
    state = {f"t{i}": torch.randn(1000) for i in range(8)}
    with wrap_storage(rec), pytest.raises(ckpt.StorageError, match="injected fsync failure"):
        ckpt.save(local_store.root, state, step=1, options=ckpt.SaveOptions(max_file_bytes=8000))
    assert rec.calls_of("sync_files")
    assert rec.calls_of("put_if_absent") == []
    assert ckpt.list_steps(local_store.root) == []
    ckpt.save(local_store.root, state, step=1)  # the step is free to save again
    assert torch.equal(ckpt.restore(local_store.root)["t7"], state["t7"])


def test_non_atomic_backend_needs_explicit_opt_in(tmp_path: Any) -> None:
    opts = {"target_protocol": "file", "target_options": {"auto_mkdir": True}}
    root = f"faulty://{tmp_path}/run"
    with pytest.raises(ckpt.PlanError, match="allow_non_atomic_commit"):
        ckpt.save(root, {"x": torch.ones(1)}, step=0, storage_options=opts)
    ckpt.save(root, {"x": torch.ones(1)}, step=0, storage_options=opts,
              options=ckpt.SaveOptions(allow_non_atomic_commit=True))  # fmt: skip
    assert ckpt.list_steps(root, storage_options=opts) == [0]


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch, ckpt
    root, step = sys.argv[1], int(sys.argv[2])
    g = torch.Generator().manual_seed(step)
    state = {f"t{i}": torch.randn(1 << 20, generator=g) for i in range(24)}
    print("ready", flush=True)
    ckpt.save(root, state, step=step, options=ckpt.SaveOptions(max_file_bytes=8 << 20, num_threads=2))
    print("saved", flush=True)
    """
)


def test_sigkill_during_save_never_leaves_a_partial_checkpoint(tmp_path: Any) -> None:
    """A real process saving ~100 MB is SIGKILLed at seeded random points: afterwards each step
    is either absent or restores completely."""
    import random

    rnd = random.Random(1234)
    root = str(tmp_path / "run")
    ckpt.save(root, {"t0": torch.zeros(1)}, step=0)
    committed = 0
    for step in range(1, 9):
        with subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, root, str(step)], stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rnd.uniform(0.0, 0.6))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        steps = ckpt.list_steps(root)
        assert steps[0] == 0
        if step in steps:
            committed += 1
            back = ckpt.restore(root, step)
            g = torch.Generator().manual_seed(step)
            assert all(torch.equal(back[f"t{i}"], torch.randn(1 << 20, generator=g)) for i in range(24))
        assert ckpt.latest_step(root) == max(steps)
    assert ckpt.restore(root, 0)["t0"].item() == 0.0
    print(f"sigkill trials: 8, committed before the kill: {committed}")
