"""Azure Blob Storage (``az://``, ``abfs://``, ``abfss://``), through adlfs's credentials and the
azure-storage-blob aio client, with ckpt's own retry layer (docs/storage.md, "Azure Blob Storage").

- **The client and its retries.** adlfs builds the ``BlobServiceClient`` from the storage
  options, with its credential chains (connection string, account key, SAS, anonymous, service
  principal, ``DefaultAzureCredential``), but takes no client options; ``_azure_client``
  builds ckpt's own client for the same account URL and credential with the SDK's retry policy
  at zero retries (``retry_total=0``; otherwise azure-storage-blob's ``ExponentialRetry``
  retries 408, 429, 500, 502, 503, 504 and connection errors 3 times, sleeping about 18, 24 and
  42 s, and retries a create-only PUT whose reply was lost into a 409 it reports as a failure),
  on a file-system instance of ckpt's own (never the caller's cached one). Every request goes
  through ``ObjectStorage._retrying`` under the :class:`~ckpt.options.RetryPolicy`
  (``_azure_errors.transient`` says what is retried). The SDK's downloader (``download_blob``)
  would buffer every chunk whole and retry a broken body three times by itself with 1 s sleeps,
  and ``upload_blob`` copies a stream into one ``bytes``; ckpt calls the generated REST
  operations behind them (``BlobClient._client.blob.download``, ``.block_blob.upload``) instead.
  What remains below ckpt: aiohttp's own single retry of an idempotent request (PUT, GET,
  DELETE) on a reused connection that dropped, as on S3.
- **Data files**: up to ``single_put_max_bytes`` as one create-only Put Blob (``If-None-Match:
  *``) whose body is the one copy of the file's bytes; bigger ones as staged blocks (Put Block,
  several in flight per file under the upload byte budget, each retried) committed create-only
  (Put Block List with ``If-None-Match: *``). Nothing is visible before the commit. On failure
  the staged blocks are discarded (an empty block list committed create-only, then that empty
  blob deleted); blocks a failed cleanup leaves expire after 7 days on the service.
- **Lost replies**: a retried create-only write that meets 409 BlobAlreadyExists (or 412) is ours
  if the blob there is: for a Put Blob, our size and the Content-MD5 the service computed (else
  the bytes, read back); for a block list, exactly our committed block ids (unique per write)
  and size.
- **Reads**: one ranged GET per ``read_into``, streamed from the HTTP client's chunks straight
  into the caller's buffers and read again from the start of the range on failure; one request
  for ``read``, ``size`` and ``exists``.
- **Uploads in progress**: Azure has no upload sessions. A blob that has only uncommitted blocks
  (listed with ``include=["uncommittedblobs"]`` and absent from the plain listing) is reported as
  an :class:`~ckpt.storage.Upload` (``upload_id`` :data:`UNCOMMITTED`); aborting it discards its
  blocks as above, and never touches a committed blob.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import fsspec

from ckpt.errors import MissingShardError, ShardSizeMismatchError
from ckpt.options import RetryPolicy
from ckpt.storage._azure_client import Lent, Reader, own_filesystem
from ckpt.storage._azure_errors import azure_error, not_found, precondition_failed, transient
from ckpt.storage._base import Chunks as ChunkIter
from ckpt.storage._base import ChunkSource, Listed, Upload
from ckpt.storage._bodies import Body, Chunks, stream_into
from ckpt.storage._object import ObjectStorage, WriteSizes

T = TypeVar("T")
log = logging.getLogger("ckpt.storage")

_MiB = 1 << 20
# Writes: a file of at most AZ_SINGLE_PUT_MAX_BYTES goes up as one Put Blob; a bigger one as
# blocks of AZ_BLOCK_BYTES, at most AZ_BLOCKS_PER_FILE in flight per file.
AZ_BLOCK_BYTES = 16 * _MiB
AZ_BLOCKS_PER_FILE = 4
AZ_SINGLE_PUT_MAX_BYTES = 128 * _MiB
_AZ_MAX_BLOCKS = 50_000  # blocks per blob
_AZ_MAX_BLOCK = 4000 * _MiB  # bytes per block
_AZ_MAX_PUT = 5000 * _MiB  # bytes per Put Blob
UNCOMMITTED = "uncommitted-blocks"  # the upload_id of every Azure Upload (the service has none)


def open_azure(
    root: str, opts: dict[str, Any], *, retry: RetryPolicy, max_requests: int, writes: WriteSizes
) -> AzureStorage:
    """The Storage of an Azure root, on ckpt's own client (``_azure_client``)."""
    scheme = fsspec.core.split_protocol(root)[0] or "az"
    fs = own_filesystem(scheme, root, opts)
    path = fs._strip_protocol(root)
    return AzureStorage(fs, path, scheme=scheme, retry=retry, max_requests=max_requests, writes=writes)


