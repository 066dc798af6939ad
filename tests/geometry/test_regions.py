"""Pure box arithmetic checked against numpy slicing."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.geometry.boxes import Box, copy_runs, intersect


@st.composite
def box_in(draw: st.DrawFn, shape: tuple[int, ...]) -> Box:
    offs, sizes = [], []
    for n in shape:
        o = draw(st.integers(0, n - 1))
        offs.append(o)
        sizes.append(draw(st.integers(1, n - o)))
    return Box(tuple(offs), tuple(sizes))


@st.composite
def case(draw: st.DrawFn) -> tuple[tuple[int, ...], Box, Box]:
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    return shape, draw(box_in(shape)), draw(box_in(shape))


def _sl(b: Box, rel_to: Box | None = None) -> tuple[slice, ...]:
    base = rel_to.offsets if rel_to else (0,) * b.ndim
    return tuple(slice(o - z, o - z + s) for o, s, z in zip(b.offsets, b.sizes, base, strict=True))


@settings(max_examples=300)
@given(case(), st.sampled_from([1, 2, 4, 8]))
def test_copy_runs_moves_exactly_the_intersection(c: tuple[tuple[int, ...], Box, Box], itemsize: int) -> None:
    shape, src, dst = c
    full = np.arange(int(np.prod(shape)) * itemsize, dtype=np.uint8).reshape(*shape, itemsize)
    src_buf = np.ascontiguousarray(full[_sl(src)]).reshape(-1)
    dst_buf = np.zeros(dst.numel * itemsize, dtype=np.uint8)
    part = intersect(src, dst)
    if part is None:
        return
    runs = copy_runs(part, src, dst, itemsize)
    for s, d in zip(runs.src.tolist(), runs.dst.tolist(), strict=True):
        dst_buf[d : d + runs.length] = src_buf[s : s + runs.length]
    got = dst_buf.reshape(*dst.sizes, itemsize)[_sl(part, dst)]
    assert np.array_equal(got, full[_sl(part)])
    assert len(runs.src) * runs.length == part.numel * itemsize


def test_row_shard_is_one_run_and_column_split_one_per_row() -> None:
    whole = Box((0, 0), (4, 6))
    rows = Box((2, 0), (2, 6))
    assert len(copy_runs(rows, rows, whole, 4).src) == 1
    cols = Box((0, 3), (4, 3))
    r = copy_runs(cols, cols, whole, 4)
    assert len(r.src) == 4
    assert r.length == 12


def test_scalar_and_disjoint() -> None:
    s = Box((), ())
    assert intersect(s, s) == s
    assert copy_runs(s, s, s, 2).length == 2
    assert intersect(Box((0,), (2,)), Box((2,), (2,))) is None
