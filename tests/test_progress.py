"""``progress=`` on save, restore, verify and copy, and ckpt's INFO lines at the boundaries."""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.progress import FileCounter, Meter, Progress
from tests.conftest import Store

MiB = 1 << 20


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}": torch.randn(256, 1024, generator=g) for i in range(6)} | {"step": 3}  # 6 MiB


class Seen:
    def __init__(self) -> None:
        self.records: list[Progress] = []
        self._lock = threading.Lock()

    def __call__(self, p: Progress) -> None:
        with self._lock:
            self.records.append(p)

    def check(self, op: str, phases: list[str], bytes_total: int, files_total: int) -> None:
        r = self.records
        assert r, "no progress reported"
        assert {p.op for p in r} == {op}
        got = [p.phase for i, p in enumerate(r) if i == 0 or p.phase != r[i - 1].phase]
        assert got == phases
        done = [p.bytes_done for p in r]
        assert done == sorted(done), "bytes_done went backwards"
        assert [p.files_done for p in r] == sorted(p.files_done for p in r)
        assert all(p.bytes_done <= p.bytes_total for p in r if p.phase != "done")
        last = r[-1]
        assert (last.bytes_done, last.bytes_total) == (bytes_total, bytes_total)
        assert (last.files_done, last.files_total) == (files_total, files_total)
        assert len(r) > 3  # reported as the bytes moved, not only at the end


def test_save_restore_verify_copy_report_monotone_progress_ending_at_the_total(store: Store, tmp_path: Path) -> None:
    opts = ckpt.SaveOptions(parallel_files=2, min_file_bytes=1 * MiB, block_bytes=1 * MiB)
    seen = Seen()
    m = ckpt.save(store.root, _state(), step=7, options=opts, storage_options=store.opts, progress=seen)
    on_disk = sum(f.size for f in m.files.values())
    seen.check("save", ["write", "commit", "done"], on_disk, len(m.files))
    assert {p.step for p in seen.records} == {7}

    seen = Seen()
    back = ckpt.restore(store.root, storage_options=store.opts, progress=seen)
    assert torch.equal(back["layer5"], _state()["layer5"])
    # what the reads cover: every tensor's bytes (the headers are not read)
    tensor_bytes = sum(t.numel() * 4 for k, t in _state().items() if isinstance(t, torch.Tensor))
    assert seen.records[-1].bytes_total >= tensor_bytes
    seen.check("restore", ["read", "done"], seen.records[-1].bytes_total, len(m.files))

    seen = Seen()
    assert ckpt.verify(store.root, storage_options=store.opts, progress=seen).ok
    seen.check("verify", ["check", "done"], on_disk, len(m.files))

    seen = Seen()
    ckpt.copy(store.root, tmp_path / "copy", src_storage_options=store.opts, progress=seen)
    seen.check("copy", ["copy", "done"], on_disk, len(m.files))


def test_a_restarted_file_is_not_counted_twice() -> None:
    got: list[Progress] = []
    meter = Meter("save", got.append)
    meter.phase("write", bytes_total=30, files_total=1)
    counter = FileCounter(meter)
    for end in (10, 20, 5, 10, 20, 30):  # the upload started over after 20 bytes
        counter.seen(end)
    assert [p.bytes_done for p in got] == [0, 10, 20, 30]


def test_progress_true_draws_a_bar_on_stderr(local_store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt.save(local_store.root, _state(), step=1, progress=True)
    ckpt.restore(local_store.root, progress=True)
    err = capsys.readouterr().err
    assert "save step 1" in err
    assert "restore step 1" in err


def test_one_info_line_per_boundary(local_store: Store, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ckpt"):
        ckpt.save(local_store.root, _state(), step=2)
        ckpt.restore(local_store.root)
    lines = [(r.name, r.getMessage()) for r in caplog.records if r.name.startswith("ckpt")]
    assert [n for n, _ in lines] == ["ckpt.save", "ckpt.save", "ckpt.save", "ckpt.restore"], lines
    begin, wrote, committed, restored = (msg for _, msg in lines)
    assert "step 2: attempt" in begin
    assert "begins (1 writer)" in begin
    assert "rank 0 wrote" in wrote
    assert "MiB in" in wrote
    assert "/s)" in wrote
    assert "step 2 committed: 2 tensors" not in committed  # 6 tensors
    assert "step 2 committed: 6 tensors" in committed
    assert "restored step 2 from" in restored
    assert "/s)" in restored


@pytest.mark.s3
def test_the_final_record_and_the_managers_stats_carry_the_calls_retries(s3_endpoint: str) -> None:
    """Per call, not a module global: a 503 SlowDown injected on the first data PUT of a save
    shows in that save's final Progress record and in the manager's SaveStats, and a later save
    without faults reports none."""
    import fsspec

    from ckpt.testing.fault_proxy import Fault, FaultProxy

    with FaultProxy(s3_endpoint) as proxy:
        opts = {"key": "testing-key", "secret": "testing-secret", "endpoint_url": proxy.url, "skip_instance_cache": True}
        bucket = f"ckpt-progress-{uuid.uuid4().hex[:8]}"
        fsspec.filesystem("s3", **opts).call_s3("create_bucket", Bucket=bucket)
        root = f"s3://{bucket}/run"
        proxy.faults = [Fault("slowdown", method="PUT", path="/data/", nth=1)]
        seen = Seen()
        ckpt.save(root, _state(), step=1, storage_options=opts, progress=seen)
        done = seen.records[-1]
        assert done.phase == "done"
        assert done.seconds > 0
        assert sum(done.retries.values()) == 1, done.retries
        assert any("SlowDown" in k for k in done.retries), done.retries

        mgr = ckpt.CheckpointManager(root, ckpt.ManagerOptions(async_save=False), storage_options=opts)
        proxy.faults = [Fault("slowdown", method="PUT", path="/data/", nth=1)]
        mgr.save(2, _state(), force=True)
        assert mgr.last_save is not None
        assert sum(mgr.last_save.retries.values()) == 1, mgr.last_save.retries
        proxy.faults = []
        mgr.save(3, _state(), force=True)
        assert dict(mgr.last_save.retries) == {}  # this call's, not the process's
        mgr.close()
