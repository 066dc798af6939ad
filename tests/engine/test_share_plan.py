"""The shared-read planner (ckpt.engine.share_plan): pure, tested without I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.engine.share_plan import plan_shared


def test_replicas_split_the_fetching_evenly() -> None:
    reads = [[("f", 0, 400)]] * 4  # 4 ranks need the same 400 bytes
    p = plan_shared(reads, max_segment_bytes=100, slab_bytes=1000)
    assert p.fetched == 400
    assert [p.fetched_by(r) for r in range(4)] == [100, 100, 100, 100]
    assert all(s.needers == (0, 1, 2, 3) for s in p.segments)


def test_what_one_rank_needs_it_fetches_itself() -> None:
    reads = [[("a", 0, 10)], [("a", 10, 30), ("b", 0, 5)]]
    p = plan_shared(reads, max_segment_bytes=100, slab_bytes=1000)
    assert [(s.path, s.start, s.end, s.owner, s.needers) for s in p.segments] == [
        ("a", 0, 10, 0, (0,)), ("a", 10, 30, 1, (1,)), ("b", 0, 5, 1, (1,))
    ]  # fmt: skip


def test_partial_overlaps_are_cut_at_every_boundary() -> None:
    reads = [[("f", 0, 60)], [("f", 40, 100)]]
    p = plan_shared(reads, max_segment_bytes=1000, slab_bytes=1000)
    assert [(s.start, s.end, s.needers) for s in p.segments] == [(0, 40, (0,)), (40, 60, (0, 1)), (60, 100, (1,))]
    assert p.segments[1].owner in (0, 1)


def test_slabs_hold_whole_segments_up_to_the_bound() -> None:
    p = plan_shared([[("f", 0, 1000)]] * 2, max_segment_bytes=100, slab_bytes=250)
    assert p.slabs == ((0, 2), (2, 4), (4, 6), (6, 8), (8, 10))
    with pytest.raises(ValueError, match="positive"):
        plan_shared([], max_segment_bytes=0, slab_bytes=1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 50), st.integers(0, 50)), max_size=4),
                min_size=1, max_size=5), st.integers(1, 20), st.integers(1, 60))  # fmt: skip
def test_every_needed_byte_is_fetched_once_by_a_rank_that_needs_it(raw: list[list[tuple[str, int, int]]], seg: int, slab: int) -> None:
    reads = [[(p, min(a, b), max(a, b)) for p, a, b in r] for r in raw]
    plan = plan_shared(reads, max_segment_bytes=seg, slab_bytes=slab)
    need = {(p, x): {r for r, rr in enumerate(reads) for q, a, b in rr if q == p and a <= x < b}
            for rr in reads for p, a, b in rr for x in range(a, b)}  # fmt: skip
    got: dict[tuple[str, int], tuple[int, tuple[int, ...]]] = {}
    for s in plan.segments:
        assert s.length <= seg
        assert s.owner in s.needers
        for x in range(s.start, s.end):
            assert (s.path, x) not in got  # fetched once
            got[(s.path, x)] = (s.owner, s.needers)
    assert set(got) == set(need)
    assert all(set(got[k][1]) == need[k] for k in need)
    covered = [i for a, b in plan.slabs for i in range(a, b)]
    assert covered == list(range(len(plan.segments)))  # the slabs tile the segments, in order
    assert plan == plan_shared(reads, max_segment_bytes=seg, slab_bytes=slab)  # deterministic
