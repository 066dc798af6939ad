"""The save planner: how a writer's tensors are grouped into files. Pure, no I/O."""

from __future__ import annotations

import pytest

from ckpt.engine.save_plan import WriteItem, plan_save

MiB = 1 << 20


def _items(sizes_mib: list[int]) -> list[WriteItem]:
    # fp32 rows of 1 MiB each: key t<i> has sizes_mib[i] rows
    return [WriteItem(f"t{i:03d}", "F32", (n, 1 << 18), (0, 0), (n, 1 << 18)) for i, n in enumerate(sizes_mib)]


def _file_bytes(items: list[WriteItem], **kw: int) -> list[int]:
    plan = plan_save(items, step=1, attempt="a", rank=0, **kw)
    placed = [it.key for f in plan.files for it, _ in f.items]
    assert sorted(placed) == sorted(i.key for i in items)  # every tensor once
    return [sum(it.nbytes for it, _ in f.items) for f in plan.files]


def test_bytes_are_balanced_over_parallel_files() -> None:
    sizes = _file_bytes(_items([8] * 64), max_file_bytes=512 * MiB, parallel_files=4, min_file_bytes=64 * MiB)
    assert sizes == [128 * MiB] * 4


def test_a_small_state_stays_one_file() -> None:
    sizes = _file_bytes(_items([8] * 15), max_file_bytes=512 * MiB, parallel_files=4, min_file_bytes=64 * MiB)
    assert sizes == [120 * MiB]


def test_no_file_is_planned_under_the_minimum() -> None:
    sizes = _file_bytes(_items([8] * 20), max_file_bytes=512 * MiB, parallel_files=4, min_file_bytes=64 * MiB)
    assert sizes == [80 * MiB, 80 * MiB]


def test_max_file_bytes_still_caps_each_file() -> None:
    sizes = _file_bytes(_items([8] * 64), max_file_bytes=64 * MiB, parallel_files=2, min_file_bytes=MiB)
    assert sizes == [64 * MiB] * 8


@pytest.mark.parametrize("parallel", [2, 3, 7])
def test_a_tensor_larger_than_the_share_gets_its_own_file(parallel: int) -> None:
    sizes = _file_bytes(_items([200, 8, 8]), max_file_bytes=512 * MiB, parallel_files=parallel, min_file_bytes=MiB)
    assert 200 * MiB in sizes
    assert sum(sizes) == 216 * MiB
    assert len(sizes) <= parallel


def test_one_stream_means_one_file() -> None:
    assert _file_bytes(_items([200, 8, 8]), max_file_bytes=512 * MiB, parallel_files=1, min_file_bytes=MiB) == [216 * MiB]