def _initiated(blob: Any) -> float:
    """When a blob's first block was staged, as far as the listing says (unknown: now, so that
    garbage collection never counts it as old)."""
    when = blob.creation_time or blob.last_modified
    return float(when.timestamp()) if when is not None else time.time()


class AzureStorage(ObjectStorage):
    """A root in an Azure Blob Storage container."""

    precondition = "If-None-Match on Put Blob"

    def __init__(
        self, fs: Any, path: str, *, scheme: str, retry: RetryPolicy, max_requests: int, writes: WriteSizes
    ) -> None:
        super().__init__(fs, path, retry=retry, max_requests=max_requests, writes=writes)
        # messages name the root with the scheme given (adlfs calls itself abfs)
        self.url = f"{scheme}://{self.root.lstrip('/')}"
        self.protocol = scheme
        self.block_bytes = self.part_bytes
        self.single_put_max_bytes = min(_AZ_MAX_PUT, self.single_put_max_bytes)
        self._container, _, self._prefix = self.root.strip("/").partition("/")
        self._client = fs.service_client

    def _sizes(self, part_bytes: int | None) -> tuple[int, int]:
        return min(_AZ_MAX_BLOCK, max(1, part_bytes or AZ_BLOCK_BYTES)), AZ_SINGLE_PUT_MAX_BYTES

    # --- what ObjectStorage asks of a backend --------------------------------------------------

    def _transient(self, err: BaseException) -> str | None:
        return transient(err)

    def _bucket(self) -> str:
        return self._container

    def endpoint(self) -> str:
        """The account's blob endpoint (no SAS, no credentials)."""
        return f"{self._client.scheme}://{self._client.primary_hostname}"

    def _create_only(self, rel: str, data: bytes) -> bool:
        """One create-only Put Blob (``If-None-Match: *``): False when a blob is there."""
        try:
            self._do("upload", self._uploading(self._blob(rel), io.BytesIO(data), len(data), True))
        except FileExistsError:
            return False
        return True

    def _holds(self, rel: str, data: bytes | Body) -> bool:
        """Whether the blob at ``rel`` is exactly ``data`` (the lost-reply check): one request when
        it has our size and the service's Content-MD5 is ours, else its bytes read back."""
        want = data.view if isinstance(data, Body) else memoryview(data)
        try:
            props = self._do("get_blob_properties", self._blob(rel).get_blob_properties)
            if props.size != len(want):
                return False
            md5 = props.content_settings.content_md5
            if md5 and bytes(md5) == hashlib.md5(want, usedforsecurity=False).digest():
                return True
            return self.read(rel) == want
        except (FileNotFoundError, MissingShardError):
            return False

    # --- requests ------------------------------------------------------------------------------

    def _name(self, rel: str) -> str:
        return f"{self._prefix}/{rel}" if self._prefix else rel

    def _blob(self, rel: str) -> Any:
        return self._client.get_blob_client(self._container, self._name(rel))

    def _do(
        self, op: str, attempt: Callable[[], Awaitable[T]], tries: list[str] | None = None
    ) -> T:
        """One request (``attempt`` makes it afresh each time) on the file system's event loop,
        retried under the policy; what the service answered at the end is translated: no such
        blob -> FileNotFoundError, a blob is there -> FileExistsError, another answer -> OSError
        naming its status and code (never the SDK's multi-line text with the request's XML)."""
        try:
            return fsspec.asyn.sync(self.fs.loop, self._retrying, op, attempt, tries)  # type: ignore[no-any-return]
        except Exception as err:
            status, code = azure_error(err)
            if status is None:
                raise
            what = f"{status} {code}".strip()
            if not_found(err):
                raise FileNotFoundError(what) from err
            if precondition_failed(err):
                raise FileExistsError(what) from err
            message = (str(getattr(err, "message", "") or err).splitlines() or [""])[0]
            raise OSError(f"{what}: {message}") from err

    def _uploading(
        self, bc: Any, body: Any, n: int, create_only: bool
    ) -> Callable[[], Awaitable[Any]]:
        """One Put Blob of ``body`` (lent afresh to each try), create-only if asked. The generated
        operation takes the stream as it is (``upload_blob`` would read it into one ``bytes``)."""
        headers = {"If-None-Match": "*"} if create_only else {}

        async def once() -> Any:
            return await bc._client.block_blob.upload(
                content_length=n, body=Lent(body), headers=headers
            )

        return once

    async def _get(self, rel: str, rng: str | None) -> Reader | None:
        """One GET of the blob (of ``rng``: "bytes=a-b"), its body not read yet; None when the
        range starts past the end (416: a short read, 0 bytes)."""
        try:
            return Reader(await self._blob(rel)._client.blob.download(range=rng))
        except Exception as err:
            if azure_error(err)[0] == 416:
                return None
            raise

    async def _download_into(
        self, rel: str, start: int, buffers: list[memoryview], total: int
    ) -> int:
        """``total`` bytes from ``start`` into ``buffers``, in one GET; the bytes that landed.
        One try: the caller retries it from the start of the range."""
        reader = await self._get(rel, f"bytes={start}-{start + total - 1}")
        if reader is None:
            return 0
        try:
            got = await stream_into(reader, buffers)
            if not reader.ended:
                await reader.read()  # the end of the body: the connection goes back to the pool
            return got
        finally:
            reader.close()

    async def _download_all(self, rel: str) -> bytes:
        reader = await self._get(rel, None)
        if reader is None:
            return b""
        try:
            chunks = []
            while chunk := await reader.read():
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            reader.close()

    # --- writes --------------------------------------------------------------------------------

    def _write_single(self, rel: str, chunks: ChunkIter, size: int) -> None:
        """One create-only Put Blob; a refusal is checked against the blob there (a try whose
        reply was lost may have landed, and its retry then meets our own write)."""
        with self._single_body(chunks, size) as body:
            try:
                self._do("upload", self._uploading(self._blob(rel), body, size, True))
            except FileExistsError:
                if not self._holds(rel, body):
                    raise
                log.info("%s: a retried create-only Put Blob met its own earlier write", self.url)

    def _write_parts(self, rel: str, source: ChunkSource, size: int) -> None:
        """Staged blocks (ids unique to this write), several in flight, each retried; then one
        create-only Put Block List. A commit whose reply was lost is ours if the blob's committed
        blocks are exactly ours. On any failure the staged blocks are discarded."""
        chunks = source() if callable(source) else source
        bc = self._blob(rel)
        block = max(self.block_bytes, -(-size // _AZ_MAX_BLOCKS))
        tag = uuid.uuid4().hex
        ids = [
            f"{tag}-{i:05d}" for i in range(-(-size // block))
        ]  # one length for all, as Azure asks

        def stage(i: int, body: Body) -> Any:
            async def once() -> Any:
                return await bc.stage_block(ids[i], Lent(body), length=len(body))

            return self._retrying("stage_block", once)

        try:
            self._send_parts(Chunks(chunks), size, block, AZ_BLOCKS_PER_FILE, stage)
            try:
                self._do("commit_block_list", lambda: bc.commit_block_list(ids, if_none_match="*"))
            except FileExistsError:
                if not self._committed(bc, ids, size):
                    raise
                log.info("%s: a retried Put Block List met its own earlier commit", self.url)
        except BaseException:
            with contextlib.suppress(Exception):  # the original error is the one to report
                self._discard_blocks(rel)
            raise

    def _committed(self, bc: Any, ids: list[str], size: int) -> bool:
        """Whether the blob's committed blocks are exactly ``ids``, ``size`` bytes in all."""
        try:
            committed, _ = self._do("get_block_list", lambda: bc.get_block_list("committed"))
        except FileNotFoundError:
            return False
        return [b.id for b in committed] == ids and sum(b.size for b in committed) == size

    def _discard_blocks(self, rel: str) -> None:
        """Discard the uncommitted blocks of ``rel`` where no blob is committed there: an empty
        block list committed create-only (which discards them), then that empty blob deleted
        (if it is still the one we made). A committed blob is never touched."""
        bc = self._blob(rel)
        try:
            made = self._do(
                "commit_block_list", lambda: bc.commit_block_list([], if_none_match="*")
            )
        except FileExistsError:
            return
        with contextlib.suppress(FileNotFoundError):
            self._do("delete_blob", lambda: bc.delete_blob(if_match=made["etag"]))

    def put(self, rel: str, data: bytes, *, fsync: bool) -> None:
        with self._errors("write", rel):
            self._do("upload", self._uploading(self._blob(rel), io.BytesIO(data), len(data), False))

    # --- reads ---------------------------------------------------------------------------------

    def read(self, rel: str) -> bytes:
        """One GET."""
        with self._errors("read", rel):
            return self._do("download", lambda: self._download_all(rel))

    def read_into(self, rel: str, start: int, buffers: list[memoryview]) -> None:
        total = sum(len(b) for b in buffers)
        with self._errors(f"read of [{start}, {start + total})", rel):
            got = (
                self._do("download", lambda: self._download_into(rel, start, buffers, total))
                if total
                else 0
            )
        if got != total:
            raise ShardSizeMismatchError(
                f"{self.where(rel)}: short read at [{start}, {start + total}): got {got} bytes"
            )

    def size(self, rel: str) -> int:
        """One Get Blob Properties."""
        with self._errors("stat", rel):
            return int(self._do("get_blob_properties", self._blob(rel).get_blob_properties).size)

    def exists(self, rel: str) -> bool:
        """One Get Blob Properties (a blob with only uncommitted blocks does not exist)."""
        with self._errors("exists", rel):
            try:
                self._do("get_blob_properties", self._blob(rel).get_blob_properties)
            except FileNotFoundError:
                return False
            return True

    # --- listing and deleting ------------------------------------------------------------------

    def _list(self, prefix: str, include: list[str]) -> list[Any]:
        """Every blob whose name starts with the root's ``prefix`` (a directory), one listing
        (its pages) retried as a whole; a missing container lists nothing."""
        base = (
            self._name(prefix.strip("/")) + "/"
            if prefix.strip("/")
            else (self._prefix + "/" if self._prefix else "")
        )
        cc = self._client.get_container_client(self._container)

        async def once() -> list[Any]:
            return [b async for b in cc.list_blobs(name_starts_with=base or None, include=include)]

        try:
            return self._do("list_blobs", once)
        except FileNotFoundError:
            return []

    def _rel(self, name: str) -> str:
        return name[len(self._prefix) + 1 :] if self._prefix else name

    def list_files(self, prefix: str = "") -> list[Listed]:
        with self._errors("listing", prefix):
            found = self._list(prefix, ["metadata"])
        out = [
            Listed(
                self._rel(b.name),
                int(b.size or 0),
                b.last_modified.timestamp() if b.last_modified else float("inf"),
            )
            for b in found
            if (b.metadata or {}).get("hdi_isfolder")
            != "true"  # a directory of a hierarchical account
        ]
        return sorted(out, key=lambda f: f.path)

    def delete(self, rel: str) -> None:
        """One Delete Blob (absent: nothing to do)."""
        with self._errors("delete", rel), contextlib.suppress(FileNotFoundError):
            self._do("delete_blob", lambda: self._blob(rel).delete_blob(delete_snapshots="include"))

    def delete_tree(self, rel: str) -> None:
        for f in self.list_files(rel):
            self.delete(f.path)

    # --- uploads in progress -------------------------------------------------------------------

    def multipart_uploads(self) -> list[Upload]:
        """Blobs under the root with only uncommitted blocks (staged by a write that never
        committed): listed with their uncommitted blocks, absent from the plain listing."""
        with self._errors("listing uploads", ""):
            committed = {b.name for b in self._list("", [])}
            staged = self._list("", ["uncommittedblobs"])
        return [
            Upload(self._rel(b.name), UNCOMMITTED, _initiated(b))
            for b in staged
            if b.name not in committed
        ]

    def abort_upload(self, upload: Upload) -> None:
        with self._errors("abort upload", upload.key):
            self._discard_blocks(upload.key)
