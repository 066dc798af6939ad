"""Storage: the only package that talks to fsspec (and, for local disks, to the OS file API).

:func:`open_storage` picks the backend for a root once; each backend is one module behind the
one contract of :class:`Storage` (``_base``): ``_local`` (O_EXCL writes, link commit, fsync,
``preadv``, the containment rule), ``_fsspec`` (any other fsspec file system: ``memory://``,
gcs, azure...), ``_s3`` (multipart, the conditional-write probe, lost-reply checks, ckpt's own
retries; its error vocabulary is ``_s3_errors``). Credentials stay inside the fsspec instance;
messages show the URL only.

Importing this package imports neither fsspec nor the object-store backends (asyncio, s3fs,
gcsfs, adlfs): :func:`open_storage` imports them for a root that needs them, and a plain local
path (the ``ckpt`` command line's usual root) opens :class:`LocalStorage` without them. The
object-store names (``S3Storage``, ``RETRIES``...) are imported on first use.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any, TypeAlias

from ckpt._concurrency import DEFAULT_IO_TIMEOUT_S
from ckpt.errors import RootTypeError
from ckpt.options import RetryPolicy
from ckpt.storage._base import Checked, Listed, Stat, Storage, Upload
from ckpt.storage._fsspec import FsspecStorage
from ckpt.storage._local import LocalStorage

if TYPE_CHECKING:  # at run time from __getattr__: the object-store backends import fsspec, asyncio
    from ckpt.storage._azure import AzureStorage
    from ckpt.storage._gcs import GCSStorage
    from ckpt.storage._object import BACKOFFS, PROBE_DIR, RETRIES, ObjectStorage
    from ckpt.storage._s3 import S3Storage

# Imported on first use, so that opening a local root imports neither fsspec nor a cloud backend.
_LAZY: dict[str, str] = {
    "AzureStorage": "ckpt.storage._azure",
    "GCSStorage": "ckpt.storage._gcs",
    "BACKOFFS": "ckpt.storage._object",
    "PROBE_DIR": "ckpt.storage._object",
    "RETRIES": "ckpt.storage._object",
    "ObjectStorage": "ckpt.storage._object",
    "S3Storage": "ckpt.storage._s3",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "BACKOFFS",
    "PROBE_DIR",
    "RETRIES",
    "AzureStorage",
    "Checked",
    "FsspecStorage",
    "GCSStorage",
    "Listed",
    "LocalStorage",
    "ObjectStorage",
    "Root",
    "S3Storage",
    "Stat",
    "Storage",
    "Upload",
    "open_storage",
    "root_url",
    "trusts_create_only",
]

Root: TypeAlias = "str | os.PathLike[str]"  # what every public function takes as a root


def root_url(root: Root, what: str = "root") -> str:
    """``root`` as the string ckpt keeps (a local path or an fsspec URL): a ``pathlib.Path`` or
    any ``os.PathLike`` becomes its path; anything else is refused (RootTypeError)."""
    if isinstance(root, str):
        return root
    if isinstance(root, os.PathLike):
        path = os.fspath(root)
        if isinstance(path, str):
            return path
    raise RootTypeError(f"{what} must be a str or os.PathLike (a path or an fsspec URL), not {type(root).__name__}")

_S3_PROTOCOLS = ("s3", "s3a")
_GCS_PROTOCOLS = ("gs", "gcs")
_AZURE_PROTOCOLS = ("az", "abfs", "abfss")  # adlfs's


def open_storage(
    root: Root,
    storage_options: dict[str, Any] | None = None,
    *,
    part_bytes: int | None = None,
    single_put_max_bytes: int | None = None,
    max_inflight_bytes: int | None = None,
    retry: RetryPolicy | None = None,
    max_requests: int | None = None,
    io_timeout_s: float | None = DEFAULT_IO_TIMEOUT_S,
) -> Storage:
    """The storage of one checkpoint root: a path or fsspec URL, with ``storage_options`` the
    fsspec way. ckpt's own knobs may ride in ``storage_options`` too (so every entry point takes
    them; fsspec never sees them): ``ckpt_retry`` (a RetryPolicy or a dict of its fields),
    ``ckpt_max_requests`` (requests in flight per Storage of an object store),
    ``ckpt_s3_checksums`` (False: S3 uploads carry no CRC-32C, for an S3-compatible endpoint
    that refuses them; docs/s3.md) and
    ``ckpt_io_timeout_s`` (the deadline of every storage call, ``Storage.io_timeout_s``: seconds,
    or None for none; when given it wins over ``io_timeout_s``, which entry points set from their
    own options). The write knobs (``part_bytes``, ``single_put_max_bytes``,
    ``max_inflight_bytes``: None for the defaults) matter to object stores only."""
    root = root_url(root)
    opts = dict(storage_options or {})
    timeout = _io_timeout(opts.pop("ckpt_io_timeout_s", io_timeout_s))
    storage = _backend(
        root, opts, part_bytes=part_bytes, single_put_max_bytes=single_put_max_bytes,
        max_inflight_bytes=max_inflight_bytes, retry=retry, max_requests=max_requests,
    )  # fmt: skip
    storage.io_timeout_s = timeout
    return storage


def _backend(
    root: str,
    storage_options: dict[str, Any] | None,
    *,
    part_bytes: int | None,
    single_put_max_bytes: int | None,
    max_inflight_bytes: int | None,
    retry: RetryPolicy | None,
    max_requests: int | None,
) -> Storage:
    """The backend of ``root`` (:func:`open_storage`, whose deadline it does not set)."""
    opts = dict(storage_options or {})
    policy = _retry_policy(opts.pop("ckpt_retry", None), retry)
    given = max_requests or opts.pop("ckpt_max_requests", None)
    opts.pop("ckpt_max_requests", None)
    requests = int(given) if given else None  # None: the backend's default
    if requests is not None and requests < 1:
        raise ValueError("ckpt_max_requests must be >= 1")
    checksums = _flag(opts.pop("ckpt_s3_checksums", True), "ckpt_s3_checksums")
    if _plain_local_path(root) and not opts:
        return LocalStorage(os.path.expanduser(root))  # what fsspec would open, without importing it
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    protocol = fsspec.core.split_protocol(root)[0]
    if protocol not in (*_S3_PROTOCOLS, *_GCS_PROTOCOLS, *_AZURE_PROTOCOLS):
        fs, path = fsspec.core.url_to_fs(root, **opts)
        if isinstance(fs, LocalFileSystem):
            return LocalStorage(path)
        return FsspecStorage(fs, path)
    # an object store: ckpt's own backend for it (each imports its client library's world)
    from ckpt.storage._object import MAX_REQUESTS, WriteSizes

    requests = requests or MAX_REQUESTS
    writes = WriteSizes(part_bytes, single_put_max_bytes, max_inflight_bytes)
    if protocol in _GCS_PROTOCOLS:
        from ckpt.storage._gcs import GCSStorage

        # ckpt makes its own requests on gcsfs's session: gcsfs's retry loop is never entered
        fs, path = fsspec.core.url_to_fs(root, **opts)
        return GCSStorage(fs, path, retry=policy, max_requests=requests, writes=writes)
    if protocol in _AZURE_PROTOCOLS:
        from ckpt.storage._azure import open_azure

        return open_azure(root, opts, retry=policy, max_requests=requests, writes=writes)
    from ckpt.storage._s3 import S3Storage

    config = dict(opts.get("config_kwargs") or {})
    own_retries = "retries" not in config  # the caller did not choose botocore's: ckpt owns them
    if own_retries:
        config["retries"] = {"mode": "standard", "total_max_attempts": 1}
    # botocore >= 1.36 would hash every upload body again (CRC32) for its own checksum: ckpt
    # sends the CRC-32C it already has instead (docs/s3.md, "Checksums"); the caller's choice wins
    config.setdefault("request_checksum_calculation", "when_required")
    if checksums:
        # the body is covered by its CRC-32C, so botocore need not SHA-256 it for the signature
        # (it would over plain http, and over https for a checksum it did not compute itself)
        config["s3"] = {"payload_signing_enabled": False, **(config.get("s3") or {})}
    opts["config_kwargs"] = config
    fs, path = fsspec.core.url_to_fs(root, **opts)
    if own_retries:
        # s3fs's retry loop off too (this instance is ckpt's: its config differs from the
        # caller's own); botocore's off by the config above
        fs.retries = 1
    storage = S3Storage(fs, path, retry=policy, max_requests=requests, writes=writes)
    storage.checksums = checksums
    return storage


def _plain_local_path(root: str) -> bool:
    """Whether fsspec would open ``root`` as a local path given as is (no protocol, no chain, no
    ``file:`` prefix; POSIX only): its LocalFileSystem path then is ``root`` with ``~`` expanded,
    made absolute, as :class:`LocalStorage` makes it."""
    return (
        os.sep == "/"
        and "://" not in root
        and "::" not in root
        and not root.startswith(("file:", "local:", "data:"))
    )


def trusts_create_only(fs: Any) -> bool:
    """Whether ckpt trusts the create-only write of the fsspec file system ``fs`` for a commit
    when it reaches it through its own backend: ``memory://`` (under ckpt's lock) and S3 (with
    ``If-None-Match``, after the probe). For the fault kit, which wraps such file systems."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("memory", *_S3_PROTOCOLS, *_GCS_PROTOCOLS)


def _flag(given: object, name: str) -> bool:
    if not isinstance(given, bool):
        raise ValueError(f"storage_options[{name!r}] must be True or False, got {given!r}")
    return given


def _io_timeout(given: object) -> float | None:
    if given is None:
        return None
    if isinstance(given, bool) or not isinstance(given, int | float) or not given > 0:
        raise ValueError(f"ckpt_io_timeout_s must be a positive number of seconds or None, got {given!r}")
    return float(given)


def _retry_policy(given: object, override: RetryPolicy | None) -> RetryPolicy:
    if override is not None:
        return override
    if given is None:
        return RetryPolicy()
    if isinstance(given, RetryPolicy):
        return given
    if isinstance(given, dict):
        return RetryPolicy(**given)
    raise ValueError(
        f"storage_options['ckpt_retry'] must be a ckpt.RetryPolicy or a dict of its fields, got {given!r}"
    )
