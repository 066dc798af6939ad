"""Faults at the storage contract: :class:`FaultyStorage` wraps any :class:`~ckpt.storage.Storage`
(the real local, fsspec or S3 backend), records each contract call and applies the fault
:class:`~ckpt.testing.faults.Rule` objects of a :class:`~ckpt.testing.faults.Recorder`, so the
fault matrix exercises production code (the link commit, fsync, multipart uploads); and
:func:`wrap_storage`, the test seam that makes ckpt's public entry points build it (see
:mod:`ckpt.testing.faults` for the rules and for faults below the storage layer).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import ckpt.storage
from ckpt.errors import ShardSizeMismatchError
from ckpt.storage import Listed, Stat, Storage, Upload
from ckpt.storage._base import Chunks, ChunkSource, chunk_data
from ckpt.testing.faults import Call, Recorder, Rule, _fire, _hold, rank_of

T = TypeVar("T")

# --- the storage contract -------------------------------------------------------------------------


class FaultyStorage(Storage):
    """Delegates to ``inner`` (any Storage), recording each contract call and applying the fault
    rules of ``recorder`` (module docstring). Capabilities are the inner storage's."""

    def __init__(self, inner: Storage, recorder: Recorder | None = None) -> None:
        super().__init__(inner.root, inner.url)
        self.inner = inner
        self.recorder = recorder if recorder is not None else Recorder()
        self.atomic_create = inner.atomic_create
        self.local_disk = inner.local_disk
        self.streams_chunks = inner.streams_chunks
        self.io_timeout_s = inner.io_timeout_s  # its calls run under this deadline, inner's within

    def path(self, rel: str) -> str:
        return self.inner.path(rel)

    def where(self, rel: str) -> str:
        return self.inner.where(rel)

    # --- the hook ----------------------------------------------------------------------------

    def _before(self, op: str, rel: str, start: int | None = None, end: int | None = None,
                nbytes: int | None = None) -> Rule | None:  # fmt: skip
        """Record the call; apply the part of a firing rule that acts before the operation (an
        error raised as the backend's would be: translated, naming the path)."""
        rank = rank_of(rel)
        call = Call(op, rel, start, end, nbytes, self.recorder.rank if rank is None else rank)
        rule = self.recorder.record(call)
        if rule is None:
            return None
        _hold(rule, self.recorder)
        if not rule.after:
            with self._errors(op, rel):
                _fire(rule)
        return rule

    def _after(self, op: str, rel: str, rule: Rule | None) -> None:
        if rule is not None and rule.after:
            with self._errors(op, rel):
                _fire(rule)

    def _run(self, op: str, rel: str, fn: Callable[[], T], **call: Any) -> T:
        rule = self._before(op, rel, **call)
        out = fn()
        self._after(op, rel, rule)
        return out

    # --- capabilities and checks -------------------------------------------------------------

    def conditional_writes_work(self) -> bool:
        return self._run("conditional_writes_work", "", self.inner.conditional_writes_work)

    def endpoint(self) -> str:
        return self.inner.endpoint()

    def check_no_links(self, rel: str, *, cached: bool = False) -> None:
        self._run("check_no_links", rel, lambda: self.inner.check_no_links(rel, cached=cached))

    # --- writes ------------------------------------------------------------------------------

    def write_file(self, rel: str, chunks: ChunkSource, *, size: int, fsync: bool, stable: bool = False) -> None:
        rule = self._before("write_file", rel, nbytes=size)
        if rule is not None and rule.truncate_to is not None and rule.truncate_to < size:
            n = rule.truncate_to
            source = chunks
            chunks = (lambda: _truncated(source(), n)) if callable(source) else _truncated(source, n)
            size = n
        self.inner.write_file(rel, chunks, size=size, fsync=fsync, stable=stable)
        self._after("write_file", rel, rule)

    def put_if_absent(self, rel: str, data: bytes, *, fsync: bool) -> bool:
        rule = self._before("put_if_absent", rel, nbytes=len(data))
        if rule is not None and rule.truncate_to is not None:
            data = data[: rule.truncate_to]
        out = self.inner.put_if_absent(rel, data, fsync=fsync)
        self._after("put_if_absent", rel, rule)
        return out

    def put(self, rel: str, data: bytes, *, fsync: bool) -> None:
        rule = self._before("put", rel, nbytes=len(data))
        if rule is not None and rule.truncate_to is not None:
            data = data[: rule.truncate_to]
        self.inner.put(rel, data, fsync=fsync)
        self._after("put", rel, rule)

    def sync_dirs(self, rels: Iterable[str]) -> None:
        rels = list(rels)
        self._run("sync_dirs", ",".join(rels), lambda: self.inner.sync_dirs(rels))

    def sync_files(self, rels: Iterable[str]) -> None:
        rels = list(rels)
        self._run("sync_files", ",".join(rels), lambda: self.inner.sync_files(rels))

    # --- reads -------------------------------------------------------------------------------

    def read(self, rel: str) -> bytes:
        rule = self._before("read", rel)
        data = self.inner.read(rel)
        if rule is not None and rule.truncate_to is not None:
            data = data[: rule.truncate_to]
        self._after("read", rel, rule)
        return data

    def read_into(self, rel: str, start: int, buffers: list[memoryview]) -> None:
        total = sum(len(b) for b in buffers)
        rule = self._before("read_into", rel, start, start + total, total)
        if rule is not None and rule.truncate_to is not None and rule.truncate_to < total:
            n, left = rule.truncate_to, rule.truncate_to
            part: list[memoryview] = []
            for b in buffers:
                if left <= 0:
                    break
                part.append(b[: min(len(b), left)])
                left -= len(part[-1])
            self.inner.read_into(rel, start, part)
            raise ShardSizeMismatchError(
                f"{self.where(rel)}: short read at [{start}, {start + total}): got {n} bytes (injected)"
            )
        self.inner.read_into(rel, start, buffers)
        self._after("read_into", rel, rule)

    def size(self, rel: str) -> int:
        return self._run("size", rel, lambda: self.inner.size(rel))

    def stat(self, rel: str) -> Stat:
        return self._run("stat", rel, lambda: self.inner.stat(rel))

    def exists(self, rel: str) -> bool:
        return self._run("exists", rel, lambda: self.inner.exists(rel))

    # --- listing and deleting ----------------------------------------------------------------

    def list_files(self, prefix: str = "") -> list[Listed]:
        return self._run("list_files", prefix, lambda: self.inner.list_files(prefix))

    def delete(self, rel: str) -> None:
        self._run("delete", rel, lambda: self.inner.delete(rel))

    def delete_tree(self, rel: str) -> None:
        self._run("delete_tree", rel, lambda: self.inner.delete_tree(rel))

    def remove_empty_dir(self, rel: str) -> None:
        self._run("remove_empty_dir", rel, lambda: self.inner.remove_empty_dir(rel))

    def multipart_uploads(self) -> list[Upload]:
        return self._run("multipart_uploads", "", self.inner.multipart_uploads)

    def abort_upload(self, upload: Upload) -> None:
        self._run("abort_upload", upload.key, lambda: self.inner.abort_upload(upload))


