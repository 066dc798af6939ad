"""Storage: the only module that talks to fsspec (and, for local disks, to the OS file API).

A :class:`Storage` is bound to one root URL. It offers the handful of operations ckpt needs:
create-only file writes, the create-only manifest commit, ranged reads into caller memory,
sizes, listings and deletes. Errors are translated here, once, into the ckpt hierarchy.
Credentials stay inside the fsspec instance; messages show the URL only.

Commit primitives (DESIGN section 4):
- local: temp file, fsync, ``os.link`` to the final name (EEXIST = lost), fsync the directory;
- s3: ``PutObject`` with ``If-None-Match: *`` (s3fs ``mode="create"``);
- memory: ``mode="create"`` under a process-wide lock.
Other backends have no create-only primitive we trust; they need ``allow_non_atomic_commit``.

Retries (docs/s3.md): on S3, ckpt owns the retry layer. Every request goes through
:meth:`Storage._call_s3` (or :meth:`Storage._retrying`), which retries transient errors with
exponential backoff and full jitter under a :class:`~ckpt.options.RetryPolicy`; s3fs's and
botocore's own retries are turned off for ckpt's client so the two layers never multiply. A
create-only write whose reply was lost and whose retry meets 412 reads the object back: our
own bytes there are our success, anything else a conflict.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import datetime
import errno
import hashlib
import io
import itertools
import logging
import mmap
import os
import random
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ckpt.errors import (
    CkptError,
    MissingShardError,
    ShardSizeMismatchError,
    StorageError,
    UnsafePathError,
)
from ckpt.options import RetryPolicy

T = TypeVar("T")
log = logging.getLogger("ckpt.storage")

_MEMORY_LOCK = threading.Lock()  # memory:// is one process-wide dict; make create-only atomic
_S3_MIN_PART = 5 << 20  # S3's minimum multipart part size
_S3_MAX_PARTS = 10_000  # S3's maximum number of parts of one multipart upload
_STEP_DIR = re.compile(r"\d{12}")
_MiB = 1 << 20
# S3 writes. A file of at most S3_SINGLE_PUT_MAX_BYTES goes up as one PutObject (one request,
# no multipart assembly on the server); a bigger one as a multipart upload of parts of
# S3_PART_BYTES, at most S3_PARTS_PER_FILE of them in flight per file, while the writer
# thread fills the next. Every part or single-PUT body is one contiguous copy of the file's
# bytes; all of a Storage's bodies in flight together stay under S3_MAX_INFLIGHT_BYTES.
S3_PART_BYTES = 16 * _MiB
S3_PARTS_PER_FILE = 4
S3_SINGLE_PUT_MAX_BYTES = 128 * _MiB
S3_MAX_INFLIGHT_BYTES = 256 * _MiB
S3_MAX_REQUESTS = 64  # requests in flight at once per Storage (storage_options "ckpt_max_requests")
_S3_RESTARTS = 2  # a multipart upload S3 discarded (409 on completion) is started over this often
# S3 answers that are worth another try: throttling, server errors, a conditional write that
# raced another one (409 ConditionalRequestConflict: "retry the request")
_RETRY_CODES = frozenset(
    {
        "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
        "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "ConditionalRequestConflict",
        "OperationAborted",
    }
)  # fmt: skip
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# Retries done in this process, by "operation: reason" (observability and tests), and the
# backoffs slept (the most recent ones).
RETRIES: collections.Counter[str] = collections.Counter()
BACKOFFS: collections.deque[float] = collections.deque(maxlen=10_000)
_RETRIES_LOCK = threading.Lock()
# The conditional-write probe's verdicts, per (endpoint, bucket), for this process
_PROBED: dict[tuple[str, str], bool] = {}
_PROBE_LOCK = threading.Lock()
PROBE_DIR = "_ckpt_probe"


class _Budget:
    """A counting semaphore over bytes (like the executor's ByteBudget, which storage cannot
    import): ``acquire(n)`` blocks while more than the cap is out; a request larger than the
    cap is admitted alone."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self._used and self._used + n > self._cap:
                self._cond.wait()
            self._used += n

    def release(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()


@dataclass(frozen=True, slots=True)
class Listed:
    """A file under the root: relative path, size, modification time (seconds since the epoch)."""

    path: str
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class Upload:
    """A multipart upload in progress under the root (object stores)."""

    key: str  # relative to the root
    upload_id: str
    initiated: float  # seconds since the epoch


class Storage:
    """One checkpoint root on one fsspec file system."""

    def __init__(
        self,
        root: str,
        storage_options: dict[str, Any] | None = None,
        *,
        part_bytes: int | None = None,
        single_put_max_bytes: int | None = None,
        max_inflight_bytes: int | None = None,
        retry: RetryPolicy | None = None,
        max_requests: int | None = None,
    ) -> None:
        opts = dict(storage_options or {})
        # ckpt's own knobs ride in storage_options (so every entry point takes them); fsspec never sees them
        self.retry = _retry_policy(opts.pop("ckpt_retry", None), retry)
        self.max_requests = int(max_requests or opts.pop("ckpt_max_requests", None) or S3_MAX_REQUESTS)
        opts.pop("ckpt_max_requests", None)
        if self.max_requests < 1:
            raise ValueError("ckpt_max_requests must be >= 1")
        own_retries = False
        if fsspec.core.split_protocol(root)[0] in ("s3", "s3a"):
            config = dict(opts.get("config_kwargs") or {})
            if "retries" not in config:  # the caller did not choose botocore's retries: ckpt owns them
                config["retries"] = {"mode": "standard", "total_max_attempts": 1}
                opts["config_kwargs"] = config
                own_retries = True
        self.fs, path = fsspec.core.url_to_fs(root, **opts)
        if own_retries:
            # s3fs's retry loop off too (this instance is ckpt's: its config differs from the
            # caller's own); botocore's off by the config above
            self.fs.retries = 1
        self._slots = asyncio.Semaphore(self.max_requests)  # requests in flight (bound on first use)
        self.protocol: str = (
            self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        )
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root: str = os.path.abspath(path) if self.is_local else path.rstrip("/")
        self.url = self.root if self.is_local else f"{self.protocol}://{self.root.lstrip('/')}"
        self._plain_dirs: set[str] = set()  # local: directories below the root checked to be no links
        self.atomic_create = (
            self.is_local
            or self.protocol in ("s3", "s3a", "memory")
            or bool(getattr(self.fs, "ckpt_atomic_create", False))
        )
        self.is_s3 = self.protocol in ("s3", "s3a")
        # S3 writes (None: the module defaults): multipart part size, the largest single PutObject,
        # and the bytes of upload bodies in flight at once over all of this Storage's writes
        self.part_bytes = max(_S3_MIN_PART, part_bytes or S3_PART_BYTES)
        inflight = max(max_inflight_bytes or S3_MAX_INFLIGHT_BYTES, self.part_bytes)
        # a single PUT's body is one copy of the whole file: never more than the budget allows
        self.single_put_max_bytes = (
            min(S3_SINGLE_PUT_MAX_BYTES, inflight) if single_put_max_bytes is None else single_put_max_bytes
        )
        self._upload_budget = _Budget(inflight)

    # --- paths -----------------------------------------------------------------------------

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def where(self, rel: str) -> str:
        """A path for messages: the URL plus the relative path, no credentials."""
        return f"{self.url}/{rel}"

    def check_no_links(self, rel: str, *, cached: bool = False) -> None:
        """The one containment rule of local roots (docs/guarantees.md, "Links"): ckpt never
        follows a symbolic link below the root. The root itself may be a link or lie under links;
        every directory between the root and ``rel`` must be a real directory (or not exist yet:
        ckpt creates it as one). Reads, writes, listings and deletes all check it, so nothing is
        written where it would be refused to be read, and nothing is deleted through a link.
        ``cached``: a directory found plain once is trusted for this Storage's life (reads).
        No-op on stores without links."""
        if not self.is_local:
            return
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if cached and sub in self._plain_dirs:
                continue
            try:
                st = os.lstat(self.path(sub))
            except FileNotFoundError:
                return  # created below as a real directory
            except OSError as err:
                raise StorageError(f"{self.where(sub)}: stat failed: {err}") from err
            if stat.S_ISLNK(st.st_mode):
                try:
                    to = os.readlink(self.path(sub))
                except OSError:
                    to = "?"
                raise UnsafePathError(
                    f"{self.where(sub)}: is a symbolic link (to {to}), met on the way to {rel}; ckpt "
                    "never reads, writes or deletes through a link below the root. Link or mount the "
                    "whole root instead (the root itself may be a link)"
                )
            if cached and stat.S_ISDIR(st.st_mode):
                self._plain_dirs.add(sub)

    @contextlib.contextmanager
    def _errors(self, op: str, rel: str) -> Iterator[None]:
        """Translate whatever the backend raises into the ckpt hierarchy, naming the path."""
        try:
            yield
        except CkptError:
            raise
        except FileNotFoundError as err:
            raise MissingShardError(f"{self.where(rel)}: not found") from err
        except OSError as err:
            if err.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
                raise UnsafePathError(
                    f"{self.where(rel)}: is a symbolic link; ckpt never follows links in a checkpoint"
                ) from err
            raise StorageError(f"{self.where(rel)}: {op} failed: {err}") from err
        except Exception as err:  # botocore NoCredentialsError, a bad storage option...
            raise StorageError(
                f"{self.where(rel)}: {op} failed: {type(err).__name__}: {err}"
            ) from err

    # --- S3 requests, retried (docs/s3.md) ------------------------------------------------

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
                reason = transient(err)
                delay = self._backoff(reason, i, t0)
                if reason is None or delay is None:
                    raise
                if tries is not None:
                    tries.append(reason)
                with _RETRIES_LOCK:
                    RETRIES[f"{op}: {reason}"] += 1
                    BACKOFFS.append(delay)
                log.debug("%s: %s failed (%s), retry %d in %.3f s", self.url, op, reason, i + 1, delay)
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

    async def _call_s3(self, method: str, tries: list[str] | None = None, **kwargs: Any) -> Any:
        """One S3 API call through s3fs, retried; a file-like ``Body`` is rewound for each try."""
        body = kwargs.get("Body")

        async def once() -> Any:
            if body is not None and hasattr(body, "seek"):
                body.seek(0)
            return await self.fs._call_s3(method, **kwargs)

        return await self._retrying(method, once, tries)

    def call_s3(self, method: str, tries: list[str] | None = None, **kwargs: Any) -> Any:
        """:meth:`_call_s3` from a thread outside the file system's event loop."""
        return fsspec.asyn.sync(self.fs.loop, self._call_s3, method, tries, **kwargs)

    def _retry_sync(self, op: str, fn: Callable[[], T]) -> T:
        """A blocking s3fs method (a listing, a recursive delete) retried like a request."""
        t0 = time.monotonic()
        for i in itertools.count():
            try:
                return fn()
            except Exception as err:
                reason = transient(err)
                delay = self._backoff(reason, i, t0)
                if reason is None or delay is None:
                    raise
                with _RETRIES_LOCK:
                    RETRIES[f"{op}: {reason}"] += 1
                    BACKOFFS.append(delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    async def _s3_get(self, bucket: str, key: str) -> bytes:
        """A whole object in one GetObject, retried (a body cut short is read again)."""

        async def once() -> bytes:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            body = resp["Body"]
            try:
                data: bytes = await body.read()
            finally:
                body.close()
            return data

        return await self._retrying("get_object", once)

    def _s3_holds(self, bucket: str, key: str, data: _Body | io.BytesIO | bytes) -> bool:
        """Whether the object at ``key`` is exactly ``data`` (the lost-response check): one
        HeadObject when its ETag is the MD5 of ``data`` (a plain PutObject's), else its bytes."""
        want = data if isinstance(data, bytes) else data.getvalue()
        try:
            head = self.call_s3("head_object", Bucket=bucket, Key=key)
            if int(head.get("ContentLength", -1)) != len(want):
                return False
            if str(head.get("ETag", "")).strip('"') == hashlib.md5(want, usedforsecurity=False).hexdigest():
                return True
            got: bytes = fsspec.asyn.sync(self.fs.loop, self._s3_get, bucket, key)
        except FileNotFoundError:
            return False
        return got == want

    # --- the conditional-write probe ---------------------------------------------------------

    def endpoint(self) -> str:
        """The S3 endpoint this Storage talks to (for messages and the probe's cache)."""
        ep = getattr(self.fs, "endpoint_url", None) or (getattr(self.fs, "client_kwargs", None) or {}).get("endpoint_url")
        return str(ep or "https://s3.amazonaws.com")

    def conditional_writes_work(self) -> bool:
        """Whether the endpoint honours ``If-None-Match: *`` on PutObject (S3 only; True for
        the other backends). Probed once per endpoint and bucket per process: a create-only PUT
        of a fresh key under ``<root>/_ckpt_probe/``, then the same again, which must get 412;
        the key is deleted after. Three requests."""
        if not self.is_s3:
            return True
        bucket, _, _ = self.fs.split_path(self.root + "/")
        cache_key = (self.endpoint(), bucket)
        with _PROBE_LOCK:
            if cache_key in _PROBED:
                return _PROBED[cache_key]
        rel = f"{PROBE_DIR}/{uuid.uuid4().hex}"
        _, key, _ = self.fs.split_path(self.path(rel))
        with self._errors("conditional-write probe", rel):
            self.call_s3("put_object", Bucket=bucket, Key=key, Body=io.BytesIO(b"1"), IfNoneMatch="*")
            try:
                self.call_s3("put_object", Bucket=bucket, Key=key, Body=io.BytesIO(b"2"), IfNoneMatch="*")
                works = False  # the second create-only write replaced the first
            except Exception as err:
                if not _precondition_failed(err):
                    raise
                works = True
            finally:
                with contextlib.suppress(Exception):  # a probe key left behind is harmless
                    self.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": [{"Key": key}], "Quiet": True})
        with _PROBE_LOCK:
            _PROBED[cache_key] = works
        return works

    # --- writes ----------------------------------------------------------------------------

    def write_file(
        self,
        rel: str,
        chunks: Iterable[memoryview | bytes] | Callable[[], Iterable[memoryview | bytes]],
        *,
        size: int,
        fsync: bool,
    ) -> None:
        """Create ``rel`` from ``chunks`` (``size`` bytes in all). Never overwrites; never
        publishes a partial object on failure (local partial files are removed, S3 multipart
        uploads aborted). ``chunks`` may be a function giving the data afresh on each call: an
        S3 multipart upload that S3 discarded (409 on its completion) is then started over."""
        full = self.path(rel)
        try:
            with self._errors("write", rel):
                if self.is_s3 and size > self.single_put_max_bytes:
                    self._write_s3_multipart(full, chunks, size)
                    return
                data = chunks() if callable(chunks) else chunks
                if self.is_local:
                    self.check_no_links(rel)
                    self._write_local(full, data, fsync=fsync)
                elif self.is_s3:
                    self._write_s3_single(full, data, size)
                else:
                    self.fs.pipe_file(full, b"".join(data), mode="create")
        except StorageError as err:
            if isinstance(err.__cause__, FileExistsError):
                raise StorageError(
                    f"{self.where(rel)}: already exists; data files are never overwritten"
                ) from err
            raise

    def _write_local(self, full: str, chunks: Iterable[memoryview | bytes], *, fsync: bool) -> None:
        os.makedirs(os.path.dirname(full), exist_ok=True)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            if fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(full)
            raise
        os.close(fd)

    def _write_s3_single(self, full: str, chunks: Iterable[memoryview | bytes], size: int) -> None:
        """One create-only PutObject; its body is the one copy of the file's bytes. A 412 is
        checked against the object there (its ETag, else its bytes): a try whose reply was lost
        may have landed, and its retry (ours, or aiohttp's own one-shot retry of an idempotent
        request on a reused connection) then meets our own write, which is our success."""
        bucket, key, _ = self.fs.split_path(full)
        self._upload_budget.acquire(size)
        try:
            data = _Chunks(chunks)
            body, got = data.take(size)
            if got != size or not data.exhausted():
                raise ValueError(f"the data is not the {size} bytes announced")
            try:
                self.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
            except Exception as err:
                if not (_precondition_failed(err) and self._s3_holds(bucket, key, body)):
                    raise
                log.info("%s: a retried create-only PUT met its own earlier write", self.url)
        finally:
            self._upload_budget.release(size)
        self.fs.invalidate_cache(full)

    def _write_s3_multipart(
        self,
        full: str,
        source: Iterable[memoryview | bytes] | Callable[[], Iterable[memoryview | bytes]],
        size: int,
    ) -> None:
        """A multipart upload (see :meth:`_multipart_once`), started over when S3 discarded it
        after a 409 on its completion and ``source`` can give the data again."""
        for restart in itertools.count():
            try:
                self._multipart_once(full, source() if callable(source) else source, size)
                return
            except _UploadGone as gone:
                if not callable(source) or restart >= _S3_RESTARTS:
                    raise StorageError(
                        f"{full}: S3 discarded the multipart upload ({gone}) and the data cannot be "
                        "read again here; the save must be retried"
                    ) from gone.__cause__
                with _RETRIES_LOCK:
                    RETRIES["multipart upload: restarted"] += 1

    def _multipart_once(self, full: str, chunks: Iterable[memoryview | bytes], size: int) -> None:
        """One multipart upload, parts uploaded concurrently on the file system's event loop while
        this thread fills the next one (each part retried on its own); completed create-only.
        On any failure (the data source, a part, the completion, an interrupt) the parts in
        flight are waited for and the upload is aborted: nothing becomes visible, no part is
        left stored. A completion whose reply was lost (its retry meets 412 or NoSuchUpload) is
        ours if the object has our size and the ETag our parts make."""
        bucket, key, _ = self.fs.split_path(full)
        part = max(self.part_bytes, -(-size // _S3_MAX_PARTS))
        n_parts = -(-size // part)
        data = _Chunks(chunks)
        upload_id: str = self.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
        pending: collections.deque[concurrent.futures.Future[dict[str, Any]]] = collections.deque()
        etags: list[str] = []
        try:
            for i in range(n_parts):
                n = min(part, size - i * part)
                while len(pending) >= S3_PARTS_PER_FILE:
                    etags.append(pending.popleft().result()["ETag"])
                self._upload_budget.acquire(n)
                try:
                    body, got = data.take(n)
                    if got != n:
                        raise ValueError(f"the data ends before the {size} bytes announced")
                    fut = asyncio.run_coroutine_threadsafe(
                        self._call_s3(
                            "upload_part",
                            Bucket=bucket,
                            Key=key,
                            UploadId=upload_id,
                            PartNumber=i + 1,
                            Body=body,
                        ),
                        self.fs.loop,
                    )
                except BaseException:
                    self._upload_budget.release(n)
                    raise
                fut.add_done_callback(self._releaser(n))
                del body
                pending.append(fut)
            if not data.exhausted():
                raise ValueError(f"the data is longer than the {size} bytes announced")
            while pending:
                etags.append(pending.popleft().result()["ETag"])
            tries: list[str] = []
            try:
                self.call_s3(
                    "complete_multipart_upload", tries, Bucket=bucket, Key=key, UploadId=upload_id, IfNoneMatch="*",
                    MultipartUpload={"Parts": [{"PartNumber": i + 1, "ETag": e} for i, e in enumerate(etags)]},
                )  # fmt: skip
            except Exception as err:
                status, code = _s3_error(err)
                gone = code == "NoSuchUpload" or (status == 404 and not isinstance(err, FileExistsError))
                if (gone or _precondition_failed(err)) and self._s3_is_upload(bucket, key, size, etags):
                    log.info("%s: a retried completion met its own earlier one", self.url)
                elif tries and gone:
                    raise _UploadGone(f"NoSuchUpload after {', '.join(tries)}") from err
                else:
                    raise
        except BaseException:
            # let the parts in flight end: none may land after the abort
            concurrent.futures.wait(pending)
            with contextlib.suppress(Exception):  # the original error is the one to report
                self.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            raise
        self.fs.invalidate_cache(full)

    def _s3_is_upload(self, bucket: str, key: str, size: int, etags: list[str]) -> bool:
        """Whether the object at ``key`` is the completion of our parts: our size and the ETag
        S3 gives a multipart object (the MD5 of the parts' MD5s, then ``-<parts>``). Under
        SSE-KMS part ETags are no MD5s and this says False: the write then fails closed."""
        try:
            head = self.call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        try:
            digests = b"".join(bytes.fromhex(e.strip('"')) for e in etags)
        except ValueError:
            return False
        want = f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(etags)}"
        return int(head.get("ContentLength", -1)) == size and str(head.get("ETag", "")).strip('"') == want

    def _releaser(self, n: int) -> Any:
        """A done-callback giving ``n`` bytes back to the upload budget."""
        return lambda _fut: self._upload_budget.release(n)

    def put_if_absent(self, rel: str, data: bytes, *, fsync: bool) -> bool:
        """Create ``rel`` holding ``data`` only if it does not exist. True if we created it,
        or if what is there is byte for byte ``data``: on S3 that is our own write whose reply
        was lost (a retry met 412), on the other backends an identical commit."""
        full = self.path(rel)
        try:
            with self._errors("create-only write", rel):
                if self.is_local:
                    self.check_no_links(rel)
                    return self._link_commit(full, data, fsync=fsync)
                if self.protocol == "memory":
                    with _MEMORY_LOCK:
                        self.fs.pipe_file(full, data, mode="create")
                    return True
                if self.is_s3:
                    bucket, key, _ = self.fs.split_path(full)
                    try:
                        self.call_s3("put_object", Bucket=bucket, Key=key, Body=io.BytesIO(data), IfNoneMatch="*")
                    except Exception as err:
                        if not _precondition_failed(err):
                            raise
                        return self._s3_holds(bucket, key, data)
                    finally:
                        self.fs.invalidate_cache(full)
                    return True
                self.fs.pipe_file(full, data, mode="create")
                return True
        except StorageError as err:
            if isinstance(err.__cause__, FileExistsError):
                return False
            raise

    def _link_commit(self, full: str, data: bytes, *, fsync: bool) -> bool:
        d = os.path.dirname(full)
        os.makedirs(d, exist_ok=True)
        tmp = f"{d}/.{os.path.basename(full)}.{uuid.uuid4().hex}.tmp"
        self._write_local(tmp, [data], fsync=fsync)
        try:
            os.link(tmp, full)
        except FileExistsError:
            return False
        finally:
            _unlink_quietly(tmp)
        if fsync:  # the new name, and the directories a first commit created, survive a crash
            _fsync_dir(d)
            _fsync_dir(os.path.dirname(d))
            _fsync_dir(self.root)
        return True

    def put(self, rel: str, data: bytes, *, fsync: bool) -> None:
        """Replace ``rel`` atomically (used only for the LATEST hint)."""
        full = self.path(rel)
        with self._errors("write", rel):
            if self.is_local:
                self.check_no_links(rel)
                d = os.path.dirname(full)
                os.makedirs(d, exist_ok=True)
                tmp = f"{d}/.{os.path.basename(full)}.{uuid.uuid4().hex}.tmp"
                self._write_local(tmp, [data], fsync=fsync)
                os.replace(tmp, full)
                if fsync:
                    _fsync_dir(d)
            elif self.is_s3:
                bucket, key, _ = self.fs.split_path(full)
                self.call_s3("put_object", Bucket=bucket, Key=key, Body=io.BytesIO(data))
                self.fs.invalidate_cache(full)
            else:
                self.fs.pipe_file(full, data)

    def sync_dirs(self, rels: Iterable[str]) -> None:
        """fsync directories (local disks) so new entries in them survive a crash."""
        if self.is_local:
            for rel in rels:
                _fsync_dir(self.path(rel) if rel else self.root)

    # --- reads -----------------------------------------------------------------------------

    def _open_local(self, rel: str) -> int:
        """Open a file under the root for reading: no symbolic link as the file or on the way to
        it, nothing but a regular file (a FIFO must not block us)."""
        self.check_no_links(rel, cached=True)
        fd = os.open(self.path(rel), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise UnsafePathError(f"{self.where(rel)}: {_kind(mode)}, not a regular file; ckpt reads only regular files")
        return fd

    def read(self, rel: str) -> bytes:
        """Read a small whole file (a manifest, a hint); callers check ``size`` first."""
        with self._errors("read", rel):
            if self.is_s3:  # one GetObject (s3fs would HEAD first for the size otherwise)
                bucket, key, _ = self.fs.split_path(self.path(rel))
                blob: bytes = fsspec.asyn.sync(self.fs.loop, self._s3_get, bucket, key)
                return blob
            if not self.is_local:
                data: bytes = self.fs.cat_file(self.path(rel))
                return data
            fd = self._open_local(rel)
            try:
                size = os.fstat(fd).st_size
                chunks, got = [], 0
                # bounded by the size seen at open: a growing file is not followed
                while got < size:
                    chunk = os.read(fd, size - got)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    got += len(chunk)
                return b"".join(chunks)
            finally:
                os.close(fd)

    def read_into(self, rel: str, start: int, buffers: list[memoryview]) -> None:
        """Fill ``buffers`` with the bytes of ``rel`` from ``start`` on, in order."""
        total = sum(len(b) for b in buffers)
        with self._errors(f"read of [{start}, {start + total})", rel):
            if self.is_local:
                self._preadv(rel, start, buffers, total)
                return
            if self.is_s3:
                got = fsspec.asyn.sync(self.fs.loop, self._s3_read_into, rel, start, buffers, total)
                if got != total:
                    raise ShardSizeMismatchError(
                        f"{self.where(rel)}: short read at [{start}, {start + total}): got {got} bytes"
                    )
                return
            data = self.fs.cat_file(self.path(rel), start=start, end=start + total)
        if len(data) != total:
            raise ShardSizeMismatchError(
                f"{self.where(rel)}: short read at [{start}, {start + total}): got {len(data)} bytes"
            )
        pos = 0
        for b in buffers:
            b[:] = data[pos : pos + len(b)]
            pos += len(b)

    async def _s3_read_into(
        self, rel: str, start: int, buffers: list[memoryview], total: int
    ) -> int:
        """One ranged GetObject streamed straight into ``buffers`` (one copy: from the HTTP
        client's receive chunks into place); the bytes read. A request that fails, or a body
        that breaks off or is cut short, is tried again from the start of the range (retry
        policy); the restorer checks the CRC of what lands."""
        if total == 0:
            return 0
        bucket, key, _ = self.fs.split_path(self.path(rel))

        async def once() -> int:
            resp = await self.fs._call_s3(
                "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{start + total - 1}"
            )
            body = resp["Body"]
            try:
                return await _stream_into(body, buffers)
            finally:
                body.close()

        return await self._retrying("get_object", once)

    def _preadv(self, rel: str, start: int, buffers: list[memoryview], total: int) -> None:
        fd = self._open_local(rel)
        try:
            done = 0
            views = [b for b in buffers if len(b)]
            while views:
                n = os.preadv(fd, views[:1024], start + done)  # IOV_MAX
                if n == 0:
                    raise ShardSizeMismatchError(
                        f"{self.where(rel)}: file ends at {start + done}, expected at least {start + total} bytes"
                    )
                done += n
                while views and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if n:
                    views[0] = views[0][n:]
        finally:
            os.close(fd)

    def size(self, rel: str) -> int:
        with self._errors("stat", rel):
            if self.is_local:
                self.check_no_links(rel, cached=True)
                st = os.lstat(self.path(rel))
                if stat.S_ISLNK(st.st_mode):
                    raise UnsafePathError(
                        f"{self.where(rel)}: is a symbolic link; ckpt never follows links in a checkpoint"
                    )
                if not stat.S_ISREG(st.st_mode):
                    raise UnsafePathError(f"{self.where(rel)}: {_kind(st.st_mode)}, not a regular file")
                return st.st_size
            if self.is_s3:  # one HeadObject
                bucket, key, _ = self.fs.split_path(self.path(rel))
                return int(self.call_s3("head_object", Bucket=bucket, Key=key)["ContentLength"])
            return int(self.fs.size(self.path(rel)))

    def exists(self, rel: str) -> bool:
        """Whether a file (an object) is at ``rel``; on S3 one HeadObject (s3fs's ``exists``
        would also list ``rel/`` for a directory on a miss)."""
        with self._errors("exists", rel):
            if self.is_local:
                self.check_no_links(rel, cached=True)
                return os.path.lexists(self.path(rel))
            if self.is_s3:
                bucket, key, _ = self.fs.split_path(self.path(rel))
                try:
                    self.call_s3("head_object", Bucket=bucket, Key=key)
                except FileNotFoundError:
                    return False
                return True
            return bool(self.fs.exists(self.path(rel)))

    def step_dirs(self) -> list[int]:
        """Steps that have a ``steps/<step>/manifest.json`` object (not validated)."""
        base = self.path("steps")
        with self._errors("listing", "steps"):
            if self.is_local:
                self.check_no_links("steps/x")
                names = os.listdir(base) if os.path.isdir(base) else []
                return sorted(
                    int(n)
                    for n in names
                    if _STEP_DIR.fullmatch(n) and os.path.isfile(f"{base}/{n}/manifest.json")
                )
            self.fs.invalidate_cache(base)
            try:  # one listing when steps/ exists (an exists() first would cost two more requests)
                found = self._retry_sync("listing", lambda: self.fs.find(base))
            except FileNotFoundError:
                found = []
        steps = set()
        prefix = base.rstrip("/") + "/"
        for p in found:
            rest = p[len(prefix) :] if p.startswith(prefix) else p.split("/steps/", 1)[-1]
            parts = rest.split("/")
            if len(parts) == 2 and parts[1] == "manifest.json" and _STEP_DIR.fullmatch(parts[0]):
                steps.add(int(parts[0]))
        return sorted(steps)

    def list_files(self) -> list[Listed]:
        """Every file under the root (symbolic links included as themselves, never followed)."""
        out: list[Listed] = []
        with self._errors("listing", ""):
            if self.is_local:
                for dirpath, _dirs, files in os.walk(self.root):
                    for name in files:
                        full = os.path.join(dirpath, name)
                        st = os.stat(full, follow_symlinks=False)
                        out.append(Listed(os.path.relpath(full, self.root).replace(os.sep, "/"), st.st_size, st.st_mtime))
                return sorted(out, key=lambda f: f.path)
            self.fs.invalidate_cache(self.root)
            try:
                found = self._retry_sync("listing", lambda: self.fs.find(self.root, detail=True))
            except FileNotFoundError:
                return []
        prefix = self.root.rstrip("/") + "/"
        for full, info in found.items():
            if info.get("type") == "directory" or not full.startswith(prefix):
                continue
            out.append(Listed(full[len(prefix) :], int(info.get("size") or 0), _mtime(info)))
        return sorted(out, key=lambda f: f.path)

    def multipart_uploads(self) -> list[Upload]:
        """Multipart uploads started under the root and neither completed nor aborted (S3)."""
        if not self.is_s3:
            return []
        bucket, key, _ = self.fs.split_path(self.root + "/")
        out: list[Upload] = []
        with self._errors("listing uploads", ""):
            kw: dict[str, Any] = {"Bucket": bucket, "Prefix": key}
            while True:
                page = self.call_s3("list_multipart_uploads", **kw)
                for u in page.get("Uploads", []):
                    out.append(Upload(u["Key"][len(key) :], u["UploadId"], u["Initiated"].timestamp()))
                if not page.get("IsTruncated"):
                    return out
                kw.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])

    def abort_upload(self, upload: Upload) -> None:
        bucket, key, _ = self.fs.split_path(self.path(upload.key))
        with self._errors("abort upload", upload.key):
            self.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload.upload_id)

    def remove_empty_dir(self, rel: str) -> None:
        """Remove the directory ``rel`` if it is empty (local disks; object stores have none)."""
        if self.is_local and rel:
            self.check_no_links(f"{rel}/x")
            with contextlib.suppress(OSError):
                os.rmdir(self.path(rel))

    def delete(self, rel: str, *, recursive: bool = False) -> None:
        try:
            with self._errors("delete", rel):
                full = self.path(rel)
                if self.is_local:
                    self._delete_local(rel, recursive=recursive)
                    return

                def rm() -> None:
                    if self.fs.exists(full):  # a file or a directory
                        self.fs.rm(full, recursive=recursive)

                self._retry_sync("delete", rm)
        except MissingShardError:
            pass


    def _delete_local(self, rel: str, *, recursive: bool) -> None:
        """Delete ``rel`` itself: a link is removed, never what it points to; nothing through a
        linked directory (check_no_links)."""
        self.check_no_links(rel)
        full = self.path(rel)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(full)
        elif recursive:
            shutil.rmtree(full)  # removes links inside as links, never follows them
        else:
            os.rmdir(full)


class _UploadGone(Exception):
    """S3 discarded a multipart upload before its completion took (409, then NoSuchUpload)."""


def _retry_policy(given: object, override: RetryPolicy | None) -> RetryPolicy:
    if override is not None:
        return override
    if given is None:
        return RetryPolicy()
    if isinstance(given, RetryPolicy):
        return given
    if isinstance(given, dict):
        return RetryPolicy(**given)
    raise ValueError(f"storage_options['ckpt_retry'] must be a ckpt.RetryPolicy or a dict of its fields, got {given!r}")


def _s3_error(err: BaseException) -> tuple[int | None, str]:
    """The HTTP status and S3 error code behind an error (s3fs wraps botocore's ClientError in
    a builtin exception with the ClientError as its cause); (None, "") when there is none."""
    e: BaseException | None = err
    for _ in range(8):
        if e is None:
            break
        resp = getattr(e, "response", None)
        if isinstance(resp, dict) and isinstance(resp.get("Error"), dict):
            status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return (status if isinstance(status, int) else None), str(resp["Error"].get("Code") or "")
        e = e.__cause__ or e.__context__
    return None, ""


def _precondition_failed(err: BaseException) -> bool:
    """A 412: the object a create-only write targets exists."""
    status, code = _s3_error(err)
    return isinstance(err, FileExistsError) or status == 412 or code == "PreconditionFailed"


_TRANSPORT: tuple[type[BaseException], ...] | None = None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Errors of the connection rather than of the request: reset, refused, timed out, a body
    that broke off or was cut short, a reply that does not parse (throttling proxies)."""
    global _TRANSPORT
    if _TRANSPORT is None:
        import http.client
        import importlib

        found: list[type[BaseException]] = [ConnectionError, TimeoutError, http.client.IncompleteRead]
        for mod, names in (
            ("aiohttp", ("ClientError",)),
            ("botocore.exceptions", ("HTTPClientError", "ConnectionError", "ResponseStreamingError", "ResponseParserError")),
            ("fsspec.exceptions", ("FSTimeoutError",)),
        ):
            with contextlib.suppress(ImportError):
                m = importlib.import_module(mod)
                found.extend(getattr(m, n) for n in names if hasattr(m, n))
        _TRANSPORT = tuple(found)
    return _TRANSPORT


def transient(err: BaseException) -> str | None:
    """Why ``err`` is worth another try ("503 SlowDown", "ServerDisconnectedError"...), or None
    if it is permanent (403, 404, 400, 412, a bug). An S3 answer decides by its status and code;
    otherwise the error or one of its causes must be a transport error."""
    status, code = _s3_error(err)
    if status is not None or code:
        if status in _RETRY_STATUS or code in _RETRY_CODES:
            return f"{status} {code}".strip()
        return None
    transport = _transport_errors()
    e: BaseException | None = err
    for _ in range(8):
        if e is None:
            return None
        if isinstance(e, transport):
            return type(e).__name__
        e = e.__cause__ or e.__context__
    return None


# Upload bodies: private anonymous memory, faulted in by the kernel in one go where it can
# (MAP_POPULATE, Linux: 1 GiB to moto went from 9.3 s to 8.5 s; plain mmap faulting page by page
# was 10 s). Elsewhere, or on Windows (no flags), the platform default.
_MAP_FLAGS: dict[str, int] = (
    {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)}
    if hasattr(mmap, "MAP_ANONYMOUS")
    else {}
)


class _Body(io.RawIOBase):
    """A request body in memory of its own (an anonymous mapping): a seekable, readable file
    that botocore can checksum and rewind and aiohttp streams in pieces."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self._map = mmap.mmap(-1, max(n, 1), **_MAP_FLAGS)
        self.view = memoryview(self._map)[:n]
        self._size = n
        self._pos = 0

    def truncate_to(self, n: int) -> None:
        self._size = min(self._size, n)

    def __len__(self) -> int:
        return self._size

    def getvalue(self) -> bytes:
        return bytes(self.view[: self._size])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf: Any) -> int:
        k = max(0, min(len(buf), self._size - self._pos))
        memoryview(buf).cast("B")[:k] = self.view[self._pos : self._pos + k]
        self._pos += k
        return k

    def close(self) -> None:
        if not self.closed:
            self.view.release()
            self._map.close()
        super().close()


class _Chunks:
    """The data of a file as it comes (chunks of any size), cut into bodies of any size: a chunk
    that straddles two bodies is split (as views), its rest kept for the next."""

    def __init__(self, chunks: Iterable[memoryview | bytes]) -> None:
        self._source = iter(chunks)
        self._rest = memoryview(b"")

    def take(self, n: int) -> tuple[_Body, int]:
        """The next ``n`` bytes (fewer: the data ended) as a request body, and their count.
        One copy of the chunks, into a :class:`_Body`: anonymous memory mapped for this body
        alone and unmapped when it is dropped. (A ``BytesIO`` grown to a part's size comes from
        the allocator, whose dynamic mmap threshold soon serves 16 MiB blocks from its arenas
        and keeps them: ~85 MiB more peak RSS on a 1 GiB save. A ``bytes`` body would be
        wrapped in a ``BytesIO`` sharing it, which copies it whole when aiohttp asks for its
        buffer.)"""
        body = _Body(n)
        view = body.view
        got = 0
        while got < n:
            if not self._rest:
                chunk = next(self._source, None)
                if chunk is None:
                    break
                self._rest = memoryview(chunk).cast("B")
                continue
            k = min(len(self._rest), n - got)
            view[got : got + k] = self._rest[:k]
            self._rest = self._rest[k:]
            got += k
        body.truncate_to(got)
        return body, got

    def exhausted(self) -> bool:
        """Whether no byte is left (pulls the source until a non-empty chunk or its end)."""
        while not self._rest:
            chunk = next(self._source, None)
            if chunk is None:
                return True
            self._rest = memoryview(chunk).cast("B")
        return False


async def _stream_into(body: Any, buffers: list[memoryview]) -> int:
    """Copy a streaming response body into ``buffers`` in order; the bytes copied (it stops at
    the end of the body or of the buffers, whichever comes first)."""
    content = getattr(getattr(body, "raw_stream", None), "content", None)
    readany = getattr(content, "readany", None)  # aiohttp: the next received chunk, as is (no join)
    done = 0
    rest = memoryview(b"")
    for buf in buffers:
        pos = 0
        while pos < len(buf):
            if not rest:
                chunk = await readany() if readany is not None else await body.read(len(buf) - pos)
                if not chunk:
                    return done
                rest = memoryview(chunk)
            n = min(len(rest), len(buf) - pos)
            buf[pos : pos + n] = rest[:n]
            rest = rest[n:]
            pos += n
            done += n
    if readany is not None:
        await readany()  # the end of the body (b""): the connection goes back to the pool
    return done


def _botocore_streaming_error() -> type[Exception]:
    """botocore's error for a response body that broke off (botocore ships no type hints)."""
    import importlib

    err: type[Exception] = importlib.import_module("botocore.exceptions").ResponseStreamingError
    return err


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


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # some file systems refuse dir fsync
            raise
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    for test, name in ((stat.S_ISLNK, "is a symbolic link"), (stat.S_ISDIR, "is a directory"),
                       (stat.S_ISFIFO, "is a FIFO"), (stat.S_ISSOCK, "is a socket"),
                       (stat.S_ISCHR, "is a character device"), (stat.S_ISBLK, "is a block device")):  # fmt: skip
        if test(mode):
            return name
    return f"has file mode {stat.S_IFMT(mode):o}"


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
