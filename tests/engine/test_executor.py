"""The restore side of the executor on a local disk: a read made in pieces, each piece's blocks
checked as it lands (before the next piece is read), every block still checked, a flipped bit
anywhere in a multi-piece read still ChecksumMismatchError naming the file, key and block."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt.engine import executor
from ckpt.engine.restore_plan import Check, ReadOp, Request, plan_restore
from ckpt.errors import ChecksumMismatchError
from ckpt.geometry.boxes import Box
from ckpt.geometry.byte_ranges import ByteRange
from ckpt.storage import LocalStorage

MiB = 1 << 20
BLOCK = 64 << 10  # small blocks and pieces: a 3 MiB tensor is a read of many pieces
PIECE = 256 << 10


class RecordingDisk(LocalStorage):
    """The local backend, recording what each piece held when ``landed`` was called for it."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.landed: list[tuple[int, int, bool, bool]] = []  # (offset, size, filled, next untouched)

    def read_pieces(
        self, rel: str, start: int, pieces: Sequence[list[memoryview]], landed: Callable[[int], None]
    ) -> None:
        offsets = [start]
        for p in pieces:
            offsets.append(offsets[-1] + sum(len(b) for b in p))

        def spy(i: int) -> None:
            filled = all(any(b) for b in pieces[i] if len(b) >= 64)  # random data: no zero run of 64
            later = all(not any(b) for p in pieces[i + 1 :] for b in p)
            self.landed.append((offsets[i], offsets[i + 1] - offsets[i], filled, later))
            landed(i)

        super().read_pieces(rel, start, pieces, spy)