def _truncated(chunks: Chunks, n: int) -> Iterator[bytes]:
    """The first ``n`` bytes of ``chunks``; the rest is read and dropped (a torn write: the
    backend took all the data, stored a prefix and reported success)."""
    for chunk in chunks:
        piece = bytes(memoryview(chunk_data(chunk))[: max(n, 0)])
        n -= len(piece)
        if piece:
            yield piece


# --- the test seam --------------------------------------------------------------------------------


def _ckpt_modules() -> list[Any]:
    return [m for name, m in list(sys.modules.items()) if m is not None and (name == "ckpt" or name.startswith("ckpt."))]


def _rebind(old: object, new: object) -> None:
    """Point every ``ckpt.*`` module-level name bound to ``old`` at ``new``."""
    for mod in _ckpt_modules():
        for name, value in list(vars(mod).items()):
            if value is old:
                setattr(mod, name, new)


@contextlib.contextmanager
def wrap_storage(recorder: Recorder, *, only: str | None = None) -> Iterator[Recorder]:
    """Make ckpt's entry points run over :class:`FaultyStorage` around the storage
    :func:`ckpt.storage.open_storage` builds (module docstring), for roots that start with
    ``only`` (None: every root). Yields ``recorder``."""
    real = ckpt.storage.open_storage

    def open_faulty(root: str, *args: Any, **kwargs: Any) -> Storage:
        storage = real(root, *args, **kwargs)
        if only is not None and not str(root).startswith(only):
            return storage
        return FaultyStorage(storage, recorder)

    _rebind(real, open_faulty)
    try:
        yield recorder
    finally:
        _rebind(open_faulty, real)
