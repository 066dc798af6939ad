"""Save attempts and shard reports: the small, picklable, credential-free records that travel
between the coordinator and the writers.

Pure (no I/O).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any, TypedDict

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
    # an incremental save's base (resolved by the coordinator): its step and the attempt that
    # committed it, which every writer and the commit check again
    base_step: int | None = None
    base_attempt: str | None = None


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


def to_wire(a: Attempt) -> dict[str, Any]:
    """An attempt as a plain JSON-able record (what coordinators send to writers)."""
    return {"root": a.root, "step": a.step, "attempt": a.attempt, "world_size": a.world_size,
            "options": {f: getattr(a.options, f) for f in SaveOptions.__slots__},
            "user_metadata": [list(p) for p in a.user_metadata], "base_step": a.base_step,
            "base_attempt": a.base_attempt}  # fmt: skip


def from_wire(d: dict[str, Any]) -> Attempt:
    """The attempt :func:`to_wire` describes."""
    return Attempt(
        d["root"], d["step"], d["attempt"], d["world_size"], SaveOptions(**d["options"]),
        tuple((k, v) for k, v in d["user_metadata"]), d.get("base_step"), d.get("base_attempt"),
    )  # fmt: skip


class FileRecord(TypedDict):
    """A file a writer wrote: its size and whole-file CRC32C."""

    size: int
    crc32c: int


class ShardRecord(TypedDict):
    """One region of one tensor in one file: the manifest's shard columns, as one row."""

    key: str
    dtype: str
    shape: list[int]  # the global shape
    offsets: list[int]
    sizes: list[int]
    file: str
    byte_range: list[int]  # [start, end) in the file
    crc32c: list[int]  # one per block of ``block_bytes``
    hash: str | None  # incremental saves: the region's content hash (32 hex digits), else None


class KeyRecord(TypedDict):
    """A tensor this rank holds (whether or not it wrote it): for the coordinator's checks."""

    dtype: str
    shape: list[int]


class Report(TypedDict):
    """What ``write_shards`` returns: JSON-able, small (no tensor data), no credentials. Its JSON
    form is the wire form between writers and the coordinator (Ray, gloo): plain dicts and lists."""

    step: int
    attempt: str
    rank: int
    files: dict[str, FileRecord]
    shards: list[ShardRecord]
    keys: dict[str, KeyRecord]
    objects: dict[str, Any]  # key -> tagged JSON value (ckpt.state.tree)
    tree: Any  # the state's skeleton, or None
