"""Retention: which committed checkpoints to keep. Pure (no I/O).

A policy keeps the union of: the newest ``keep_last`` steps (at least one: the newest checkpoint
is never retired), every step that is a multiple of ``keep_every``, and the ``keep_best`` steps
with the best value of a metric (steps without the metric never count as best). Everything else
is retired, oldest first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

METRIC_PREFIX = "ckpt.metric."  # user_metadata key of a metric recorded with a save


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    keep_last: int | None = 3  # None: keep every checkpoint (the other rules are then moot)
    keep_every: int | None = None  # also keep steps divisible by this (milestones)
    keep_best: int = 0  # also keep this many steps with the best ``metric``
    metric: str | None = None
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError("RetentionPolicy.keep_last must be >= 1 (the newest checkpoint is always kept) or None")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError("RetentionPolicy.keep_every must be >= 1 or None")
        if self.keep_best < 0:
            raise ValueError("RetentionPolicy.keep_best must be >= 0")
        if self.keep_best and not self.metric:
            raise ValueError("RetentionPolicy.keep_best needs the name of a metric")
        if self.mode not in ("min", "max"):
            raise ValueError("RetentionPolicy.mode must be 'min' or 'max'")


def metric_value(user_metadata: Mapping[str, str], name: str) -> float | None:
    """The metric ``name`` recorded in a manifest's user metadata, or None (absent, not a number,
    or NaN: a NaN loss is never the best)."""
    raw = user_metadata.get(METRIC_PREFIX + name)
    if raw is None:
        return None
    try:
        v = float(raw)
    except ValueError:
        return None
    return None if math.isnan(v) else v


def to_retire(steps: Sequence[int], metrics: Mapping[int, float | None], policy: RetentionPolicy) -> list[int]:
    """The committed ``steps`` that ``policy`` does not keep, ascending. ``metrics``: each step's
    value of ``policy.metric`` (missing or None: no value)."""
    ordered = sorted(set(steps))
    if policy.keep_last is None or not ordered:
        return []
    keep = set(ordered[-policy.keep_last :])
    if policy.keep_every:
        keep.update(s for s in ordered if s % policy.keep_every == 0)
    if policy.keep_best:
        scored = [(v, s) for s in ordered if (v := metrics.get(s)) is not None]
        sign = 1.0 if policy.mode == "min" else -1.0
        scored.sort(key=lambda vs: (sign * vs[0], -vs[1]))  # ties: the newer step wins
        keep.update(s for _, s in scored[: policy.keep_best])
    return [s for s in ordered if s not in keep]
