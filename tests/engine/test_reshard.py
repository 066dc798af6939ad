"""N writers -> M readers: shards saved under one layout, restored under another, reading only
the bytes each reader needs. Ranks are simulated in one process (write_shards per rank, then one
commit); DTensor and real processes are covered in test_spmd.py and test_ray.py."""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest
import torch

import ckpt
from ckpt.engine.owners import chunk
from ckpt.testing import Recorder
from tests.lifecycle.test_save_restore import ALL_DTYPES, _random


def _root() -> tuple[str, dict[str, Any], Recorder]:
    rec = Recorder()
    return f"faulty://reshard-{uuid.uuid4().hex[:8]}/run", {"target_protocol": "memory", "recorder": rec}, rec


def _row_shard(t: torch.Tensor, n: int, i: int, dim: int = 0) -> ckpt.Shard:
    off, length = chunk(t.shape[dim], n, i)
    offsets = tuple(off if d == dim else 0 for d in range(t.ndim))
    return ckpt.Shard(t.narrow(dim, off, length).clone(), tuple(t.shape), offsets)


def _save_sharded(root: str, opts: dict[str, Any], full: dict[str, torch.Tensor], n: int, dim: int = 0,
                  block_bytes: int = 4096) -> ckpt.Manifest:  # fmt: skip
    a = ckpt.begin(root, step=1, world_size=n, options=ckpt.SaveOptions(block_bytes=block_bytes), storage_options=opts)
    reports = [
        ckpt.write_shards(a, {k: _row_shard(t, n, r, dim) for k, t in full.items()}, rank=r, storage_options=opts)
        for r in range(n)
    ]
    return ckpt.commit(a, reports, storage_options=opts)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": torch.randn(103, 17, generator=g),  # sizes that divide nothing
        "w": torch.randn(64, 48, generator=g).to(torch.bfloat16),
        "bias": torch.randn(29, generator=g),
        "counts": torch.randint(0, 1000, (37, 5), generator=g),
    }


def _data_bytes(rec: Recorder) -> tuple[int, int]:
    reads = [c for c in rec.calls_of("cat_file") if "/data/" in c.path]
    return len(reads), sum(c.end - c.start for c in reads)  # type: ignore[operator]


@pytest.mark.parametrize(("n", "m"), [(1, 4), (4, 1), (4, 3), (2, 8), (3, 5)])
def test_n_writers_to_m_readers(n: int, m: int) -> None:
    root, opts, rec = _root()
    full = _state()
    man = _save_sharded(root, opts, full, n)
    assert man.world_size == n
    assert {len(t.shards) for t in man.tensors.values()} <= {n}
    for r in range(m):
        target = {k: ckpt.Shard.empty(tuple(t.shape), *_region(t, m, r), t.dtype) for k, t in full.items()}
        rec.clear()
        back = ckpt.restore(root, target=target, storage_options=opts, options=ckpt.RestoreOptions(verify=False))
        minimum = 0
        for k, t in full.items():
            s = back[k]
            assert s is target[k]
            off, _ = _region(t, m, r)
            assert torch.equal(s.tensor, t.narrow(0, off[0], s.sizes[0]))
            minimum += s.tensor.numel() * s.tensor.element_size()
        num_reads, nbytes = _data_bytes(rec)
        assert nbytes >= minimum
        assert nbytes <= 1.10 * minimum + num_reads * ckpt.RestoreOptions().gap_bytes(local=False)