def _save(root: Path, numel: int = 3 * MiB // 4) -> torch.Tensor:
    t = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    ckpt.save(str(root), {"w": t}, step=1, options=ckpt.SaveOptions(block_bytes=BLOCK))
    return t


def _shard(root: Path) -> tuple[str, ByteRange]:
    m = ckpt.read_manifest(str(root))
    (shard,) = list(m.tensors["w"].shards)
    return shard.file, shard.byte_range


def test_a_read_is_made_in_pieces_each_checked_before_the_next_is_read(tmp_path: Path) -> None:
    root = tmp_path / "root"
    want = _save(root)
    m = ckpt.read_manifest(str(root))
    plan = plan_restore(m, [Request("w", Box.whole((want.numel(),)))], verify=True, max_gap_bytes=0,
                        read_chunk_bytes=64 * MiB)  # fmt: skip
    (op,) = plan.reads
    assert op.range.length == want.numel() * 4  # one read of the whole tensor
    assert len(op.checks) == 48  # of 48 blocks
    disk = RecordingDisk(str(root))
    got = torch.zeros_like(want)
    executor.read_plan(disk, plan, [executor.byte_view(got)], num_threads=2, max_inflight_bytes=MiB, piece_bytes=PIECE)
    assert torch.equal(got, want)
    # 12 pieces of 4 blocks, in order, tiling the read; each filled when checked, the rest not yet read
    assert [(o - op.range.start, n) for o, n, _, _ in disk.landed] == [(i * PIECE, PIECE) for i in range(12)]
    assert all(filled and later for _, _, filled, later in disk.landed)


def test_the_default_piece_size_applies_on_a_local_disk(tmp_path: Path) -> None:
    root = tmp_path / "root"
    want = _save(root, numel=3 * executor.PIECE_BYTES // 4)  # 3 pieces of the default size
    m = ckpt.read_manifest(str(root))
    plan = plan_restore(m, [Request("w", Box.whole((want.numel(),)))], verify=True, max_gap_bytes=0,
                        read_chunk_bytes=64 * MiB)  # fmt: skip
    disk = RecordingDisk(str(root))
    got = torch.zeros_like(want)
    executor.read_plan(disk, plan, [executor.byte_view(got)], num_threads=2, max_inflight_bytes=MiB)
    assert torch.equal(got, want)
    assert [n for _, n, _, _ in disk.landed] == [executor.PIECE_BYTES] * 3


@pytest.mark.parametrize("where", ["first block", "inside a middle piece", "last block of a piece", "last block"])
def test_a_flipped_bit_anywhere_in_a_multi_piece_read_is_caught(
    tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    want = _save(root)
    path, br = _shard(root)
    block = {"first block": 0, "inside a middle piece": 21, "last block of a piece": 7, "last block": 47}[where]
    at = br.start + block * BLOCK + 777
    full = root / path
    os.chmod(full, 0o644)
    with open(full, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x10]))
    target = {"w": torch.zeros_like(want)}
    lo, hi = br.start + block * BLOCK, br.start + (block + 1) * BLOCK
    msg = rf"{re.escape(path)}: key 'w': crc32c of bytes \[{lo}, {hi}\) is 0x[0-9a-f]{{8}}, the manifest says 0x"
    # one read of the whole tensor, in pieces of 4 blocks (the flipped block is in one of 12)
    opts = ckpt.RestoreOptions(read_chunk_bytes=64 * MiB, num_threads=1)
    monkeypatch.setattr(executor, "PIECE_BYTES", PIECE)  # the default each restore reads
    with pytest.raises(ChecksumMismatchError, match=msg):
        ckpt.restore(str(root), target=target, options=opts)
    # the bad block was checked as its piece landed: the read stopped there, nothing after it read
    got = target["w"].view(torch.uint8)
    end = (block // 4 + 1) * PIECE  # the end of the bad block's piece
    assert torch.equal(got[: end - PIECE], want.view(torch.uint8)[: end - PIECE])  # the pieces before
    assert got[end - PIECE : end].any()  # the bad piece landed
    assert not got[end:].any()  # and none after it


def _op(length: int, checks: list[tuple[int, int]]) -> ReadOp:
    return ReadOp("f", ByteRange(1000, 1000 + length), (), tuple(Check(a, b, 0, "k") for a, b in checks))


def test_pieces_tile_the_read_and_keep_every_block_whole() -> None:
    # blocks of 10 with gaps between some (coalesced reads), a lone block larger than a piece
    checks = [(0, 10), (10, 20), (20, 30), (35, 45), (45, 55), (60, 100), (100, 110)]
    cut = executor.pieces(_op(115, checks), 25)
    assert [(p.start, p.end) for p in cut] == [(0, 20), (20, 45), (45, 60), (60, 100), (100, 115)]
    assert [c for p in cut for c in p.checks] == list(_op(115, checks).checks)  # each block once
    for p in cut:
        assert all(p.start <= c.start and c.end <= p.end for c in p.checks)
    # no pieces: a read without checks, piece_bytes 0 (object stores), a read within one piece
    assert [(p.start, p.end) for p in executor.pieces(_op(115, []), 25)] == [(0, 115)]
    assert [(p.start, p.end) for p in executor.pieces(_op(115, checks), 0)] == [(0, 115)]
    assert [(p.start, p.end) for p in executor.pieces(_op(115, checks), 200)] == [(0, 115)]


def test_files_of_small_chunks_are_written_by_one_thread() -> None:
    """Per-chunk Python (a checksum, a view, a record per tensor) only fights over the GIL on
    more threads; files of large blocks spend their time in C and get every thread."""
    from ckpt.engine.save_plan import WriteItem, plan_save

    def plans(sizes: list[int]) -> tuple[object, ...]:
        items = [WriteItem(f"t{i}", "U8", (n,), (0,), (n,)) for i, n in enumerate(sizes)]
        return plan_save(items, step=1, attempt="a", rank=0, max_file_bytes=1 << 40, parallel_files=4).files

    small = plans([16 << 10] * 2000)
    large = plans([8 * MiB] * 16)
    mixed = plans([8 * MiB] * 16 + [16 << 10] * 2000)  # mostly large bytes, many small chunks
    block = 4 * MiB
    assert executor.writer_threads(small, block, 8) == 1  # type: ignore[arg-type]
    assert executor.writer_threads(large, block, 8) == 8  # type: ignore[arg-type]
    assert executor.writer_threads(mixed, block, 8) == 1  # type: ignore[arg-type]
    assert executor.writer_threads((), block, 8) == 8


@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_local_reads_run_as_sequential_streams_per_file(parts: int) -> None:
    """Each file's reads go to one or a few workers front to back (a disk's readahead serves a
    sequential stream fastest), balanced by bytes; every read is in exactly one stream."""
    sizes = {"a": [32 * MiB] * 8, "b": [32 * MiB] * 2, "c": [5 * MiB]}  # 256, 64 and 5 MiB
    reads = [
        ReadOp(path, ByteRange(i * n, (i + 1) * n), (), ())
        for path, ns in sizes.items() for i, n in enumerate(ns)
    ]  # fmt: skip
    shuffled = reads[::-1]
    runs = executor.streams(shuffled, parts)
    assert sorted((op.path, op.range.start) for r in runs for op in r) == sorted((op.path, op.range.start) for op in reads)
    for r in runs:
        assert r
        assert len({op.path for op in r}) == 1
        assert all(x.range.end == y.range.start for x, y in itertools.pairwise(r))  # in file order
    per_file = {p: sum(1 for r in runs if r[0].path == p) for p in sizes}
    assert per_file["c"] == 1
    if parts == 1:
        assert per_file == {"a": 1, "b": 1, "c": 1}
    if parts == 8:  # a's 256 MiB is ~8 of the 325 MiB's eighths: several streams of it
        assert per_file["a"] >= 4
    lengths = [sum(op.range.length for op in r) for r in runs]
    assert lengths == sorted(lengths, reverse=True)  # the largest first
