"""Save attempts and shard reports: the small, picklable, credential-free records that travel
between the coordinator and the writers.

Pure (no I/O).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from ckpt.errors import PlanError
from ckpt.options import SaveOptions

MAX_STEP = 10**12 - 1  # steps are zero-padded to 12 digits
_ROOT_SECRET = re.compile(r"://[^/@]*:[^/@]*@")  # user:password@ in a URL


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at committing ``step`` under ``root``. Holds no credentials: each writer passes
    its own ``storage_options``."""

    root: str
    step: int
    attempt: str  # unique id; names the data prefix data/<step>-<attempt>/
    world_size: int
    options: SaveOptions
    user_metadata: tuple[tuple[str, str], ...] = ()


def new_attempt(
    root: str, step: int, world_size: int, options: SaveOptions, user_metadata: dict[str, str] | None
) -> Attempt:
    if type(step) is not int or not 0 <= step <= MAX_STEP:
        raise PlanError(f"step must be an integer in [0, {MAX_STEP}], got {step!r}")
    if type(world_size) is not int or world_size < 1:
        raise PlanError(f"world_size must be a positive integer, got {world_size!r}")
    if _ROOT_SECRET.search(root):
        raise PlanError("the root URL embeds credentials; pass them in storage_options or the environment")
    meta = dict(user_metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise PlanError("user_metadata must map strings to strings")
    return Attempt(root, step, uuid.uuid4().hex[:16], world_size, options, tuple(sorted(meta.items())))


Report = dict[str, Any]
"""What ``write_shards`` returns: JSON-able, small (no tensor data), no credentials::

    {"step": int, "attempt": str, "rank": int,
     "files": {path: {"size": int, "crc32c": int}},
     "shards": [{"key", "dtype", "shape", "offsets", "sizes", "file", "byte_range", "crc32c"}],
     "objects": {key: tagged JSON}, "tree": skeleton or None}
"""
