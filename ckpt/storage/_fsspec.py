"""Any other fsspec file system (``memory://``, the fault-injecting ``faulty://``, gcs, azure...),
through fsspec's generic calls.

Create-only writes are ``pipe_file(..., mode="create")``. ckpt trusts them for the commit only on
``memory://`` (under a process-wide lock: it is one dict) and on file systems that declare
``ckpt_atomic_create``; elsewhere a save needs ``SaveOptions(allow_non_atomic_commit=True)``.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ckpt.errors import ShardSizeMismatchError, StorageError
from ckpt.storage._base import ChunkSource, Listed, Storage, chunk_data

T = TypeVar("T")
MEMORY_LOCK = threading.Lock()  # memory:// is one process-wide dict; make create-only atomic


class FsspecStorage(Storage):
    """A root on an fsspec file system, through its generic calls."""

    def __init__(self, fs: Any, path: str) -> None:
        protocol: str = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        root = path.rstrip("/")
        super().__init__(root, f"{protocol}://{root.lstrip('/')}")
        self.fs = fs
        self.protocol = protocol
        self._memory = protocol == "memory"
        self.atomic_create = self._memory or bool(getattr(fs, "ckpt_atomic_create", False))

    def _call(self, op: str, fn: Callable[[], T]) -> T:
        """One blocking file-system call (the S3 backend retries it under its policy)."""
        return fn()

    # --- writes ----------------------------------------------------------------------------

    def write_file(self, rel: str, chunks: ChunkSource, *, size: int, fsync: bool, stable: bool = False) -> None:
        with self._creating(rel):
            data = chunks() if callable(chunks) else chunks
            self.fs.pipe_file(self.path(rel), b"".join(chunk_data(c) for c in data), mode="create")

    def put_if_absent(self, rel: str, data: bytes, *, fsync: bool) -> bool:
        try:
            with self._errors("create-only write", rel):
                if self._memory:
                    with MEMORY_LOCK:
                        self.fs.pipe_file(self.path(rel), data, mode="create")
                else:
                    self.fs.pipe_file(self.path(rel), data, mode="create")
                return True
        except StorageError as err:
            if isinstance(err.__cause__, FileExistsError):
                return False
            raise

    def put(self, rel: str, data: bytes, *, fsync: bool) -> None:
        with self._errors("write", rel):
            self.fs.pipe_file(self.path(rel), data)

    # --- reads -----------------------------------------------------------------------------

    def read(self, rel: str) -> bytes:
        with self._errors("read", rel):
            data: bytes = self.fs.cat_file(self.path(rel))
            return data

    def read_into(self, rel: str, start: int, buffers: list[memoryview]) -> None:
        total = sum(len(b) for b in buffers)
        with self._errors(f"read of [{start}, {start + total})", rel):
            data = self.fs.cat_file(self.path(rel), start=start, end=start + total)
        _scatter(self, rel, start, data, buffers)

    def size(self, rel: str) -> int:
        with self._errors("stat", rel):
            return int(self.fs.size(self.path(rel)))

    def exists(self, rel: str) -> bool:
        with self._errors("exists", rel):
            return bool(self.fs.exists(self.path(rel)))

    # --- listing and deleting --------------------------------------------------------------

    def list_files(self, prefix: str = "") -> list[Listed]:
        top = self.path(prefix.rstrip("/")) if prefix else self.root
        with self._errors("listing", prefix):
            self.fs.invalidate_cache(top)
            try:  # one listing (an exists() first would cost more requests on object stores)
                found = self._call("listing", lambda: self.fs.find(top, detail=True))
            except FileNotFoundError:
                return []
        # compared without a leading "/": some file systems answer "/bucket/..." for "bucket/..."
        base = self.root.strip("/") + "/"
        out = [
            Listed(full.lstrip("/")[len(base) :], int(info.get("size") or 0), _mtime(info))
            for full, info in found.items()
            if info.get("type") != "directory" and full.lstrip("/").startswith(base)
        ]
        return sorted(out, key=lambda f: f.path)

    def delete(self, rel: str) -> None:
        full = self.path(rel)

        def rm() -> None:
            if self.fs.exists(full):
                self.fs.rm(full)

        with self._errors("delete", rel):
            self._call("delete", rm)
            self.fs.invalidate_cache(full)

    def delete_tree(self, rel: str) -> None:
        """Delete everything under ``rel`` (a root ckpt owns whole: the Lightning plugin's)."""
        full = self.path(rel) if rel else self.root
        with self._errors("delete", rel):
            if self.fs.exists(full):
                self._call("delete", lambda: self.fs.rm(full, recursive=True))


def _scatter(
    storage: Storage, rel: str, start: int, data: bytes, buffers: list[memoryview]
) -> None:
    """Copy ``data`` (a ranged read) into ``buffers``; a short read is an error."""
    total = sum(len(b) for b in buffers)
    if len(data) != total:
        raise ShardSizeMismatchError(
            f"{storage.where(rel)}: short read at [{start}, {start + total}): got {len(data)} bytes"
        )
    pos = 0
    for b in buffers:
        b[:] = data[pos : pos + len(b)]
        pos += len(b)


def _mtime(info: dict[str, Any]) -> float:
    """An fsspec listing entry's modification time as seconds since the epoch (infinity if
    unknown: such a file never counts as old, so garbage collection never takes it)."""
    for k in ("LastModified", "mtime", "last_modified", "created"):
        v = info.get(k)
        if isinstance(v, int | float):
            return float(v)
        if isinstance(v, datetime.datetime):
            return v.timestamp()
    return float("inf")
