"""The incremental planner (ckpt.engine.reuse): pure decisions, tested without I/O."""

from __future__ import annotations

import pytest

from ckpt.engine import reuse
from ckpt.engine.save_plan import WriteItem
from ckpt.format.manifest import ShardEntry, ShardTable, TensorEntry
from ckpt.geometry.byte_ranges import ByteRange

H1, H2 = "1" * 32, "2" * 32


def entry(shards: list[tuple[tuple[int, ...], tuple[int, ...], str | None]], shape: tuple[int, ...] = (8, 4)) -> TensorEntry:
    es = [ShardEntry("data/f", o, z, ByteRange(100 * i, 100 * i + 4 * z[0] * z[1]), (10 + i, 20 + i))
          for i, (o, z, _) in enumerate(shards)]  # fmt: skip
    table = ShardTable.from_entries(es, len(shape))
    return TensorEntry("F32", shape, ShardTable(*[getattr(table, f) for f in ("paths", "file", "offsets", "sizes",
                                                                             "byte_range", "crc32c", "crc_start")],
                                               hashes=tuple(h for _, _, h in shards)))  # fmt: skip


def item(offsets: tuple[int, ...] = (0, 0), sizes: tuple[int, ...] = (4, 4), dtype: str = "F32") -> WriteItem:
    return WriteItem("w", dtype, (8, 4), offsets, sizes)


def test_match_finds_the_base_shard_with_the_same_box_only() -> None:
    e = entry([((0, 0), (4, 4), H1), ((4, 0), (4, 4), None)])
    b = reuse.match(item((4, 0)), e, same_blocks=True)
    assert b == reuse.BaseShard("data/f", 100, 164, (11, 21), None)
    assert reuse.match(item((0, 0)), e, same_blocks=True) == reuse.BaseShard("data/f", 0, 64, (10, 20), H1)
    assert reuse.match(item((2, 0)), e, same_blocks=True) is None  # another box
    assert reuse.match(item(dtype="BF16"), e, same_blocks=True) is None
    assert reuse.match(item(), e, same_blocks=False) is None  # the base's CRCs cover other blocks
    assert reuse.match(item(), None, same_blocks=True) is None


@pytest.mark.parametrize(
    ("base_hash", "first", "full", "want"),
    [
        (H1, 10, H1, "reuse"),  # first block and whole hash equal: referenced
        (H1, 10, H2, "write+hash"),  # first block equal, bytes differ later: written with its hash
        (H1, 99, None, "write"),  # first block differs: changed, written without a hash (never hashed)
        (None, 10, H1, "write+hash"),  # the base recorded no hash: never trusted, hashed for next time
    ],
)
def test_decide(base_hash: str | None, first: int, full: str | None, want: str) -> None:
    base = reuse.BaseShard("data/f", 0, 64, (10, 20), base_hash)
    hashed: list[int] = []

    def full_hash(ix: object) -> dict[int, str]:
        hashed.extend(ix)  # type: ignore[call-overload]
        assert full is not None, "a region whose first block changed was hashed"
        return dict.fromkeys(hashed, full)

    (d,) = reuse.decide([item()], [base], lambda i: first, full_hash)
    got = "reuse" if d.reuse is not None else "write+hash" if d.hash else "write"
    assert got == want
    assert not d.hash_on_write
    if want == "reuse":
        assert d.reuse == base


def test_a_region_without_a_base_is_hashed_as_it_is_written() -> None:
    (d, e) = reuse.decide([item(), WriteItem("e", "F32", (0,), (0,), (0,))], [None, None], lambda i: 0, lambda ix: {})
    assert d == reuse.Decision(None, hash_on_write=True)
    assert e == reuse.Decision(None, hash_on_write=True)


def test_content_hash_is_128_bits_of_blake3() -> None:
    assert reuse.content_hash(b"") == "af1349b9f5f9a1a6a0404dea36dcc949"  # BLAKE3("") cut to 16 bytes
    h = reuse.hasher()
    h.update(b"ab")
    h.update(b"c")
    assert reuse.digest(h) == reuse.content_hash(b"abc")
    many = reuse.hash_all({i: memoryview(bytes([i]) * (1000 * i)) for i in range(6)}, num_threads=3)
    assert many == {i: reuse.content_hash(bytes([i]) * (1000 * i)) for i in range(6)}
