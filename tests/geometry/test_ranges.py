"""Pure range arithmetic: coalesce, split, blocks, overlaps."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from ckpt.geometry.byte_ranges import ByteRange, blocks, coalesce, find_overlaps, split

ranges_st = st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 500)).map(lambda p: ByteRange(p[0], p[0] + p[1])),
    max_size=40,
)


@given(ranges_st, st.integers(0, 300), st.integers(1, 5000))
def test_coalesce_covers_each_input_once(rs: list[ByteRange], gap: int, max_bytes: int) -> None:
    out = coalesce(rs, max_gap_bytes=gap, max_bytes=max_bytes)
    members = sorted(i for _, m in out for i in m)
    assert members == list(range(len(rs)))
    for merged, m in out:
        for i in m:
            assert merged.contains(rs[i])
        # a merged range is only larger than max_bytes if its members overlap or one alone is
        if merged.length > max_bytes and len(m) > 1:
            spans = sorted((rs[i] for i in m), key=lambda r: r.start)
            assert any(a.end > b.start for a, b in itertools.pairwise(spans))
    starts = sorted(out, key=lambda p: p[0].start)
    for (a, _), (b, _) in itertools.pairwise(starts):
        assert a.end <= b.start


def test_coalesce_merges_small_gaps_only() -> None:
    rs = [ByteRange(0, 10), ByteRange(12, 20), ByteRange(100, 110)]
    out = coalesce(rs, max_gap_bytes=5, max_bytes=1000)
    assert [r for r, _ in out] == [ByteRange(0, 20), ByteRange(100, 110)]
    out = coalesce(rs, max_gap_bytes=0, max_bytes=1000)
    assert len(out) == 3


@given(st.integers(0, 1000), st.integers(0, 5000), st.integers(1, 700), st.integers(1, 64))
def test_split_tiles_range(start: int, length: int, chunk: int, align: int) -> None:
    r = ByteRange(start, start + length)
    parts = split(r, chunk_bytes=chunk, align=align)
    assert parts[0].start == r.start
    assert parts[-1].end == r.end
    for a, b in itertools.pairwise(parts):
        assert a.end == b.start
        assert (a.end - r.start) % align == 0
    assert all(p.length <= max(chunk, align) for p in parts)


def test_blocks_of_empty_and_partial() -> None:
    assert blocks(ByteRange(5, 5), block_bytes=4) == []
    assert blocks(ByteRange(5, 15), block_bytes=4) == [ByteRange(5, 9), ByteRange(9, 13), ByteRange(13, 15)]


def test_find_overlaps() -> None:
    rs = [ByteRange(0, 10), ByteRange(10, 20), ByteRange(15, 16), ByteRange(30, 30)]
    assert find_overlaps(rs) == [(1, 2)]
    assert find_overlaps([ByteRange(0, 5), ByteRange(5, 5), ByteRange(5, 9)]) == []
