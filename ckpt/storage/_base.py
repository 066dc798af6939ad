"""The storage contract: one checkpoint root on one backend, and the records it lists.

Every backend (``_local``, ``_fsspec``, ``_s3``) implements the same dozen operations with the
same semantics, checked by the conformance suite in :mod:`ckpt.testing.storage_tests`:

- ``write_file``: create a file from chunks, never overwriting, never publishing a partial one;
- ``put_if_absent``: the create-only commit (True if created; False if a file is there, which is
  never changed; see the method for a file holding exactly our bytes);
- ``put``: replace a small file atomically (the LATEST hint only);
- ``read`` / ``read_into`` / ``size`` / ``stat`` / ``exists``: whole small files, ranged reads
  into caller memory (``read_pieces``: one ranged read in pieces, each handed back as it lands),
  sizes, a size with the checksum the service stores (``Stat``), presence; a missing file is
  ``MissingShardError``;
- ``list_files`` / ``delete`` / ``remove_empty_dir``: listing under a prefix, deleting one file,
  tidying empty directories (local disks);
- ``multipart_uploads`` / ``abort_upload``: uploads in progress (object stores);
- capabilities: ``atomic_create`` (a create-only write ckpt trusts), ``local_disk`` (read
  planning for a disk rather than a network store), and ``conditional_writes_work()`` (the
  per-endpoint probe where the backend needs one).

Errors are translated once, here, into the ckpt hierarchy, naming the path (never credentials).

Deadlines belong here too: every call of the contract that does I/O runs under the storage's
``io_timeout_s`` (set by :func:`~ckpt.storage.open_storage`; None: no deadline), so every entry
point has one. A call that does not end in time is StorageTimeoutError naming the file and the
operation; its thread is abandoned (Python cannot stop it) and may still complete later. A
streamed write (``write_file``) must take each next chunk within the deadline rather than end
within it, so a long upload that keeps moving is never cut. Backends need do nothing: the
contract's methods of every subclass are wrapped when the class is made (``__init_subclass__``),
and a call made inside another (a backend calling its own methods) runs under the outer one's
deadline (:func:`ckpt._concurrency.bounded`).
"""

from __future__ import annotations

import abc
import collections
import contextlib
import errno
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ckpt._concurrency import DEFAULT_IO_TIMEOUT_S, bounded, progress_of_this_thread
from ckpt.errors import CkptError, MissingShardError, StorageError, UnsafePathError


@dataclass(frozen=True, slots=True)
class Checked:
    """A chunk of a file with the CRC-32C of its bytes, which its producer already computed (the
    executor hashes each block as it goes by). A backend whose service checks what it stores
    (S3, and GCS could) combines these into the checksum of each request body rather than
    hashing the bytes again (``ckpt.format.crc.combine``); every other backend takes ``data``."""

    data: memoryview | bytes
    crc32c: int


Chunk = memoryview | bytes | Checked
Chunks = Iterable[Chunk]
ChunkSource = Chunks | Callable[[], Chunks]  # a function gives the data afresh on each call


def chunk_data(chunk: Chunk) -> memoryview | bytes:
    """The bytes of a chunk (a :class:`Checked` one's ``data``)."""
    return chunk.data if isinstance(chunk, Checked) else chunk

#: the contract's calls that do I/O (each runs under ``Storage.io_timeout_s``) and how a
#: StorageTimeoutError names the operation
DEADLINED = {
    "conditional_writes_work": "conditional-write probe",
    "check_no_links": "link check",
    "write_file": "write",
    "put_if_absent": "create-only write",
    "put": "write",
    "sync_dirs": "fsync",
    "sync_files": "fsync",
    "read": "read",
    "read_into": "read",
    "read_small": "read",
    "read_into_sized": "read",
    "read_pieces": "read",
    "size": "stat",
    "stat": "stat",
    "exists": "exists",
    "list_files": "listing",
    "delete": "delete",
    "delete_tree": "delete",
    "remove_empty_dir": "remove directory",
    "multipart_uploads": "listing uploads",
    "abort_upload": "abort upload",
}


