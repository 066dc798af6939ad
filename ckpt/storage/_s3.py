"""S3 (and S3-compatible endpoints), through s3fs's client with ckpt's own retry layer.

What the generic fsspec path lacks, and S3 needs (docs/s3.md):
- retries: every request goes through :meth:`S3Storage._call_s3` (or ``_retrying``), which retries
  transient errors (``_s3_errors.transient``) with exponential backoff and full jitter under a
  :class:`~ckpt.options.RetryPolicy`; s3fs's and botocore's own retries are off for ckpt's client
  so the two layers never multiply; at most ``max_requests`` requests in flight per Storage;
- the create-only commit (``PutObject`` with ``If-None-Match: *``), trusted only after the
  per-endpoint conditional-write probe; a write whose reply was lost and whose retry meets 412 is
  checked against the object there (our own bytes are our success);
- data files as one create-only PUT up to ``single_put_max_bytes``, else a multipart upload with
  concurrent parts under the upload byte budget, completed create-only, aborted on any failure;
- ranged GETs streamed straight into the destination buffers; one request per metadata op.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import logging
from typing import Any

import crc32c
import fsspec

from ckpt.errors import ShardSizeMismatchError, StorageError
from ckpt.format.crc import combine
from ckpt.storage._base import Chunks as ChunkIter
from ckpt.storage._base import ChunkSource, Stat, Upload
from ckpt.storage._bodies import Body, Chunks, stream_into
from ckpt.storage._object import (
    MAX_INFLIGHT_BYTES,
    MAX_REQUESTS,
    ObjectStorage,
    crc32c_b64,
    crc32c_from_b64,
)
from ckpt.storage._s3_errors import precondition_failed, s3_error, transient

log = logging.getLogger("ckpt.storage")

_S3_MIN_PART = 5 << 20  # S3's minimum multipart part size
_S3_MAX_PARTS = 10_000  # S3's maximum number of parts of one multipart upload
_MiB = 1 << 20
# S3 writes. A file of at most S3_SINGLE_PUT_MAX_BYTES goes up as one PutObject (one request,
# no multipart assembly on the server); a bigger one as a multipart upload of parts of
# S3_PART_BYTES, at most S3_PARTS_PER_FILE of them in flight per file, while the writer
# thread fills the next. Every part or single-PUT body is one contiguous copy of the file's
# bytes; all of a Storage's bodies in flight together stay under S3_MAX_INFLIGHT_BYTES.
S3_PART_BYTES = 16 * _MiB
S3_PARTS_PER_FILE = 4
S3_SINGLE_PUT_MAX_BYTES = 128 * _MiB
S3_MAX_INFLIGHT_BYTES = MAX_INFLIGHT_BYTES
S3_MAX_REQUESTS = MAX_REQUESTS
_S3_RESTARTS = 2  # a multipart upload S3 discarded (409 on completion) is started over this often


class S3Storage(ObjectStorage):
    """A root in an S3 bucket."""

    precondition = "If-None-Match on PutObject"
    #: uploads carry ckpt's CRC-32C for S3 to check and keep (storage option ``ckpt_s3_checksums``)
    checksums: bool = True
    sizes_on_reads = True  # a ranged GetObject's reply names the object's size (Content-Range)

    def _sizes(self, part_bytes: int | None) -> tuple[int, int]:
        return max(_S3_MIN_PART, part_bytes or S3_PART_BYTES), S3_SINGLE_PUT_MAX_BYTES

    def _transient(self, err: BaseException) -> str | None:
        return transient(err)

    def _bucket(self) -> str:
        return str(self.fs.split_path(self.root + "/")[0])

    # --- requests, retried (docs/s3.md) ------------------------------------------------------

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

    def _holds(self, rel: str, data: bytes) -> bool:
        bucket, key, _ = self.fs.split_path(self.path(rel))
        return self._s3_holds(bucket, key, data)

    def _s3_holds(self, bucket: str, key: str, data: Body | io.BytesIO | bytes) -> bool:
        """Whether the object at ``key`` is exactly ``data`` (the lost-response check): one
        HeadObject when its ETag is the MD5 of ``data`` (a plain PutObject's), else its bytes."""
        want = data if isinstance(data, bytes) else data.getvalue()
        try:
            head = self.call_s3("head_object", Bucket=bucket, Key=key)
            if int(head.get("ContentLength", -1)) != len(want):
                return False
            if (
                str(head.get("ETag", "")).strip('"')
                == hashlib.md5(want, usedforsecurity=False).hexdigest()
            ):
                return True
            got: bytes = fsspec.asyn.sync(self.fs.loop, self._s3_get, bucket, key)
        except FileNotFoundError:
            return False
        return got == want

    def endpoint(self) -> str:
        """The S3 endpoint this Storage talks to (for messages and the probe's cache)."""
        ep = getattr(self.fs, "endpoint_url", None) or (
            getattr(self.fs, "client_kwargs", None) or {}
        ).get("endpoint_url")
        return str(ep or "https://s3.amazonaws.com")

    def _discard(self, rel: str) -> None:
        bucket, key, _ = self.fs.split_path(self.path(rel))
        self.call_s3(
            "delete_objects", Bucket=bucket, Delete={"Objects": [{"Key": key}], "Quiet": True}
        )

    def _create_only(self, rel: str, data: bytes) -> bool:
        """One create-only PutObject (``If-None-Match: *``): False on 412."""
        bucket, key, _ = self.fs.split_path(self.path(rel))
        try:
            self.call_s3(
                "put_object", Bucket=bucket, Key=key, Body=io.BytesIO(data), IfNoneMatch="*",
                **self._crc_of(data),
            )  # fmt: skip
        except Exception as err:
            if not precondition_failed(err):
                raise
            return False
        return True

    # --- writes ----------------------------------------------------------------------------

    def _write_single(self, rel: str, chunks: ChunkIter, size: int) -> None:
        """One create-only PutObject; its body is the one copy of the file's bytes. A 412 is
        checked against the object there (its ETag, else its bytes): a try whose reply was lost
        may have landed, and its retry (ours, or aiohttp's own one-shot retry of an idempotent
        request on a reused connection) then meets our own write, which is our success."""
        full = self.path(rel)
        bucket, key, _ = self.fs.split_path(full)
        with self._single_body(chunks, size, crc=self.checksums) as body:
            try:
                self.call_s3(
                    "put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*", **self._crc_args(body)
                )  # fmt: skip
            except Exception as err:
                if not (precondition_failed(err) and self._s3_holds(bucket, key, body)):
                    raise
                log.info("%s: a retried create-only PUT met its own earlier write", self.url)
        self.fs.invalidate_cache(full)

    def _write_parts(self, rel: str, source: ChunkSource, size: int) -> None:
        """A multipart upload (see :meth:`_multipart_once`), started over when S3 discarded it
        after a 409 on its completion and ``source`` can give the data again."""
        full = self.path(rel)
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
                self._count_retry("multipart upload: restarted")

    def _multipart_once(self, full: str, chunks: ChunkIter, size: int) -> None:
        """One multipart upload, parts uploaded concurrently on the file system's event loop while
        this thread fills the next one (each part retried on its own); completed create-only.
        On any failure (the data source, a part, the completion, an interrupt) the parts in
        flight are waited for and the upload is aborted: nothing becomes visible, no part is
        left stored. A completion whose reply was lost (its retry meets 412 or NoSuchUpload) is
        ours if the object has our size and the ETag our parts make."""
        bucket, key, _ = self.fs.split_path(full)
        # parts end on chunk boundaries where one falls in their last quarter (their CRC-32C
        # is then combined from the chunks' own: no byte hashed twice); every part but the last
        # holds at least 3/4 of ``part`` bytes, so the count stays within S3's limit
        part = max(self.part_bytes, -(-size * 4 // (3 * _S3_MAX_PARTS)))
        at_least = max(_S3_MIN_PART, part - part // 4) if self.checksums else None
        sums: dict[str, Any] = (
            {"ChecksumAlgorithm": "CRC32C", "ChecksumType": "FULL_OBJECT"} if self.checksums else {}
        )
        upload_id: str = self.call_s3(
            "create_multipart_upload", Bucket=bucket, Key=key, **sums
        )["UploadId"]
        try:
            done = self._send_parts(
                Chunks(chunks, crc=self.checksums), size, part, S3_PARTS_PER_FILE,
                lambda i, body: self._upload_part(bucket, key, upload_id, i, body), at_least=at_least,
            )  # fmt: skip
            etags: list[str] = [etag for etag, _, _ in done]
            parts: list[dict[str, Any]] = [{"PartNumber": i + 1, "ETag": e} for i, e in enumerate(etags)]
            whole: dict[str, Any] = {}
            if self.checksums:
                crc = 0
                for p, (_, c, n) in zip(parts, done, strict=True):
                    p["ChecksumCRC32C"] = crc32c_b64(c)
                    crc = combine(crc, c, n)
                whole = {"ChecksumType": "FULL_OBJECT", "ChecksumCRC32C": crc32c_b64(crc)}
            tries: list[str] = []
            try:
                self.call_s3(
                    "complete_multipart_upload", tries, Bucket=bucket, Key=key, UploadId=upload_id, IfNoneMatch="*",
                    MultipartUpload={"Parts": parts}, **whole,
                )  # fmt: skip
            except Exception as err:
                status, code = s3_error(err)
                gone = code == "NoSuchUpload" or (
                    status == 404 and not isinstance(err, FileExistsError)
                )
                if (gone or precondition_failed(err)) and self._s3_is_upload(
                    bucket, key, size, etags
                ):
                    log.info("%s: a retried completion met its own earlier one", self.url)
                elif tries and gone:
                    raise _UploadGone(f"NoSuchUpload after {', '.join(tries)}") from err
                else:
                    raise
        except BaseException:
            # the parts in flight have ended (_send_parts): none lands after the abort
            with contextlib.suppress(Exception):  # the original error is the one to report
                self.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            raise
        self.fs.invalidate_cache(full)

    async def _upload_part(
        self, bucket: str, key: str, upload_id: str, i: int, body: Body
    ) -> tuple[str, int, int]:
        """UploadPart ``i`` (from 0) with its CRC-32C (if checksums are on): its ETag, CRC-32C
        and length."""
        resp = await self._call_s3(
            "upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=i + 1, Body=body,
            **self._crc_args(body),
        )  # fmt: skip
        return str(resp["ETag"]), body.crc32c or 0, len(body)

    def _crc_of(self, data: bytes) -> dict[str, Any]:
        """The checksum parameters of a small object's PutObject (a manifest, a hint)."""
        if not self.checksums:
            return {}
        return {"ChecksumAlgorithm": "CRC32C", "ChecksumCRC32C": crc32c_b64(crc32c.crc32c(data))}

    def _crc_args(self, body: Body) -> dict[str, Any]:
        """The request's checksum parameters: the body's CRC-32C, which S3 checks before it
        stores the bytes and keeps with the object (none when checksums are off)."""
        if body.crc32c is None:
            return {}
        return {"ChecksumAlgorithm": "CRC32C", "ChecksumCRC32C": crc32c_b64(body.crc32c)}

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
        return (
            int(head.get("ContentLength", -1)) == size
            and str(head.get("ETag", "")).strip('"') == want
        )

    def put(self, rel: str, data: bytes, *, fsync: bool) -> None:
        full = self.path(rel)
        with self._errors("write", rel):
            bucket, key, _ = self.fs.split_path(full)
            self.call_s3(
                "put_object", Bucket=bucket, Key=key, Body=io.BytesIO(data), **self._crc_of(data)
            )
            self.fs.invalidate_cache(full)

    # --- reads -----------------------------------------------------------------------------

    def read(self, rel: str) -> bytes:
        """One GetObject (s3fs would HEAD first for the size otherwise)."""
        with self._errors("read", rel):
            bucket, key, _ = self.fs.split_path(self.path(rel))
            blob: bytes = fsspec.asyn.sync(self.fs.loop, self._s3_get, bucket, key)
            return blob

    def read_small(self, rel: str, max_bytes: int) -> tuple[int, bytes | None]:
        """One GetObject: its reply's Content-Length is checked before the body is read (a file
        over ``max_bytes`` is never read: the connection is dropped)."""
        with self._errors("read", rel):
            bucket, key, _ = self.fs.split_path(self.path(rel))
            got: tuple[int, bytes | None] = fsspec.asyn.sync(
                self.fs.loop, self._s3_get_small, bucket, key, max_bytes
            )
            return got

    async def _s3_get_small(self, bucket: str, key: str, max_bytes: int) -> tuple[int, bytes | None]:
        async def once() -> tuple[int, bytes | None]:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            body = resp["Body"]
            try:
                size = int(resp["ContentLength"])
                if size > max_bytes:
                    return size, None
                data: bytes = await body.read()
            finally:
                body.close()
            return size, data

        return await self._retrying("get_object", once)

    def read_into(self, rel: str, start: int, buffers: list[memoryview]) -> None:
        self._read_into(rel, start, buffers, None)

    def read_into_sized(self, rel: str, start: int, buffers: list[memoryview], *, file_size: int) -> None:
        """A ranged GetObject whose reply's Content-Range names the object's size: one that is
        not ``file_size`` is ShardSizeMismatchError (no HeadObject needed before the reads)."""
        self._read_into(rel, start, buffers, file_size)

    def _read_into(self, rel: str, start: int, buffers: list[memoryview], file_size: int | None) -> None:
        total = sum(len(b) for b in buffers)
        with self._errors(f"read of [{start}, {start + total})", rel):
            got, seen = fsspec.asyn.sync(self.fs.loop, self._s3_read_into, rel, start, buffers, total)
            if file_size is not None and seen is None:  # no Content-Range in the reply: ask
                seen = self.size(rel)
        if file_size is not None and seen != file_size:
            raise ShardSizeMismatchError(
                f"{self.where(rel)}: {seen} bytes, the manifest says {file_size}; truncated or extended"
            )
        if got != total:
            raise ShardSizeMismatchError(
                f"{self.where(rel)}: short read at [{start}, {start + total}): got {got} bytes"
            )

    async def _s3_read_into(
        self, rel: str, start: int, buffers: list[memoryview], total: int
    ) -> tuple[int, int | None]:
        """One ranged GetObject streamed straight into ``buffers`` (one copy: from the HTTP
        client's receive chunks into place); the bytes read, and the object's size as the
        reply's Content-Range states it (None if it does not). A request that fails, or a body
        that breaks off or is cut short, is tried again from the start of the range (retry
        policy); the restorer checks the CRC of what lands."""
        if total == 0:
            return 0, None
        bucket, key, _ = self.fs.split_path(self.path(rel))

        async def once() -> tuple[int, int | None]:
            try:
                resp = await self.fs._call_s3(
                    "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{start + total - 1}"
                )
            except Exception as err:
                status, code = s3_error(err)
                if status == 416 or code == "InvalidRange":  # the range starts past the end
                    return 0, None  # a short read (ShardSizeMismatchError), as on every backend
                raise
            body = resp["Body"]
            try:
                got = await stream_into(body, buffers)
            finally:
                body.close()
            return got, _object_size(resp.get("ContentRange"))

        return await self._retrying("get_object", once)

    def size(self, rel: str) -> int:
        """One HeadObject."""
        with self._errors("stat", rel):
            bucket, key, _ = self.fs.split_path(self.path(rel))
            return int(self.call_s3("head_object", Bucket=bucket, Key=key)["ContentLength"])

    def stat(self, rel: str) -> Stat:
        """One HeadObject asking for the stored checksum (``ChecksumMode=ENABLED``): the size,
        and the object's CRC-32C when it has a whole-object one (ckpt's uploads since it sends
        them; an older object, or one with a composite multipart checksum, has none)."""
        with self._errors("stat", rel):
            bucket, key, _ = self.fs.split_path(self.path(rel))
            head = self.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        crc = head.get("ChecksumCRC32C")
        whole = crc is not None and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
        return Stat(int(head["ContentLength"]), crc32c_from_b64(crc) if whole else None)

    def exists(self, rel: str) -> bool:
        """One HeadObject (s3fs's ``exists`` would also list ``rel/`` for a directory on a miss)."""
        with self._errors("exists", rel):
            bucket, key, _ = self.fs.split_path(self.path(rel))
            try:
                self.call_s3("head_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return False
            return True

    # --- uploads in progress -----------------------------------------------------------------

    def multipart_uploads(self) -> list[Upload]:
        """Multipart uploads started under the root and neither completed nor aborted (S3)."""
        bucket, key, _ = self.fs.split_path(self.root + "/")
        out: list[Upload] = []
        with self._errors("listing uploads", ""):
            kw: dict[str, Any] = {"Bucket": bucket, "Prefix": key}
            while True:
                page = self.call_s3("list_multipart_uploads", **kw)
                for u in page.get("Uploads", []):
                    out.append(
                        Upload(u["Key"][len(key) :], u["UploadId"], u["Initiated"].timestamp())
                    )
                if not page.get("IsTruncated"):
                    return out
                kw.update(
                    KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"]
                )

    def abort_upload(self, upload: Upload) -> None:
        bucket, key, _ = self.fs.split_path(self.path(upload.key))
        with self._errors("abort upload", upload.key):
            self.call_s3(
                "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload.upload_id
            )


def _object_size(content_range: object) -> int | None:
    """The object's size from a Content-Range reply header (``bytes 0-99/1234``), or None."""
    if not isinstance(content_range, str) or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


class _UploadGone(Exception):
    """S3 discarded a multipart upload before its completion took (409, then NoSuchUpload)."""