def _region(t: torch.Tensor, m: int, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    off, length = chunk(t.shape[0], m, r)
    return (off, *([0] * (t.ndim - 1))), (length, *t.shape[1:])


def test_rows_to_columns_reads_only_needed_bytes_with_verification() -> None:
    root, opts, rec = _root()
    g = torch.Generator().manual_seed(3)
    full = {"w": torch.randn(256, 256, generator=g)}  # 256 KiB, rows of 1 KiB
    _save_sharded(root, opts, full, 4, dim=0, block_bytes=1024)
    for r in range(2):
        off, length = chunk(256, 2, r)
        target = {"w": ckpt.Shard.empty((256, 256), (0, off), (256, length), torch.float32)}
        rec.clear()
        ckpt.restore(root, target=target, storage_options=opts)
        assert torch.equal(target["w"].tensor, full["w"][:, off : off + length])
        _, nbytes = _data_bytes(rec)
        # with 1 KiB blocks (one row each), verification reads whole rows: 2x the half-columns
        assert nbytes == 256 * 1024
    rec.clear()
    target = {"w": ckpt.Shard.empty((256, 256), (0, 0), (256, 128), torch.float32)}
    ckpt.restore(root, target=target, storage_options=opts, options=ckpt.RestoreOptions(verify=False, max_gap_bytes=0))
    num_reads, nbytes = _data_bytes(rec)
    assert nbytes == 256 * 128 * 4
    assert num_reads == 256  # one run per row


def test_columns_to_rows_and_whole() -> None:
    root, opts, _ = _root()
    full = _state(5)
    _save_sharded(root, opts, {k: v for k, v in full.items() if v.ndim == 2}, 3, dim=1)
    back = ckpt.restore(root, storage_options=opts)
    for k in ("emb", "w", "counts"):
        assert torch.equal(back[k], full[k])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_reshards(dtype: torch.dtype) -> None:
    root, opts, _ = _root()
    full = {"x": _random(dtype, (11, 6), 7)}
    _save_sharded(root, opts, full, 3)
    for r in range(2):
        target = {"x": ckpt.Shard.empty((11, 6), *_region(full["x"], 2, r), dtype)}
        ckpt.restore(root, target=target, storage_options=opts)
        off = _region(full["x"], 2, r)[0][0]
        got = target["x"].tensor
        assert torch.equal(got.view(torch.uint8), full["x"][off : off + got.shape[0]].contiguous().view(torch.uint8))


def test_replicated_plain_tensors_written_once_and_balanced() -> None:
    """DDP: every rank holds the same tensors; each byte is written exactly once and the bytes
    per writer are within 10% of an even split."""
    root, opts, rec = _root()
    g = torch.Generator().manual_seed(0)
    sizes = [1000, 3000, 500, 7000, 2500, 1200, 800, 6000, 4000, 3300, 900, 2100, 5000, 1500, 700, 2600]
    full = {f"layer{i}.weight": torch.randn(s, 8, generator=g) for i, s in enumerate(sizes)}
    world = 4
    a = ckpt.begin(root, step=1, world_size=world, options=ckpt.SaveOptions(split_bytes=64 << 10), storage_options=opts)
    rec.clear()
    reports = [ckpt.write_shards(a, dict(full), rank=r, plain_tensors="replicated", storage_options=opts) for r in range(world)]
    per_rank = [sum(f["size"] for f in rep["files"].values()) for rep in reports]
    payload = [sum(math.prod(s["sizes"]) * 4 for s in rep["shards"]) for rep in reports]
    total = sum(t.numel() * 4 for t in full.values())
    assert sum(payload) == total  # every replicated byte written exactly once
    written = sum(c.nbytes for c in rec.calls_of("pipe_file") if c.nbytes)
    assert written == sum(per_rank)
    assert max(payload) <= 1.10 * total / world
    assert min(payload) >= 0.90 * total / world
    man = ckpt.commit(a, reports, storage_options=opts)
    back = ckpt.restore(root, storage_options=opts)
    assert all(torch.equal(back[k], v) for k, v in full.items())
    assert len({s.file for t in man.tensors.values() for s in t.shards}) == world


def test_one_huge_replicated_tensor_is_split_across_holders() -> None:
    root, opts, _ = _root()
    full = {"emb": torch.randn(1000, 64)}  # 250 KiB
    a = ckpt.begin(root, step=1, world_size=4, options=ckpt.SaveOptions(split_bytes=16 << 10), storage_options=opts)
    reports = [ckpt.write_shards(a, dict(full), rank=r, plain_tensors="replicated", storage_options=opts) for r in range(4)]
    assert [len(rep["shards"]) for rep in reports] == [1, 1, 1, 1]
    ckpt.commit(a, reports, storage_options=opts)
    assert torch.equal(ckpt.restore(root, storage_options=opts)["emb"], full["emb"])


def test_shard_replicas_are_written_once() -> None:
    """2-way tensor parallel x 2-way data parallel with ckpt.Shard and replica_ranks."""
    root, opts, _ = _root()
    t = torch.randn(10, 4)
    a = ckpt.begin(root, step=1, world_size=4, storage_options=opts)
    reports = []
    for r in range(4):
        tp = r % 2
        s = _row_shard(t, 2, tp)
        shard = ckpt.Shard(s.tensor, s.global_shape, s.offsets, replica_ranks=(tp, tp + 2))
        reports.append(ckpt.write_shards(a, {"t": shard, f"rng{r}": r}, rank=r, storage_options=opts))
    assert sum(len(rep["shards"]) for rep in reports) == 2
    ckpt.commit(a, reports, storage_options=opts)
    back = ckpt.restore(root, storage_options=opts)
    assert torch.equal(back["t"], t)
    assert [back[f"rng{r}"] for r in range(4)] == [0, 1, 2, 3]  # per-rank objects merged


def test_pipeline_stages_with_different_plain_tensors_merge() -> None:
    root, opts, _ = _root()
    stages = [{"layers": {"0": torch.ones(3)}, "step": 7}, {"layers": {"1": torch.zeros(2)}, "step": 7}]
    a = ckpt.begin(root, step=1, world_size=2, storage_options=opts)
    reports = [ckpt.write_shards(a, s, rank=r, storage_options=opts) for r, s in enumerate(stages)]
    ckpt.commit(a, reports, storage_options=opts)
    back = ckpt.restore(root, storage_options=opts)
    assert list(back["layers"]) == ["0", "1"]
    assert back["step"] == 7


def test_replicated_assumption_violated_fails_loudly_naming_key() -> None:
    """A rank claims 'replicated' for a tensor only it holds: nobody else writes it, and the commit
    names the key instead of silently losing it."""
    root, opts, _ = _root()
    a = ckpt.begin(root, step=1, world_size=2, storage_options=opts)
    r0 = ckpt.write_shards(a, {"shared": torch.ones(4)}, rank=0, plain_tensors="replicated", storage_options=opts)
    r1 = ckpt.write_shards(a, {"shared": torch.ones(4), "only_mine": torch.ones(1000)}, rank=1,
                           plain_tensors="replicated", storage_options=opts)  # fmt: skip
    with pytest.raises(ckpt.PlanError, match=r"shared|only_mine"):
        ckpt.commit(a, [r0, r1], storage_options=opts)
    assert ckpt.list_steps(root, storage_options=opts) == []


def test_holders_from_an_exchange_dedup_exactly_the_shared_keys() -> None:
    """Ranks 0-2 share 'emb', ranks 0-1 share 'head', each rank has its own 'stage<r>': the
    describe/holders exchange makes every shared key a replica written once."""
    root, opts, _ = _root()
    emb, head = torch.randn(300, 8), torch.randn(50, 8)
    states = [
        {"emb": emb.clone(), "head": head.clone(), "stage0": torch.ones(3)},
        {"emb": emb.clone(), "head": head.clone(), "stage1": torch.ones(4)},
        {"emb": emb.clone(), "stage2": torch.ones(5)},
    ]
    who = ckpt.holders([ckpt.describe(s) for s in states])
    assert {k: h.ranks for k, h in who.items()} == {
        "emb": (0, 1, 2), "head": (0, 1), "stage0": (0,), "stage1": (1,), "stage2": (2,),
    }  # fmt: skip
    a = ckpt.begin(root, step=1, world_size=3, storage_options=opts)
    reports = [ckpt.write_shards(a, s, rank=r, plain_tensors=who, storage_options=opts) for r, s in enumerate(states)]
    written = [s["key"] for rep in reports for s in rep["shards"]]
    assert sorted(written) == ["emb", "head", "stage0", "stage1", "stage2"]
    ckpt.commit(a, reports, storage_options=opts)
    back = ckpt.restore(root, storage_options=opts)
    assert torch.equal(back["emb"], emb)
    assert torch.equal(back["head"], head)


def test_holders_refuse_disagreeing_replicas() -> None:
    with pytest.raises(ckpt.PlanError, match=r"'w': rank 0 holds F32 \[2\], rank 1 holds F32 \[3\]"):
        ckpt.holders([{"w": ["F32", [2]]}, {"w": ["F32", [3]]}])
