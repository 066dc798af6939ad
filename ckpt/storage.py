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
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import threading
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ckpt.errors import (
    CkptError,
    MissingShardError,
    ShardSizeMismatchError,
    StorageError,
    UnsafePathError,
)

_MEMORY_LOCK = threading.Lock()  # memory:// is one process-wide dict; make create-only atomic
_S3_MIN_PART = 5 << 20  # S3's minimum multipart part size
_STEP_DIR = re.compile(r"\d{12}")


class Storage:
    """One checkpoint root on one fsspec file system."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
        self.protocol: str = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root: str = os.path.abspath(path) if self.is_local else path.rstrip("/")
        self.url = self.root if self.is_local else f"{self.protocol}://{self.root.lstrip('/')}"
        self._real_dirs: dict[str, str] = {}  # local: directory -> its realpath (containment check)
        self.atomic_create = self.is_local or self.protocol in ("s3", "s3a", "memory") or bool(
            getattr(self.fs, "ckpt_atomic_create", False)
        )

    # --- paths -----------------------------------------------------------------------------

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def where(self, rel: str) -> str:
        """A path for messages: the URL plus the relative path, no credentials."""
        return f"{self.url}/{rel}"

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
            raise StorageError(f"{self.where(rel)}: {op} failed: {type(err).__name__}: {err}") from err

    # --- writes ----------------------------------------------------------------------------

    def write_file(self, rel: str, chunks: Iterable[memoryview | bytes], *, size: int, fsync: bool) -> None:
        """Create ``rel`` from ``chunks`` (``size`` bytes in all). Never overwrites; never
        publishes a partial object on failure (local partial files are removed, S3 multipart
        uploads aborted)."""
        full = self.path(rel)
        try:
            with self._errors("write", rel):
                if self.is_local:
                    self._write_local(full, chunks, fsync=fsync)
                elif self.protocol in ("s3", "s3a") and size >= 2 * _S3_MIN_PART:
                    self._write_s3_multipart(full, chunks)
                else:
                    self.fs.pipe_file(full, b"".join(chunks), mode="create")
        except StorageError as err:
            if isinstance(err.__cause__, FileExistsError):
                raise StorageError(f"{self.where(rel)}: already exists; data files are never overwritten") from err
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

    def _write_s3_multipart(self, full: str, chunks: Iterable[memoryview | bytes]) -> None:
        bucket, key, _ = self.fs.split_path(full)
        mpu = self.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
        upload_id = mpu["UploadId"]
        parts: list[dict[str, Any]] = []
        try:
            pending = bytearray()
            for chunk in chunks:
                pending += chunk
                while len(pending) >= 2 * _S3_MIN_PART:
                    self._upload_part(bucket, key, upload_id, parts, bytes(pending[: _part_size(len(pending))]))
                    del pending[: parts[-1]["_len"]]
            if pending or not parts:
                self._upload_part(bucket, key, upload_id, parts, bytes(pending))
            self.fs.call_s3(
                "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in parts]},
            )  # fmt: skip
        except BaseException:
            try:
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            finally:
                raise
        self.fs.invalidate_cache(full)

    def _upload_part(self, bucket: str, key: str, upload_id: str, parts: list[dict[str, Any]], body: bytes) -> None:
        n = len(parts) + 1
        out = self.fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=body)
        parts.append({"PartNumber": n, "ETag": out["ETag"], "_len": len(body)})

    def put_if_absent(self, rel: str, data: bytes, *, fsync: bool) -> bool:
        """Create ``rel`` holding ``data`` only if it does not exist. True if we created it."""
        full = self.path(rel)
        try:
            with self._errors("create-only write", rel):
                if self.is_local:
                    return self._link_commit(full, data, fsync=fsync)
                if self.protocol == "memory":
                    with _MEMORY_LOCK:
                        self.fs.pipe_file(full, data, mode="create")
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
                d = os.path.dirname(full)
                os.makedirs(d, exist_ok=True)
                tmp = f"{d}/.{os.path.basename(full)}.{uuid.uuid4().hex}.tmp"
                self._write_local(tmp, [data], fsync=fsync)
                os.replace(tmp, full)
                if fsync:
                    _fsync_dir(d)
            else:
                self.fs.pipe_file(full, data)

    def sync_dirs(self, rels: Iterable[str]) -> None:
        """fsync directories (local disks) so new entries in them survive a crash."""
        if self.is_local:
            for rel in rels:
                _fsync_dir(self.path(rel) if rel else self.root)

    # --- reads -----------------------------------------------------------------------------

    def _open_local(self, rel: str) -> int:
        """Open a file under the root for reading: no symbolic link as the file, no directory
        resolving outside the root, nothing but a regular file (a FIFO must not block us)."""
        full = self.path(rel)
        parent = os.path.dirname(full)
        real = self._real_dirs.get(parent)
        if real is None:
            real = self._real_dirs[parent] = os.path.realpath(parent)
        base = os.path.realpath(self.root)
        if real != base and not real.startswith(base + os.sep):
            raise UnsafePathError(f"{self.where(rel)}: its directory resolves to {real}, outside the root {base}")
        fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePathError(f"{self.where(rel)}: is not a regular file")
        return fd

    def read(self, rel: str) -> bytes:
        """Read a small whole file (a manifest, a hint); callers check ``size`` first."""
        with self._errors("read", rel):
            if not self.is_local:
                data: bytes = self.fs.cat_file(self.path(rel))
                return data
            fd = self._open_local(rel)
            try:
                size = os.fstat(fd).st_size
                chunks, got = [], 0
                while got < size:  # bounded by the size seen at open: a growing file is not followed
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
            data = self.fs.cat_file(self.path(rel), start=start, end=start + total)
        if len(data) != total:
            raise ShardSizeMismatchError(
                f"{self.where(rel)}: short read at [{start}, {start + total}): got {len(data)} bytes"
            )
        pos = 0
        for b in buffers:
            b[:] = data[pos : pos + len(b)]
            pos += len(b)

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
                return os.stat(self.path(rel), follow_symlinks=False).st_size
            return int(self.fs.size(self.path(rel)))

    def exists(self, rel: str) -> bool:
        with self._errors("exists", rel):
            if self.is_local:
                return os.path.lexists(self.path(rel))
            return bool(self.fs.exists(self.path(rel)))

    def step_dirs(self) -> list[int]:
        """Steps that have a ``steps/<step>/manifest.json`` object (not validated)."""
        base = self.path("steps")
        with self._errors("listing", "steps"):
            if self.is_local:
                names = os.listdir(base) if os.path.isdir(base) else []
                return sorted(
                    int(n) for n in names if _STEP_DIR.fullmatch(n) and os.path.isfile(f"{base}/{n}/manifest.json")
                )
            self.fs.invalidate_cache(base)
            found = self.fs.find(base) if self.fs.exists(base) else []
        steps = set()
        prefix = base.rstrip("/") + "/"
        for p in found:
            rest = p[len(prefix) :] if p.startswith(prefix) else p.split("/steps/", 1)[-1]
            parts = rest.split("/")
            if len(parts) == 2 and parts[1] == "manifest.json" and _STEP_DIR.fullmatch(parts[0]):
                steps.add(int(parts[0]))
        return sorted(steps)

    def delete(self, rel: str, *, recursive: bool = False) -> None:
        try:
            with self._errors("delete", rel):
                if self.exists(rel):
                    self.fs.rm(self.path(rel), recursive=recursive)
        except MissingShardError:
            pass


def _part_size(available: int) -> int:
    return max(_S3_MIN_PART, min(available, 64 << 20) // _S3_MIN_PART * _S3_MIN_PART)


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


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
