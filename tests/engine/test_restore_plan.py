"""Restore planning (pure) and the requests restore really makes (recorded)."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
import torch

import ckpt
from ckpt.engine.restore_plan import Request, plan_restore
from ckpt.geometry import boxes as regions
from ckpt.options import MiB
from ckpt.testing import Recorder


def _faulty_root() -> tuple[str, dict[str, Any], Recorder]:
    rec = Recorder()
    return f"faulty://plan-{uuid.uuid4().hex[:8]}/run", {"target_protocol": "memory", "recorder": rec}, rec


def _whole(m: ckpt.Manifest, *keys: str) -> list[Request]:
    return [Request(k, regions.Box.whole(m.tensors[k].shape)) for k in keys]


def test_small_tensors_in_one_file_coalesce_into_one_read() -> None:
    root, opts, _ = _faulty_root()
    state = {f"t{i}": torch.randn(100) for i in range(20)}
    m = ckpt.save(root, state, step=0, storage_options=opts)
    plan = plan_restore(m, _whole(m, *state), verify=True, max_gap_bytes=MiB, read_chunk_bytes=32 * MiB)
    assert len(plan.reads) == 1
    assert plan.total_bytes == 20 * 100 * 4


def test_gap_larger_than_threshold_splits_reads() -> None:
    root, opts, _ = _faulty_root()
    state = {"a": torch.randn(10), "b": torch.randn(100_000), "c": torch.randn(10)}
    m = ckpt.save(root, state, step=0, storage_options=opts, options=ckpt.SaveOptions(block_bytes=64))
    plan = plan_restore(m, _whole(m, "a", "c"), verify=True, max_gap_bytes=1024, read_chunk_bytes=32 * MiB)
    assert len(plan.reads) == 2
    assert plan.total_bytes == 80  # only a and c: the 400 KB of b in between is skipped
    plan = plan_restore(m, _whole(m, "a", "c"), verify=True, max_gap_bytes=1 << 20, read_chunk_bytes=32 * MiB)
    assert len(plan.reads) == 1  # a small enough gap is read through


def test_large_tensor_is_split_into_block_aligned_chunks() -> None:
    root, opts, _ = _faulty_root()
    state = {"w": torch.randn(1 << 20)}  # 4 MiB
    m = ckpt.save(root, state, step=0, storage_options=opts, options=ckpt.SaveOptions(block_bytes=256 << 10))
    plan = plan_restore(m, _whole(m, "w"), verify=True, max_gap_bytes=0, read_chunk_bytes=MiB)
    assert len(plan.reads) == 4
    start = m.tensors["w"].shards[0].byte_range.start
    for r in plan.reads:
        assert (r.range.start - start) % (256 << 10) == 0
        assert len(r.checks) == 4
        assert len(r.copies) == 1  # each chunk lands straight in the destination


def test_partial_region_reads_whole_blocks_when_verifying() -> None:
    root, opts, _ = _faulty_root()
    state = {"w": torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)}
    m = ckpt.save(root, state, step=0, storage_options=opts, options=ckpt.SaveOptions(block_bytes=1024))
    rows = Request("w", regions.Box((10, 0), (2, 64)))  # bytes [2560, 3072) of the tensor
    verified = plan_restore(m, [rows], verify=True, max_gap_bytes=0, read_chunk_bytes=MiB)
    raw = plan_restore(m, [rows], verify=False, max_gap_bytes=0, read_chunk_bytes=MiB)
    assert raw.total_bytes == 2 * 64 * 4
    assert verified.total_bytes == 1024  # the one block holding rows 10-11
    col = Request("w", regions.Box((0, 5), (64, 1)))
    raw_col = plan_restore(m, [col], verify=False, max_gap_bytes=0, read_chunk_bytes=MiB)
    assert raw_col.total_bytes == 64 * 4
    assert len(raw_col.reads) == 64


def test_unknown_key_and_out_of_bounds_region_are_plan_errors() -> None:
    root, opts, _ = _faulty_root()
    m = ckpt.save(root, {"w": torch.zeros(4, 4)}, step=0, storage_options=opts)
    with pytest.raises(ckpt.PlanError, match="'nope'"):
        plan_restore(m, [Request("nope", regions.Box((0,), (1,)))], verify=True, max_gap_bytes=0, read_chunk_bytes=MiB)
    with pytest.raises(ckpt.PlanError, match="exceeds the saved shape"):
        plan_restore(m, [Request("w", regions.Box((3, 0), (2, 4)))], verify=True, max_gap_bytes=0, read_chunk_bytes=MiB)


def test_recorded_requests_subset_restore_reads_only_needed_bytes() -> None:
    root, opts, rec = _faulty_root()
    state = {"big": torch.randn(1 << 20), "small": torch.randn(16)}
    m = ckpt.save(root, state, step=0, storage_options=opts, options=ckpt.SaveOptions(block_bytes=64 << 10))
    rec.clear()
    back = ckpt.restore(root, target={"small": None}, storage_options=opts)
    assert torch.equal(back["small"], state["small"])
    data_reads = [c for c in rec.calls_of("cat_file") if "/data/" in c.path]
    assert len(data_reads) == 1
    (c,) = data_reads
    assert c.start is not None
    assert c.end is not None
    assert c.end - c.start == 64  # 16 float32: not a byte of "big"
    sr = m.tensors["small"].shards[0].byte_range
    assert (c.start, c.end) == (sr.start, sr.end)


def test_recorded_requests_full_restore_parallel_chunks() -> None:
    root, opts, rec = _faulty_root()
    state = {"w": torch.randn(4 << 20)}  # 16 MiB
    ckpt.save(root, state, step=0, storage_options=opts)
    rec.clear()
    ckpt.restore(root, storage_options=opts, options=ckpt.RestoreOptions(read_chunk_bytes=4 * MiB))
    data_reads = sorted((c.start, c.end) for c in rec.calls_of("cat_file") if "/data/" in c.path)
    assert len(data_reads) == 4
    assert all(e - s == 4 * MiB for s, e in data_reads)  # type: ignore[operator]


def test_local_restore_reads_straight_into_destination(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """preadv gets the destination tensor's own memory: no intermediate bytes object."""
    root = str(tmp_path / "run")
    state = {"w": torch.randn(1 << 18)}  # 1 MiB
    ckpt.save(root, state, step=0)
    dest = torch.zeros(1 << 18)
    lo, hi = dest.data_ptr(), dest.data_ptr() + dest.numel() * 4
    seen: list[tuple[int, int]] = []
    real = os.preadv

    def spy(fd: int, buffers: list[memoryview], offset: int) -> int:
        import numpy as np

        for b in buffers:
            seen.append((np.frombuffer(b, dtype=np.uint8).ctypes.data, len(b)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", spy)
    ckpt.restore(root, target={"w": dest})
    assert torch.equal(dest, state["w"])
    assert seen
    assert all(lo <= addr and addr + n <= hi for addr, n in seen)
    assert sum(n for _, n in seen) == dest.numel() * 4
