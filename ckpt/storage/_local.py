"""Local and network file systems, through the OS file API (no fsspec on the data path).

Writes are ``O_CREAT|O_EXCL`` (never overwrite) and fsynced when asked; the commit is a temp file,
fsync, ``os.link`` to the final name (EEXIST: lost the race), fsync of the directories
(docs/FORMAT.md 9.1); reads are ``preadv`` straight into the caller's buffers. Every path obeys
the one containment rule (:meth:`LocalStorage.check_no_links`, docs/guarantees.md "Links").
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable, Sequence

from ckpt.errors import ShardSizeMismatchError, StorageError, UnsafePathError
from ckpt.format import layout
from ckpt.storage._base import Chunks, ChunkSource, Listed, Storage, chunk_data


class LocalStorage(Storage):
    """A root on a local (or network) file system."""

    atomic_create = True
    local_disk = True
    streams_chunks = True

    def __init__(self, path: str) -> None:
        root = os.path.abspath(path)
        super().__init__(root, root)
        self._plain_dirs: set[str] = set()  # directories below the root checked to be no links

    def check_no_links(self, rel: str, *, cached: bool = False) -> None:
        """The one containment rule of local roots (docs/guarantees.md, "Links"): ckpt never
        follows a symbolic link below the root. The root itself may be a link or lie under links;
        every directory between the root and ``rel`` must be a real directory (or not exist yet:
        ckpt creates it as one). Reads, writes, listings and deletes all check it, so nothing is
        written where it would be refused to be read, and nothing is deleted through a link.
        ``cached``: a directory found plain once is trusted for this Storage's life (reads)."""
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

    # --- writes ----------------------------------------------------------------------------

    def write_file(self, rel: str, chunks: ChunkSource, *, size: int, fsync: bool, stable: bool = False) -> None:
        with self._creating(rel):
            self.check_no_links(rel)
            self._write(self.path(rel), chunks() if callable(chunks) else chunks, fsync=fsync, gather=stable)

    def _write(self, full: str, chunks: Chunks, *, fsync: bool, gather: bool = False) -> None:
        os.makedirs(os.path.dirname(full), exist_ok=True)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, chunks, GATHER_BYTES if gather else 0)
            if fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(full)
            raise
        os.close(fd)

    def _temp_beside(self, full: str, data: bytes, *, fsync: bool) -> str:
        """A temp file next to ``full`` holding ``data`` (the name gc knows: docs/FORMAT.md 2.3)."""
        d = os.path.dirname(full)
        os.makedirs(d, exist_ok=True)
        tmp = f"{d}/{layout.temp_name(os.path.basename(full), uuid.uuid4().hex)}"
        self._write(tmp, [data], fsync=fsync)
        return tmp

    def put_if_absent(self, rel: str, data: bytes, *, fsync: bool) -> bool:
        full = self.path(rel)
        with self._errors("create-only write", rel):
            self.check_no_links(rel)
            tmp = self._temp_beside(full, data, fsync=fsync)
            try:
                os.link(tmp, full)
            except FileExistsError:
                return False
            finally:
                _unlink_quietly(tmp)
            if fsync:  # the new name, and the directories a first commit created, survive a crash
                d = os.path.dirname(full)
                _fsync_dir(d)
                _fsync_dir(os.path.dirname(d))
                _fsync_dir(self.root)
            return True

    def put(self, rel: str, data: bytes, *, fsync: bool) -> None:
        full = self.path(rel)
        with self._errors("write", rel):
            self.check_no_links(rel)
            os.replace(self._temp_beside(full, data, fsync=fsync), full)
            if fsync:
                _fsync_dir(os.path.dirname(full))

    def sync_dirs(self, rels: Iterable[str]) -> None:
        for rel in rels:
            _fsync_dir(self.path(rel) if rel else self.root)

    def sync_files(self, rels: Iterable[str]) -> None:
        for rel in rels:
            with self._errors("fsync", rel):
                self.check_no_links(rel, cached=True)
                fd = os.open(self.path(rel), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    # --- reads -----------------------------------------------------------------------------

    def _open(self, rel: str) -> int:
        """Open a file under the root for reading: no symbolic link as the file or on the way to
        it, nothing but a regular file (a FIFO must not block us)."""
        self.check_no_links(rel, cached=True)
        fd = os.open(self.path(rel), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise UnsafePathError(
                f"{self.where(rel)}: {_kind(mode)}, not a regular file; ckpt reads only regular files"
            )
        return fd

    def read(self, rel: str) -> bytes:
        with self._errors("read", rel):
            fd = self._open(rel)
            try:
                size = os.fstat(fd).st_size
                chunks, got = [], 0
                while (
                    got < size
                ):  # bounded by the size seen at open: a growing file is not followed
                    chunk = os.read(fd, size - got)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    got += len(chunk)
                return b"".join(chunks)
            finally:
                os.close(fd)

    def read_into(self, rel: str, start: int, buffers: list[memoryview]) -> None:
        self.read_pieces(rel, start, [buffers], _nothing)

    def read_pieces(
        self, rel: str, start: int, pieces: Sequence[list[memoryview]], landed: Callable[[int], None]
    ) -> None:
        """One open, then ``preadv`` straight into each piece's buffers in turn."""
        total = sum(len(b) for piece in pieces for b in piece)
        pos = start
        with self._errors(f"read of [{start}, {start + total})", rel):
            fd = self._open(rel)
        try:
            for i, piece in enumerate(pieces):
                with self._errors(f"read of [{start}, {start + total})", rel):
                    pos = self._preadv(rel, fd, pos, piece, start + total)
                landed(i)
        finally:
            os.close(fd)

    def _preadv(self, rel: str, fd: int, pos: int, buffers: list[memoryview], end: int) -> int:
        """Fill ``buffers`` from ``pos`` on; the position after them."""
        views = [b for b in buffers if len(b)]
        while views:
            n = os.preadv(fd, views[:1024], pos)  # IOV_MAX
            if n == 0:
                raise ShardSizeMismatchError(
                    f"{self.where(rel)}: file ends at {pos}, expected at least {end} bytes"
                )
            pos += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]
        return pos

    def size(self, rel: str) -> int:
        with self._errors("stat", rel):
            self.check_no_links(rel, cached=True)
            st = os.lstat(self.path(rel))
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePathError(
                    f"{self.where(rel)}: is a symbolic link; ckpt never follows links in a checkpoint"
                )
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError(f"{self.where(rel)}: {_kind(st.st_mode)}, not a regular file")
            return st.st_size

    def exists(self, rel: str) -> bool:
        with self._errors("exists", rel):
            self.check_no_links(rel, cached=True)
            return os.path.lexists(self.path(rel))

    # --- listing and deleting --------------------------------------------------------------

    def list_files(self, prefix: str = "") -> list[Listed]:
        out: list[Listed] = []
        with self._errors("listing", prefix):
            if prefix:
                self.check_no_links(f"{prefix.rstrip('/')}/x")
            top = self.path(prefix.rstrip("/")) if prefix else self.root
            # os.walk never descends into a linked directory; links are listed as themselves
            for dirpath, dirs, files in os.walk(top):
                for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
                    full = os.path.join(dirpath, name)
                    try:
                        st = os.stat(full, follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted since the directory was read (a retirement, a gc)
                    rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                    out.append(Listed(rel, st.st_size, st.st_mtime))
        return sorted(out, key=lambda f: f.path)

    def delete(self, rel: str) -> None:
        """Delete ``rel`` itself: a link is removed, never what it points to; nothing through a
        linked directory (check_no_links). A directory only if empty."""
        with self._errors("delete", rel):
            self.check_no_links(rel)
            full = self.path(rel)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                return
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(full)
            else:
                os.unlink(full)

    def delete_tree(self, rel: str) -> None:
        """Delete the directory ``rel`` and everything in it (links inside removed as links,
        never followed). Only for a root ckpt owns whole (the Lightning plugin's checkpoint)."""
        with self._errors("delete", rel):
            self.check_no_links(f"{rel}/x" if rel else "x")
            full = self.path(rel) if rel else self.root
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)

    def remove_empty_dir(self, rel: str) -> None:
        if rel:
            self.check_no_links(f"{rel}/x")
            with contextlib.suppress(OSError):
                os.rmdir(self.path(rel))


def _kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    for test, name in (
        (stat.S_ISLNK, "is a symbolic link"),
        (stat.S_ISDIR, "is a directory"),
        (stat.S_ISFIFO, "is a FIFO"),
        (stat.S_ISSOCK, "is a socket"),
        (stat.S_ISCHR, "is a character device"),
        (stat.S_ISBLK, "is a block device"),
    ):
        if test(mode):
            return name
    return f"has file mode {stat.S_IFMT(mode):o}"


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


#: stable chunks (``write_file(stable=True)``) are gathered into one ``writev`` of up to this
#: many bytes (or IOV_MAX buffers): a state of many small tensors is written in a few calls, not
#: one per tensor (20,000 tensors of 1-30 KiB: 0.6 s instead of 0.9 s on one thread)
GATHER_BYTES = 4 << 20
_IOV_MAX = 1024


def _write_all(fd: int, chunks: Chunks, gather: int) -> None:
    """Write ``chunks`` to ``fd`` in order; with ``gather`` > 0, up to that many bytes of them
    in one call (each chunk written before the next is taken otherwise)."""
    batch: list[memoryview] = []
    held = 0
    for chunk in chunks:
        view = memoryview(chunk_data(chunk)).cast("B")
        if not view:
            continue
        batch.append(view)
        held += len(view)
        if held >= gather or len(batch) >= _IOV_MAX:
            _writev(fd, batch)
            batch, held = [], 0
    _writev(fd, batch)


def _writev(fd: int, views: list[memoryview]) -> None:
    """All of ``views`` written, through short writes."""
    at = 0
    while at < len(views):
        n = os.writev(fd, views[at:] if at else views)
        while at < len(views) and n >= len(views[at]):
            n -= len(views[at])
            at += 1
        if n:
            views[at] = views[at][n:]


def _nothing(_: int) -> None:
    return
