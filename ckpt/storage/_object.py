"""What every object-store backend (S3, GCS, Azure Blob) shares: ckpt's own retry loop, the
request slots, the upload byte budget, the per-endpoint conditional-write probe and the
lost-reply check of a create-only write (docs/storage.md, "Object stores").

A backend subclasses :class:`ObjectStorage` and supplies: ``_transient(err)`` (its error
vocabulary: the reason a failure may be retried, or None), ``_create_only(rel, data)`` (one
create-only write of a small object: True if it created it, False if the service refused because
an object is there), ``_discard(rel)``, ``_bucket()`` (the bucket or container, for the probe's
cache), and its writes: ``_sizes`` (the defaults and limits of :class:`WriteSizes`), ``_write_single`` and ``_write_parts`` (one
request, or parts published create-only; :meth:`ObjectStorage.write_file` picks one).
The clients' own retry loops are turned off where the backend builds its client, so the two
layers never multiply.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from ckpt._concurrency import ByteBudget
from ckpt.errors import MissingShardError
from ckpt.options import RetryPolicy
from ckpt.storage._base import Chunks as ChunkIter
from ckpt.storage._base import ChunkSource
from ckpt.storage._bodies import Body, Chunks
from ckpt.storage._fsspec import FsspecStorage

T = TypeVar("T")
log = logging.getLogger("ckpt.storage")

_MiB = 1 << 20
MAX_REQUESTS = 64  # requests in flight at once per Storage (storage_options "ckpt_max_requests")
MAX_INFLIGHT_BYTES = 256 * _MiB  # upload bodies in flight at once per Storage
# Retries done in this process, by "operation: reason" (observability and tests), and the
# backoffs slept (the most recent ones); each Storage counts its own too (``.retries``).
RETRIES: collections.Counter[str] = collections.Counter()
BACKOFFS: collections.deque[float] = collections.deque(maxlen=10_000)
_RETRIES_LOCK = threading.Lock()
# The conditional-write probe's verdicts, per (backend, endpoint, bucket), for this process
_PROBED: dict[tuple[str, str, str], bool] = {}
_PROBE_LOCK = threading.Lock()
PROBE_DIR = "_ckpt_probe"


@dataclass(frozen=True, slots=True)
class WriteSizes:
    """An object store's write sizes (``open_storage``'s knobs); None: the backend's default.
    ``part_bytes``: a part of a bigger file; ``single_put_max_bytes``: the largest file sent as
    one request; ``max_inflight_bytes``: upload bodies in flight at once over all of a Storage's
    writes (never under one part)."""

    part_bytes: int | None = None
    single_put_max_bytes: int | None = None
    max_inflight_bytes: int | None = None


def crc32c_b64(crc: int) -> str:
    """A CRC-32C as S3 and GCS write it: base64 of its 4 big-endian bytes."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def crc32c_from_b64(value: object) -> int | None:
    """A CRC-32C a service reported (base64 of 4 bytes), or None for anything else (S3's
    composite multipart checksum with its ``-N`` suffix, another length, nothing)."""
    if not isinstance(value, str):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return None
    return int.from_bytes(raw, "big") if len(raw) == 4 else None