@dataclass(frozen=True, slots=True)
class Listed:
    """A file under the root: relative path, size, modification time (seconds since the epoch)."""

    path: str
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class Stat:
    """What the store says of a file without reading it: its size, and the CRC-32C of its bytes
    where the service keeps one (S3 for objects ckpt wrote with its checksums, GCS for every
    object), else None: then only the size can be compared."""

    size: int
    crc32c: int | None = None


@dataclass(frozen=True, slots=True)
class Upload:
    """A multipart upload in progress under the root (object stores)."""

    key: str  # relative to the root
    upload_id: str
    initiated: float  # seconds since the epoch


class Storage(abc.ABC):
    """One checkpoint root on one backend. Build one with :func:`ckpt.storage.open_storage`."""

    #: a create-only write ckpt trusts for the commit (see ``conditional_writes_work`` too)
    atomic_create: bool = False
    #: reads are planned for a local disk (small gaps, large chunks) rather than a network store
    local_disk: bool = False
    #: ``write_file`` consumes each chunk before asking for the next (a caller may reuse one buffer)
    streams_chunks: bool = False
    #: a ``write_file`` that returned stored exactly ``size`` bytes: the service acknowledged
    #: the whole body (object stores); a caller that wrote a file need not stat it again
    write_confirms_size: bool = False
    #: ``read_into_sized`` checks the file's size from the read's own reply (no stat request)
    sizes_on_reads: bool = False
    #: the service's create-only precondition, for messages ("If-None-Match on PutObject")
    precondition: str = "the create-only precondition"
    #: seconds each call of the contract may take (a streamed write: between two chunks); None:
    #: no deadline. Set per instance by ``open_storage`` (module docstring).
    io_timeout_s: float | None = DEFAULT_IO_TIMEOUT_S

    def __init__(self, root: str, url: str) -> None:
        self.root = root  # the backend's path of the root (no trailing slash)
        self.url = url  # the root for messages: no credentials
        # the retries this Storage made, by "operation: reason" (object stores retry; the
        # operations that use one Storage report them)
        self.retries: collections.Counter[str] = collections.Counter()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Put every contract call the subclass defines under the deadline (module docstring)."""
        super().__init_subclass__(**kwargs)
        for name, op in DEADLINED.items():
            fn = cls.__dict__.get(name)
            if callable(fn) and not hasattr(fn, "__ckpt_deadline__"):
                setattr(cls, name, _with_deadline(fn, op))

    # --- paths and errors ------------------------------------------------------------------

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
            raise StorageError(
                f"{self.where(rel)}: {op} failed: {type(err).__name__}: {err}"
            ) from err

    @contextlib.contextmanager
    def _creating(self, rel: str) -> Iterator[None]:
        """``_errors`` for a data file's create-only write: one refused because a file is there
        (``FileExistsError`` behind it) says so."""
        try:
            with self._errors("write", rel):
                yield
        except StorageError as err:
            if isinstance(err.__cause__, FileExistsError):
                raise StorageError(
                    f"{self.where(rel)}: already exists; data files are never overwritten"
                ) from err
            raise

    # --- capabilities ----------------------------------------------------------------------

    def conditional_writes_work(self) -> bool:
        """Whether the backend's create-only write holds against another writer (probed per
        endpoint where the backend needs it: S3). True where there is nothing to probe."""
        return True

    def endpoint(self) -> str:
        """The service this root lives on, for messages."""
        return self.url

    def check_no_links(self, rel: str, *, cached: bool = False) -> None:
        """Refuse a symbolic link between the root and ``rel`` (backends that have links:
        docs/guarantees.md, "Links"). No-op where there are none."""
        return

    # --- writes ----------------------------------------------------------------------------

    @abc.abstractmethod
    def write_file(self, rel: str, chunks: ChunkSource, *, size: int, fsync: bool, stable: bool = False) -> None:
        """Create ``rel`` from ``chunks`` (``size`` bytes in all; a :class:`Checked` chunk brings
        its CRC-32C, which a backend may hand to its service to check). Never overwrites: an existing
        file is a StorageError saying so and is left as it is. (A backend that checks for lost
        replies, S3, cannot tell a file already holding exactly these bytes from its own retried
        write, and reports success for it.) Never publishes a partial file on failure; a
        ``chunks`` that raises midway fails the write (a StorageError, or the source's error).
        ``stable``: the chunks' memory is not reused while the call runs, so a backend may hold
        several before writing them (a local disk gathers small ones into one ``writev``);
        without it, a backend that ``streams_chunks`` is done with each chunk before the next."""

    @abc.abstractmethod
    def put_if_absent(self, rel: str, data: bytes, *, fsync: bool) -> bool:
        """Create ``rel`` holding ``data`` only if it does not exist: True if this call created
        it, False if a file was there (it is never changed). What is there holding byte for byte
        ``data`` is backend-defined: False on local disks and ``memory://`` (nothing was
        created); True on S3, whose retried create-only PUT meeting 412 cannot tell its own
        landed first try (a lost reply) from an identical file, so it counts the bytes as ours.
        Callers needing "did this call create it" must not rely on False for identical bytes."""

    @abc.abstractmethod
    def put(self, rel: str, data: bytes, *, fsync: bool) -> None:
        """Replace ``rel`` atomically (used only for the LATEST hint)."""

    def sync_dirs(self, rels: Iterable[str]) -> None:
        """Make new entries in these directories survive a crash (local disks; else nothing)."""
        return

    def sync_files(self, rels: Iterable[str]) -> None:
        """Make the bytes of these files, written with ``fsync=False``, survive a crash (local
        disks: an fsync of each; object stores: nothing, a completed write is durable). A save
        writes its files first and makes them durable after, in parallel, while it builds its
        manifest (``ckpt.engine.executor.sync_files``)."""
        return

    # --- reads -----------------------------------------------------------------------------

    @abc.abstractmethod
    def read(self, rel: str) -> bytes:
        """A small whole file (a manifest, a hint); callers check ``size`` first."""

    @abc.abstractmethod
    def read_into(self, rel: str, start: int, buffers: list[memoryview]) -> None:
        """Fill ``buffers`` with the bytes of ``rel`` from ``start`` on, in order (zero-length
        buffers allowed); a file that ends early, or before ``start``, is ShardSizeMismatchError."""

    def read_small(self, rel: str, max_bytes: int) -> tuple[int, bytes | None]:
        """The size of the small file ``rel`` and its bytes; None for the bytes (never read)
        when the size is over ``max_bytes``. Here a stat, then a read; a backend whose read
        reply states the size before its body (S3) makes it one request."""
        size = self.size(rel)
        if size > max_bytes:
            return size, None
        return size, self.read(rel)

    def read_into_sized(self, rel: str, start: int, buffers: list[memoryview], *, file_size: int) -> None:
        """:meth:`read_into`, where the file is expected to be ``file_size`` bytes: a backend
        with ``sizes_on_reads`` checks that from the read's reply (ShardSizeMismatchError);
        here it is a plain ``read_into`` (the caller stats the file first)."""
        self.read_into(rel, start, buffers)

    def read_pieces(
        self, rel: str, start: int, pieces: Sequence[list[memoryview]], landed: Callable[[int], None]
    ) -> None:
        """``read_into`` of the buffers of ``pieces`` laid end to end, one piece after the other:
        ``landed(i)`` is called on this thread once piece ``i`` holds its bytes, before piece
        ``i + 1`` is read (the restorer checks each piece's checksums there, while the bytes are
        still in the CPU's cache and its other reads are in flight); an error it raises ends the
        read. This default makes one ``read_into`` per piece; a backend that can fill several
        pieces from one open file or one request overrides it."""
        pos = start
        for i, piece in enumerate(pieces):
            self.read_into(rel, pos, piece)
            pos += sum(len(b) for b in piece)
            landed(i)

    @abc.abstractmethod
    def size(self, rel: str) -> int:
        """The size of the regular file ``rel``."""

    def stat(self, rel: str) -> Stat:
        """The size of ``rel`` and the CRC-32C the service stores for it, if it stores one (one
        metadata request, no data read); a missing file is MissingShardError."""
        return Stat(self.size(rel))

    @abc.abstractmethod
    def exists(self, rel: str) -> bool:
        """Whether a file is at ``rel``."""

    # --- listing and deleting --------------------------------------------------------------

    @abc.abstractmethod
    def list_files(self, prefix: str = "") -> list[Listed]:
        """Every file under ``prefix`` (relative, "" for the whole root), sorted by path; links
        are listed as themselves, never followed."""

    @abc.abstractmethod
    def delete(self, rel: str) -> None:
        """Delete the file ``rel`` (absent: nothing to do). Never by prefix, never through a link."""

    @abc.abstractmethod
    def delete_tree(self, rel: str) -> None:
        """Delete everything under ``rel`` ("" for the root): only for a root ckpt owns whole (the
        Lightning plugin's checkpoint directory); never through a link."""

    def remove_empty_dir(self, rel: str) -> None:
        """Remove the directory ``rel`` if it is empty (local disks; object stores have none)."""
        return

    def multipart_uploads(self) -> list[Upload]:
        """Multipart uploads started under the root and neither completed nor aborted."""
        return []

    def abort_upload(self, upload: Upload) -> None:
        raise StorageError(f"{self.where(upload.key)}: this backend has no multipart uploads")


# --- the deadline of every call ----------------------------------------------------------------


def _with_deadline(fn: Callable[..., Any], op: str) -> Callable[..., Any]:
    """The contract method ``fn`` of a backend, run under the storage's ``io_timeout_s``."""
    streamed = fn.__name__ == "write_file"

    @functools.wraps(fn)
    def call(self: Storage, *args: Any, **kwargs: Any) -> Any:
        def run() -> Any:  # on the thread of the deadline
            if not streamed:
                return fn(self, *args, **kwargs)
            # write_file(rel, chunks, ...): each chunk taken restarts the clock
            tick = progress_of_this_thread()
            if len(args) > 1:
                return fn(self, args[0], _ticking(args[1], tick), *args[2:], **kwargs)
            return fn(self, *args, **{**kwargs, "chunks": _ticking(kwargs["chunks"], tick)})

        what = f"{_subject(self, args)}: {op}"
        return bounded(run, timeout_s=self.io_timeout_s, what=what)

    call.__ckpt_deadline__ = True  # type: ignore[attr-defined]
    return call


def _ticking(source: ChunkSource, tick: Callable[[], None]) -> ChunkSource:
    """``source`` (an iterable, or a function giving one), calling ``tick`` at each chunk taken
    (whichever thread takes it)."""
    if callable(source):
        fresh = source
        return lambda: _tick(fresh(), tick)
    return _tick(source, tick)


def _tick(chunks: Chunks, tick: Callable[[], None]) -> Iterator[Chunk]:
    for chunk in chunks:
        tick()
        yield chunk


def _subject(storage: Storage, args: tuple[Any, ...]) -> str:
    """The file a call is about, for its timeout message: its path (an upload's key, the first
    of several directories); the root's URL for a call about the whole root."""
    first = args[0] if args else ""
    if isinstance(first, Upload):
        first = first.key
    elif isinstance(first, list | tuple):
        first = first[0] if first else ""
    return storage.where(first) if isinstance(first, str) and first else storage.url
