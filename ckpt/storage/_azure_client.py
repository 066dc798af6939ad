"""How the Azure backend (``_azure``) gets its client, and the two adapters between azure-core's
request and response streams and ckpt's bodies (``_bodies``).

ckpt's client: adlfs's ``AzureBlobFileSystem`` resolves the credentials from the storage options
(connection string, account key, SAS, anonymous, service principal, ``DefaultAzureCredential``)
and builds an aio ``BlobServiceClient``, but takes no client options; ckpt replaces that client,
on a file-system instance of its own (never fsspec's cached instance, which the caller may
share), with one for the same account URL and credential whose SDK retry policy is at zero
retries (``retry_total=0``). The instance is reused for the same options in this process unless
``skip_instance_cache`` is set (a ``DefaultAzureCredential`` is then fetched once, not per call).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from typing import Any

import fsspec

# ckpt's own file systems (their clients have the SDK's retries off), per process and options
_FILESYSTEMS: dict[tuple[int, str], Any] = {}
_FS_LOCK = threading.Lock()


def own_filesystem(scheme: str, root: str, opts: dict[str, Any]) -> Any:
    """adlfs's file system for ``root`` with ``opts`` (fsspec's way: the URL's own options
    merged), ckpt's own instance, its client with the SDK's retries off."""
    cls = fsspec.get_filesystem_class(scheme)
    kwargs = dict(opts)
    fresh = bool(kwargs.pop("skip_instance_cache", False))
    kwargs = {**cls._get_kwargs_from_urls(root), **kwargs}
    key = (os.getpid(), fsspec.utils.tokenize(scheme, kwargs))
    with _FS_LOCK:
        fs = None if fresh else _FILESYSTEMS.get(key)
        if fs is None:
            fs = cls(**kwargs, skip_instance_cache=True)
            fs.service_client = _without_retries(
                fs.service_client, getattr(fs, "_timeout_kwargs", {})
            )
            if not fresh:
                _FILESYSTEMS[key] = fs
    return fs


def _without_retries(client: Any, timeouts: dict[str, Any]) -> Any:
    """A client for the same account URL (a SAS in it included) and credential as adlfs's, with
    the SDK's retries off, at its primary location (ckpt reads what it has just written)."""
    from azure.storage.blob.aio import BlobServiceClient

    transport = {k: v for k, v in timeouts.items() if k in ("connection_timeout", "read_timeout")}
    return BlobServiceClient(client.url, credential=client.credential, retry_total=0, **transport)


class Lent(io.RawIOBase):
    """A request body lent to aiohttp for one try: aiohttp closes what it has sent, and that
    closes only the loan, so the body can be sent again (a retry) and compared (the lost-reply
    check). Rewound on loan."""

    def __init__(self, body: Any) -> None:
        super().__init__()
        self._body = body
        body.seek(0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        return int(self._body.readinto(buf))

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self._body.seek(offset, whence))

    def tell(self) -> int:
        return int(self._body.tell())


class Reader:
    """An azure-core download stream, read the way ``_bodies.stream_into`` reads a body: each
    chunk as the HTTP client received it."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.ended = False

    async def read(self, _n: int = -1) -> bytes:
        chunk: bytes = await anext(self.stream, b"")
        self.ended = not chunk
        return chunk

    def close(self) -> None:
        """Drop the connection of a body not read to its end (the stream closes it at the end)."""
        if not self.ended:
            with contextlib.suppress(Exception):
                self.stream.response.internal_response.close()