class ObjectStorage(FsspecStorage):
    """A root in a bucket of an object store, with ckpt's retries and the commit probe."""

    atomic_create = True
    streams_chunks = True
    write_confirms_size = True  # one body of exactly ``size`` bytes, or parts that add up to it

    def __init__(
        self, fs: Any, path: str, *, retry: RetryPolicy, max_requests: int, writes: WriteSizes
    ) -> None:
        super().__init__(fs, path)
        part, single_default = self._sizes(writes.part_bytes)
        inflight = max(writes.max_inflight_bytes or MAX_INFLIGHT_BYTES, part)
        self.part_bytes = part  # a part (S3), chunk (GCS) or block (Azure) of a bigger file
        # a single request's body is one copy of the whole file: by default never more than
        # the budget allows
        single = writes.single_put_max_bytes
        self.single_put_max_bytes = min(single_default, inflight) if single is None else single
        self.atomic_create = True
        self.retry = retry
        self.max_requests = max_requests
        self._slots = asyncio.Semaphore(max_requests)  # requests in flight (bound on first use)
        self._upload_budget = ByteBudget(inflight)

    # --- what a backend supplies -------------------------------------------------------------

    def _sizes(self, part_bytes: int | None) -> tuple[int, int]:
        """The part size for ``part_bytes`` (None: the default) within the service's limits, and
        the largest file sent as one request by default (read when the Storage is made)."""
        raise NotImplementedError

    def _transient(self, err: BaseException) -> str | None:
        """Why ``err`` may be retried (a short reason for the counters), or None."""
        raise NotImplementedError

    def _create_only(self, rel: str, data: bytes) -> bool:
        """One create-only write of a small object (retried under the policy): True if it created
        it, False if the service refused it because an object is at ``rel``."""
        raise NotImplementedError

    def _bucket(self) -> str:
        raise NotImplementedError

    def _discard(self, rel: str) -> None:
        """Delete a probe key (one request where the service allows it)."""
        self.delete(rel)

    # --- retries (docs/storage.md) -----------------------------------------------------------

    def _count_retry(self, key: str, delay: float | None = None) -> None:
        with _RETRIES_LOCK:
            RETRIES[key] += 1
            self.retries[key] += 1
            if delay is not None:
                BACKOFFS.append(delay)

    async def _retrying(
        self, op: str, attempt: Callable[[], Awaitable[T]], tries: list[str] | None = None
    ) -> T:
        """Run ``attempt`` (one request, made afresh each time) until it succeeds, retrying
        transient failures under the policy; each try holds one of the Storage's request
        slots, the backoff sleeps hold none. ``tries`` collects the reasons of failed tries (a
        create-only write uses them to know its first try may have landed)."""
        t0 = time.monotonic()
        for i in itertools.count():
            try:
                async with self._slots:
                    return await attempt()
            except Exception as err:
                reason = self._transient(err)
                delay = self._backoff(reason, i, t0)
                if reason is None or delay is None:
                    raise
                if tries is not None:
                    tries.append(reason)
                self._count_retry(f"{op}: {reason}", delay)
                log.debug(
                    "%s: %s failed (%s), retry %d in %.3f s", self.url, op, reason, i + 1, delay
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, reason: str | None, i: int, t0: float) -> float | None:
        """The sleep before retry ``i + 1``, or None when the policy allows no more."""
        if reason is None or i + 1 >= self.retry.attempts:
            return None
        delay = self.retry.backoff(i, random.random())
        if time.monotonic() - t0 + delay > self.retry.deadline_s:
            return None
        return delay

    def _call(self, op: str, fn: Callable[[], T]) -> T:
        """A blocking client method (a listing, a recursive delete) retried like a request."""
        t0 = time.monotonic()
        for i in itertools.count():
            try:
                return fn()
            except Exception as err:
                reason = self._transient(err)
                delay = self._backoff(reason, i, t0)
                if reason is None or delay is None:
                    raise
                self._count_retry(f"{op}: {reason}", delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _releaser(self, n: int) -> Any:
        """A done-callback giving ``n`` bytes back to the upload budget."""
        return lambda _fut: self._upload_budget.release(n)

    # --- writes: what every backend's write_file is made of ------------------------------------

    def write_file(self, rel: str, chunks: ChunkSource, *, size: int, fsync: bool, stable: bool = False) -> None:
        """A data file, create-only: up to ``single_put_max_bytes`` as one request, a bigger one
        in parts (``_write_parts``: the backend's multipart upload, resumable upload or blocks)."""
        with self._creating(rel):
            if size > self.single_put_max_bytes:
                self._write_parts(rel, chunks, size)
            else:
                self._write_single(rel, chunks() if callable(chunks) else chunks, size)

    def _write_single(self, rel: str, chunks: ChunkIter, size: int) -> None:
        """One create-only request whose body is the file (``_single_body``)."""
        raise NotImplementedError

    def _write_parts(self, rel: str, source: ChunkSource, size: int) -> None:
        """The file in parts under the upload budget, published create-only at the end;
        ``source`` may be a function that gives the data again (a restart)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _single_body(self, chunks: ChunkIter, size: int, *, crc: bool = False) -> Iterator[Body]:
        """The whole file as one request body (one copy of its bytes), held under the upload
        budget while the caller sends it; data that is not exactly ``size`` bytes is a ValueError.
        ``crc``: the body carries its CRC-32C (``Chunks``: from the chunks' own where they have one)."""
        self._upload_budget.acquire(size)
        try:
            data = Chunks(chunks, crc=crc)
            body, got = data.take(size)
            if got != size or not data.exhausted():
                raise ValueError(f"the data is not the {size} bytes announced")
            yield body
        finally:
            self._upload_budget.release(size)

    def _send_parts(
        self,
        data: Chunks,
        size: int,
        part: int,
        per_file: int,
        send: Callable[[int, Body], Coroutine[Any, Any, T]],
        *,
        at_least: int | None = None,
    ) -> list[T]:
        """Cut ``size`` bytes of ``data`` into parts of ``part`` bytes and send each one
        (``send(i, body)``, a coroutine retried by the backend) on the file system's event loop
        while this thread fills the next: at most ``per_file`` in flight, every body under the
        upload budget until its request ends. With ``at_least``, a part may end early on a chunk
        boundary once it holds that many bytes (``Chunks.take``; a service that takes parts of
        any size). The results in order. On any failure (the data source, a part, an interrupt)
        the parts in flight are waited for before the error goes up, so none lands after the
        caller cleans up."""
        pending: collections.deque[concurrent.futures.Future[T]] = collections.deque()
        out: list[T] = []
        try:
            sent = 0
            for i in itertools.count():
                if sent >= size:
                    break
                n = min(part, size - sent)
                while len(pending) >= per_file:
                    out.append(pending.popleft().result())
                self._upload_budget.acquire(n)
                try:
                    body, got = data.take(n, at_least=at_least)
                    if got != n and (got == 0 or at_least is None or got < at_least):
                        raise ValueError(f"the data ends before the {size} bytes announced")
                    fut = asyncio.run_coroutine_threadsafe(send(i, body), self.fs.loop)
                except BaseException:
                    self._upload_budget.release(n)
                    raise
                fut.add_done_callback(self._releaser(n))
                del body
                pending.append(fut)
                sent += got
            if not data.exhausted():
                raise ValueError(f"the data is longer than the {size} bytes announced")
            while pending:
                out.append(pending.popleft().result())
        except BaseException:
            concurrent.futures.wait(pending)
            raise
        return out

    # --- the commit ----------------------------------------------------------------------------

    def conditional_writes_work(self) -> bool:
        """Whether the endpoint honours the create-only precondition. Probed once per backend,
        endpoint and bucket per process: a create-only write of a fresh key under
        ``<root>/_ckpt_probe/``, then another to the same key, which must be refused; the key is
        deleted after."""
        cache_key = (type(self).__name__, self.endpoint(), self._bucket())
        with _PROBE_LOCK:
            if cache_key in _PROBED:
                return _PROBED[cache_key]
        rel = f"{PROBE_DIR}/{uuid.uuid4().hex}"
        with self._errors("conditional-write probe", rel):
            self._create_only(rel, b"1")
            try:
                works = not self._create_only(rel, b"2")
            finally:
                with contextlib.suppress(Exception):  # a probe key left behind is harmless
                    self._discard(rel)
        with _PROBE_LOCK:
            _PROBED[cache_key] = works
        return works

    def put_if_absent(self, rel: str, data: bytes, *, fsync: bool) -> bool:
        """A create-only write; refused, it is ours if the object there is exactly ``data`` (a
        try whose reply was lost may have landed, and its retry then meets our own write)."""
        full = self.path(rel)
        try:
            with self._errors("create-only write", rel):
                if self._create_only(rel, data):
                    return True
                return self._holds(rel, data)
        finally:
            self.fs.invalidate_cache(full)

    def _holds(self, rel: str, data: bytes) -> bool:
        """Whether the object at ``rel`` is exactly ``data`` (the lost-reply check): its bytes,
        read back (a backend may answer from the object's checksum instead)."""
        try:
            return self.read(rel) == data
        except MissingShardError:
            return False
