"""Google Cloud Storage, through gcsfs's credentials and HTTP session with ckpt's own requests
and retries (docs/storage.md, "Google Cloud Storage").

- Requests: ckpt speaks the JSON API on gcsfs's aiohttp session with gcsfs's credentials (its
  standard chain: ``token=`` / application default credentials / the metadata server), not
  through gcsfs's methods: their retry loop (``retry_request``, six tries) would multiply with
  ckpt's, and they join whole files in memory and read ranges into new bytes. Every request goes
  through the :class:`~ckpt.storage._object.ObjectStorage` retry loop under a
  :class:`~ckpt.options.RetryPolicy`, at most ``max_requests`` in flight per Storage.
- The commit: a create-only upload (``ifGenerationMatch=0``), trusted after the per-endpoint
  probe; a retried write that meets 412 is ours if the object there is our bytes.
- Data files: up to ``single_put_max_bytes`` as one create-only multipart upload (one body: the
  file's one copy); bigger ones as a resumable upload (created with ``ifGenerationMatch=0``) of
  ``part_bytes`` chunks under the Storage's upload byte budget, the next chunk filled while the
  previous one is sent; a failed chunk is resumed from the offset the service reports. A failed
  upload is cancelled (nothing becomes visible).
- Reads: one ranged GET per call, streamed straight into the destination buffers.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import datetime
import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

import crc32c
import fsspec

from ckpt.errors import ShardSizeMismatchError, StorageError
from ckpt.options import RetryPolicy
from ckpt.storage._base import Chunks as ChunkIter
from ckpt.storage._base import ChunkSource, Listed, Stat
from ckpt.storage._bodies import Body, Chunks, stream_into
from ckpt.storage._gcs_errors import IncompleteChunk, answer_error, transient
from ckpt.storage._object import MAX_REQUESTS, ObjectStorage, WriteSizes, crc32c_from_b64

T = TypeVar("T")
log = logging.getLogger("ckpt.storage")

_MiB = 1 << 20
_CHUNK_ALIGN = 256 << 10  # resumable chunks other than the last: multiples of 256 KiB
GCS_PART_BYTES = 16 * _MiB
GCS_SINGLE_PUT_MAX_BYTES = 128 * _MiB
GCS_MAX_REQUESTS = MAX_REQUESTS
_BOUNDARY = "ckpt-7f3c2a9e"
_RANGE = re.compile(r"bytes=0-(\d+)")


class GCSStorage(ObjectStorage):
    """A root in a GCS bucket."""

    precondition = "ifGenerationMatch=0 on uploads"

    def __init__(self, fs: Any, path: str, *, retry: RetryPolicy, max_requests: int, writes: WriteSizes) -> None:
        super().__init__(fs, path, retry=retry, max_requests=max_requests, writes=writes)
        self.url = f"gs://{self.root.lstrip('/')}"

    def _sizes(self, part_bytes: int | None) -> tuple[int, int]:
        # resumable upload chunks are multiples of 256 KiB
        part = -(-max(_CHUNK_ALIGN, part_bytes or GCS_PART_BYTES) // _CHUNK_ALIGN) * _CHUNK_ALIGN
        return part, GCS_SINGLE_PUT_MAX_BYTES

    # --- what the object-store base asks -----------------------------------------------------

    def _transient(self, err: BaseException) -> str | None:
        return transient(err)

    def _bucket(self) -> str:
        return self._split(self.root + "/x")[0]

    def endpoint(self) -> str:
        return str(self.fs._location)

    # --- requests ----------------------------------------------------------------------------

    def _split(self, full: str) -> tuple[str, str]:
        bucket, _, key = full.lstrip("/").partition("/")
        return bucket, key

    def _object_url(self, rel: str) -> str:
        bucket, key = self._split(self.path(rel))
        return f"{self.endpoint()}/storage/v1/b/{quote(bucket, safe='')}/o/{quote(key, safe='')}"

    def _upload_url(self) -> str:
        bucket, _ = self._split(self.root + "/x")
        return f"{self.endpoint()}/upload/storage/v1/b/{quote(bucket, safe='')}/o"

    async def _request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        data: Any = None,
        ok: tuple[int, ...] = (200,),
        into: list[memoryview] | None = None,
    ) -> tuple[int, dict[str, str], bytes | int]:
        """One request on gcsfs's session with its credentials: the status, the headers and the
        body (or, with ``into``, the count of bytes streamed into those buffers). An answer not
        in ``ok`` raises (404 FileNotFoundError, 412 FileExistsError, else GcsError)."""
        await self.fs._set_session()
        async with self.fs.session.request(
            method, url, params=params, headers=self.fs._get_headers(headers), data=data,
            timeout=self.fs.requests_timeout,
        ) as resp:  # fmt: skip
            if resp.status not in ok:
                raise answer_error(resp.status, await resp.read(), what)
            if into is not None:
                return resp.status, dict(resp.headers), await stream_into(resp.content, into)
            return resp.status, dict(resp.headers), await resp.read()

    def _sync(self, coro: Callable[[], Awaitable[T]]) -> T:
        return fsspec.asyn.sync(self.fs.loop, coro)  # type: ignore[no-any-return]

    def _retried(
        self, op: str, attempt: Callable[[], Awaitable[T]], tries: list[str] | None = None
    ) -> T:
        return self._sync(lambda: self._retrying(op, attempt, tries))

    # --- writes ------------------------------------------------------------------------------

    def _multipart_body(self, rel: str, size: int, data: ChunkIter | bytes) -> tuple[Body, int]:
        """The body of a multipart upload (the object's name, then its bytes: their one copy)
        and where the bytes start in it."""
        _, key = self._split(self.path(rel))
        head = (
            f"--{_BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            f"{json.dumps({'name': key})}\r\n--{_BOUNDARY}\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{_BOUNDARY}--\r\n".encode()
        chunks = Chunks(_framed(head, [data] if isinstance(data, bytes) else data, tail))
        total = len(head) + size + len(tail)
        body, got = chunks.take(total)
        if got != total or not chunks.exhausted() or bytes(body.view[total - len(tail) :]) != tail:
            raise ValueError(f"the data is not the {size} bytes announced")
        return body, len(head)

    async def _upload(
        self, body: Body, *, create_only: bool, tries: list[str] | None, what: str
    ) -> None:
        params = {"uploadType": "multipart", **({"ifGenerationMatch": "0"} if create_only else {})}
        headers = {"Content-Type": f'multipart/related; boundary="{_BOUNDARY}"'}

        async def once() -> None:
            body.seek(0)
            await self._request(
                "POST",
                self._upload_url(),
                what=what,
                params=params,
                headers=headers,
                data=body.view[: len(body)],
            )

        await self._retrying("upload", once, tries)

    def _create_only(self, rel: str, data: bytes) -> bool:
        """One create-only multipart upload: False on 412."""
        body, _ = self._multipart_body(rel, len(data), data)
        try:
            self._sync(
                lambda: self._upload(body, create_only=True, tries=None, what=self.where(rel))
            )
        except FileExistsError:
            return False
        return True

    def put(self, rel: str, data: bytes, *, fsync: bool) -> None:
        with self._errors("write", rel):
            body, _ = self._multipart_body(rel, len(data), data)
            self._sync(
                lambda: self._upload(body, create_only=False, tries=None, what=self.where(rel))
            )

    def _write_single(self, rel: str, chunks: ChunkIter, size: int) -> None:
        """One create-only multipart upload. A 412 is checked against the object there (its
        size and MD5): a try whose reply was lost may have landed, and its retry then meets our
        own write (as on S3, identical bytes count as ours)."""
        self._upload_budget.acquire(size)
        try:
            body, start = self._multipart_body(rel, size, chunks)
            try:
                self._sync(
                    lambda: self._upload(body, create_only=True, tries=None, what=self.where(rel))
                )
            except FileExistsError:
                if not self._holds_digest(rel, body.view[start : start + size]):
                    raise
                log.info("%s: a retried create-only upload met its own earlier write", self.url)
        finally:
            self._upload_budget.release(size)

    def _holds(self, rel: str, data: bytes) -> bool:
        return self._holds_digest(rel, memoryview(data))

    def _holds_digest(self, rel: str, data: memoryview) -> bool:
        """Whether the object at ``rel`` has our size and MD5 (the lost-reply check)."""
        try:
            meta = self._metadata(rel)
        except FileNotFoundError:
            return False
        want = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        return int(meta.get("size", -1)) == len(data) and meta.get("md5Hash") == want

    def _write_parts(self, rel: str, source: ChunkSource, size: int) -> None:
        """A resumable upload created with ``ifGenerationMatch=0``, sent in chunks while this
        thread fills the next; cancelled on any failure."""
        chunks = source() if callable(source) else source
        if size == 0:
            self._write_single(rel, chunks, size)
            return
        _, key = self._split(self.path(rel))
        what = self.where(rel)
        if self.exists(rel):  # fake-gcs-server ignores the precondition on resumable uploads
            raise FileExistsError(f"{what}: an object is there")
        session = self._retried(
            "start upload",
            lambda: self._request(
                "POST", self._upload_url(), what=what,
                params={"uploadType": "resumable", "name": key, "ifGenerationMatch": "0"},
                headers={"X-Upload-Content-Type": "application/octet-stream", "X-Upload-Content-Length": str(size)},
            ),
        )[1].get("Location")  # fmt: skip
        if not session:
            raise StorageError(f"{what}: the resumable upload was not given a session")
        data = Chunks(chunks)
        crc = 0
        pending: concurrent.futures.Future[None] | None = None
        try:
            offset = 0
            while offset < size:
                n = min(self.part_bytes, size - offset)
                self._upload_budget.acquire(n)
                try:
                    body, got = data.take(n)
                    crc = crc32c.crc32c(body.view[:got], value=crc)
                    if got != n:
                        raise ValueError(f"the data ends before the {size} bytes announced")
                    if offset + n == size and not data.exhausted():
                        raise ValueError(f"the data is longer than the {size} bytes announced")
                    if pending is not None:
                        pending.result()
                    pending = asyncio.run_coroutine_threadsafe(
                        self._send_chunk(session, body, offset, size, what), self.fs.loop
                    )
                except BaseException:
                    self._upload_budget.release(n)
                    raise
                pending.add_done_callback(self._releaser(n))
                offset += n
            if pending is not None:
                pending.result()
            self._check_upload(rel, size, crc)
        except BaseException:
            if pending is not None:
                concurrent.futures.wait([pending])
            with contextlib.suppress(Exception):  # the original error is the one to report
                self._sync(
                    lambda: self._request(
                        "DELETE", session, what=what, ok=(204, 499, 200, 404, 410)
                    )
                )
            raise

    def _check_upload(self, rel: str, size: int, crc: int) -> None:
        """The object a resumable upload made has our size and CRC32C, else it is deleted and
        the write fails: a resumed chunk the service took twice or lost never stands as data."""
        meta = self._metadata(rel)
        want = base64.b64encode(crc.to_bytes(4, "big")).decode()
        if int(meta.get("size", -1)) != size or meta.get("crc32c", want) != want:
            with contextlib.suppress(Exception):
                self.delete(rel)
            raise StorageError(
                f"{self.where(rel)}: the uploaded object does not match what was sent (size "
                f"{meta.get('size')} for {size}, CRC32C {meta.get('crc32c')} for {want}); it was deleted"
            )

    async def _send_chunk(
        self, session: str, body: Body, offset: int, size: int, what: str
    ) -> None:
        """PUT one chunk of a resumable upload; after a failed try, first ask the service how
        much it holds (a try whose reply was lost may have landed) and send only the rest."""
        n = len(body)
        end = offset + n
        held = offset  # bytes of the object the service holds, as far as this chunk knows
        failed = False

        async def once() -> None:
            nonlocal held, failed
            try:
                if failed:
                    held = await self._persisted(session, size, what)
                if held >= size or (held >= end and end < size):
                    return  # this chunk landed (its reply was lost)
                if held < offset:
                    raise StorageError(
                        f"{what}: the upload holds {held} bytes, fewer than the {offset} sent before"
                    )
                status, headers, _ = await self._request(
                    "PUT", session, what=what, headers={"Content-Range": f"bytes {held}-{end - 1}/{size}"},
                    data=body.view[held - offset : n], ok=(200, 201, 308),
                )  # fmt: skip
                if status == 308:
                    held = _held(headers)
                    if held < end:
                        raise IncompleteChunk(f"{what}: the service holds {held} of {end} bytes")
            except Exception:
                failed = True
                raise

        await self._retrying("upload chunk", once)

    async def _persisted(self, session: str, size: int, what: str) -> int:
        """How many bytes of a resumable upload the service holds (``size`` once complete)."""
        status, headers, _ = await self._request(
            "PUT",
            session,
            what=what,
            headers={"Content-Range": f"bytes */{size}"},
            data=b"",
            ok=(200, 201, 308),
        )
        return size if status != 308 else _held(headers)

    # --- reads -------------------------------------------------------------------------------

    def _get_json(
        self, op: str, url: str, params: dict[str, str] | None = None, what: str = ""
    ) -> dict[str, Any]:
        _, _, body = self._retried(
            op, lambda: self._request("GET", url, what=what or url, params=params)
        )
        assert isinstance(body, bytes)
        out = json.loads(body)
        if not isinstance(out, dict):
            raise StorageError(
                f"{self.url}: GCS answered {body[:100]!r} to a {op}, not a JSON object"
            )
        return out

    def _metadata(self, rel: str) -> dict[str, Any]:
        return self._get_json("stat", self._object_url(rel), what=self.where(rel))

    def read(self, rel: str) -> bytes:
        """One GET of the object's media."""
        url = self._object_url(rel)
        with self._errors("read", rel):
            _, _, body = self._retried(
                "read",
                lambda: self._request("GET", url, what=self.where(rel), params={"alt": "media"}),
            )
            assert isinstance(body, bytes)
            return body

    def read_into(self, rel: str, start: int, buffers: list[memoryview]) -> None:
        total = sum(len(b) for b in buffers)
        if total == 0:
            return
        url = self._object_url(rel)
        headers = {"Range": f"bytes={start}-{start + total - 1}"}

        async def once() -> int:
            try:
                _, _, got = await self._request(
                    "GET", url, what=self.where(rel), params={"alt": "media"}, headers=headers,
                    ok=(200, 206), into=buffers,
                )  # fmt: skip
            except Exception as err:
                if getattr(err, "status", None) == 416:  # the range starts past the end
                    return 0
                raise
            assert isinstance(got, int)
            return got

        with self._errors(f"read of [{start}, {start + total})", rel):
            got = self._retried("read", once)
        if got != total:
            raise ShardSizeMismatchError(
                f"{self.where(rel)}: short read at [{start}, {start + total}): got {got} bytes"
            )

    def size(self, rel: str) -> int:
        """One metadata GET."""
        with self._errors("stat", rel):
            return int(self._metadata(rel)["size"])

    def stat(self, rel: str) -> Stat:
        """One metadata GET: the size, and the CRC-32C GCS keeps for every object."""
        with self._errors("stat", rel):
            meta = self._metadata(rel)
        return Stat(int(meta["size"]), crc32c_from_b64(meta.get("crc32c")))

    def exists(self, rel: str) -> bool:
        with self._errors("exists", rel):
            try:
                self._metadata(rel)
            except FileNotFoundError:
                return False
            return True

    # --- listing and deleting ----------------------------------------------------------------

    def list_files(self, prefix: str = "") -> list[Listed]:
        bucket, key = self._split(self.path(prefix.rstrip("/")) if prefix else self.root + "/")
        key = key.rstrip("/") + "/"
        _, root_key = self._split(self.root + "/")
        url = f"{self.endpoint()}/storage/v1/b/{quote(bucket, safe='')}/o"
        out: list[Listed] = []
        params = {"prefix": key, "fields": "items(name,size,updated),nextPageToken"}
        with self._errors("listing", prefix):
            while True:
                listing = self._get_json("listing", url, dict(params))
                for item in listing.get("items", []):
                    name = str(item["name"])
                    if name.startswith(root_key) and not name.endswith("/"):
                        out.append(
                            Listed(
                                name[len(root_key) :],
                                int(item.get("size", 0)),
                                _timestamp(item.get("updated")),
                            )
                        )
                token = listing.get("nextPageToken")
                if not token:
                    return sorted(out, key=lambda f: f.path)
                params["pageToken"] = str(token)

    def delete(self, rel: str) -> None:
        url = self._object_url(rel)
        with self._errors("delete", rel), contextlib.suppress(FileNotFoundError):
            self._retried(
                "delete",
                lambda: self._request("DELETE", url, what=self.where(rel), ok=(200, 204)),
            )

    def delete_tree(self, rel: str) -> None:
        for f in self.list_files(rel):
            self.delete(f.path)


def _framed(head: bytes, data: ChunkIter, tail: bytes) -> ChunkIter:
    yield head
    yield from data
    yield tail


def _held(headers: dict[str, str]) -> int:
    """The bytes a resumable upload holds, from a 308's ``Range: bytes=0-N`` (none: 0)."""
    m = _RANGE.match(headers.get("Range", headers.get("range", "")))
    return int(m.group(1)) + 1 if m else 0


def _timestamp(value: object) -> float:
    """An RFC 3339 time as seconds since the epoch (unknown: infinity, never old enough to
    collect)."""
    if not isinstance(value, str):
        return float("inf")
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("inf")
