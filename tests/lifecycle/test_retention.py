"""Retention policy: which committed steps are retired. Pure, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckpt.lifecycle.retention import RetentionPolicy, metric_value, to_retire


def test_keep_last_n() -> None:
    assert to_retire([0, 10, 20, 30, 40], {}, RetentionPolicy(keep_last=2)) == [0, 10, 20]


def test_keep_every_k_keeps_milestones_too() -> None:
    got = to_retire(list(range(0, 110, 10)), {}, RetentionPolicy(keep_last=2, keep_every=50))
    assert got == [10, 20, 30, 40, 60, 70, 80]


def test_keep_best_by_metric_min_and_max() -> None:
    steps = [1, 2, 3, 4, 5]
    loss = {1: 0.5, 2: 0.1, 3: 0.9, 4: None, 5: 0.7}
    assert to_retire(steps, loss, RetentionPolicy(keep_last=1, keep_best=1, metric="loss")) == [1, 3, 4]
    assert to_retire(steps, loss, RetentionPolicy(keep_last=1, keep_best=2, metric="acc", mode="max")) == [1, 2, 4]


def test_none_keeps_everything() -> None:
    assert to_retire([1, 2, 3], {}, RetentionPolicy(keep_last=None)) == []


def test_metric_values_from_user_metadata() -> None:
    assert metric_value({"ckpt.metric.loss": "0.25"}, "loss") == 0.25
    assert metric_value({"ckpt.metric.loss": "nan"}, "loss") is None  # a NaN loss is never best
    assert metric_value({"ckpt.metric.loss": "x"}, "loss") is None
    assert metric_value({}, "loss") is None


@pytest.mark.parametrize(
    "kw", [{"keep_last": 0}, {"keep_every": 0}, {"keep_best": -1}, {"keep_best": 1}, {"mode": "median"}]
)
def test_bad_policies_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="RetentionPolicy"):
        RetentionPolicy(**kw)  # type: ignore[arg-type]


@given(
    steps=st.lists(st.integers(0, 10_000), min_size=1, max_size=40, unique=True),
    last=st.integers(1, 5),
    every=st.one_of(st.none(), st.integers(1, 500)),
    best=st.integers(0, 3),
    seed=st.integers(0, 1000),
)
def test_the_newest_is_never_retired_and_nothing_kept_is(steps: list[int], last: int, every: int | None, best: int, seed: int) -> None:
    metrics = {s: float((s * 7919 + seed) % 101) for s in steps}
    policy = RetentionPolicy(keep_last=last, keep_every=every, keep_best=best, metric="m")
    gone = to_retire(steps, metrics, policy)
    assert max(steps) not in gone
    assert set(gone) <= set(steps)
    assert gone == sorted(gone)
    kept = set(steps) - set(gone)
    assert set(sorted(steps)[-last:]) <= kept
    if every:
        assert {s for s in steps if s % every == 0} <= kept
    ranked = sorted(steps, key=lambda s: (metrics[s], -s))[:best]
    assert set(ranked) <= kept
    assert len(kept) <= last + best + (len([s for s in steps if s % every == 0]) if every else 0)
