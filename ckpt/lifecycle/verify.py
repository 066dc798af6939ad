"""Full verification of a committed checkpoint: every byte the manifest describes is re-read.

:func:`verify` owns the "is this checkpoint intact?" question. For one committed step it
checks that the manifest parses and validates (a bad manifest raises, since there is then no
checkpoint to check), and for every file the manifest names:

- the file exists and has the manifest's size;
- the crc32c of the whole file matches the manifest;
- the safetensors header parses and agrees with the manifest: every shard stored in the file
  appears under its key with the manifest's dtype, ``shape == sizes`` and
  ``data_start + data_offsets == byte_range``, and (for the files of the step's own attempt) the
  header holds no other tensors: a file of an older step that an incremental save references
  also holds tensors that changed since;
- the crc32c of every block of every shard matches.

Files are streamed in bounded chunks through :class:`~ckpt.storage.Storage` (memory stays at
about ``num_threads * chunk_bytes``) and checked concurrently. Every problem is collected in
the :class:`VerifyReport` instead of stopping at the first one;
:meth:`VerifyReport.raise_if_failed` turns a failed report into the typed error.

``quick=True`` reads no data: one metadata request per file (``Storage.stat``: a HeadObject on
S3) compares its size, and the CRC-32C the store keeps for it where it keeps one (S3 for files
ckpt wrote since it sends its CRC-32C with every upload; GCS for every object), with the
manifest. A file the store keeps no CRC-32C for (a local disk, an S3 object written before, or
replaced by a writer that sent none) is checked by its size only and listed in
``VerifyReport.size_only``. Headers and block CRCs are not checked: that takes the full verify.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import crc32c

from ckpt._concurrency import DEFAULT_IO_TIMEOUT_S, run_all
from ckpt.errors import (
    ChecksumMismatchError,
    CkptError,
    CorruptCheckpointError,
    HeaderError,
    MissingShardError,
    ShardSizeMismatchError,
    UnsafePathError,
)
from ckpt.format import layout
from ckpt.format import safetensors as safetensors_format
from ckpt.format.manifest import Manifest, ShardEntry
from ckpt.lifecycle import steps
from ckpt.progress import Meter, ProgressArg
from ckpt.storage import Root, Storage, open_storage, root_url

__all__ = ["Problem", "VerifyReport", "verify", "verify_manifest"]

DEFAULT_CHUNK_BYTES = 8 << 20  # 8 MiB per read: memory stays at num_threads * this
_Stored = tuple[str, str, ShardEntry]  # (key, dtype code, shard) of one shard stored in a file

# Order in which problems of one file are reported (and which error raise_if_failed picks).
_SEVERITY: dict[type[CkptError], int] = {
    MissingShardError: 0,
    ShardSizeMismatchError: 1,
    HeaderError: 2,
    ChecksumMismatchError: 3,
}


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a checkpoint. ``file`` is relative to the root; ``key`` is set when
    the problem is in one tensor's bytes or header entry."""

    error: type[CkptError]  # the class raise_if_failed would raise for it
    file: str
    key: str | None
    message: str  # names the file (as a URL) and the key

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :func:`verify` checked and what it found. ``ok`` when ``problems`` is empty."""

    step: int
    files_checked: int
    bytes_read: int
    blocks_checked: int
    findings: tuple[Problem, ...] = field(default=())
    quick: bool = False  # sizes and stored checksums only, no data read
    size_only: tuple[str, ...] = ()  # quick: files the store keeps no CRC-32C for (size checked)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def problems(self) -> list[str]:
        """Each problem as a message naming the file and, for data and header entries, the key."""
        return [p.message for p in self.findings]

    def raise_if_failed(self) -> None:
        """Raise the typed error of the first (most fundamental) problem, if there is any:
        MissingShardError, ShardSizeMismatchError, HeaderError or ChecksumMismatchError."""
        if not self.findings:
            return
        first = min(self.findings, key=lambda p: (_SEVERITY.get(p.error, 9), p.file))
        more = len(self.findings) - 1
        suffix = (
            f" (and {more} more problem{'s' if more != 1 else ''} in step {self.step})"
            if more
            else ""
        )
        raise first.error(first.message + suffix)


def verify(
    root: Root,
    step: int | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    num_threads: int = 8,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: ProgressArg = None,
    io_timeout_s: float | None = DEFAULT_IO_TIMEOUT_S,
    quick: bool = False,
) -> VerifyReport:
    """Re-read and check every byte of checkpoint ``step`` (default: the latest) under ``root``;
    ``quick``: read none, compare each file's size and the CRC-32C the store keeps for it with
    the manifest (module docstring).

    Raises CheckpointNotFoundError if there is no such checkpoint and a ManifestError if its
    manifest does not validate; problems in the data files are collected in the report (call
    ``raise_if_failed()`` on it to turn them into an error). ``progress``: a callable given a
    ``ckpt.Progress`` as the bytes are checked (from worker threads), or True for a tqdm bar
    (``ckpt.progress``). ``io_timeout_s`` bounds each storage
    call (StorageTimeoutError; a file's check reads it in chunks, each one call); None waits as
    long as it takes.
    """
    root = root_url(root)
    storage = open_storage(root, storage_options, io_timeout_s=io_timeout_s)
    m = steps.resolve_step(storage, step)
    return verify_manifest(
        storage, m, num_threads=num_threads, chunk_bytes=chunk_bytes, progress=progress, quick=quick
    )


def verify_manifest(
    storage: Storage,
    m: Manifest,
    *,
    num_threads: int = 8,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: ProgressArg = None,
    quick: bool = False,
) -> VerifyReport:
    """Check every file of an already parsed manifest (see :func:`verify`), each storage call
    under the storage's deadline."""
    if chunk_bytes <= 0 or num_threads <= 0:
        raise ValueError("chunk_bytes and num_threads must be positive")
    shards: dict[str, list[_Stored]] = {path: [] for path in m.files}
    for key, t in m.tensors.items():
        for s in t.shards:
            shards[s.file].append((key, t.dtype, s))
    results: dict[str, _FileResult] = {}
    meter = Meter("verify", progress, step=m.step, retries=lambda: storage.retries)

    def check(path: str) -> None:
        if quick:
            results[path] = _check_stored(storage, m, path)
        else:
            results[path] = _check_file(storage, m, path, shards[path], chunk_bytes, meter)
        meter.add(files=1)

    paths = sorted(m.files)
    total = 0 if quick else sum(f.size for f in m.files.values())
    meter.phase("check", bytes_total=total, files_total=len(paths))
    # the storage's deadline, on the pool's own threads: every read of a file's check must end
    # in time (each ended call restarts the clock), not the whole file
    try:
        run_all(check, paths, num_threads=num_threads, timeout_s=storage.io_timeout_s,
                         what=lambda p: f"{storage.where(p)}: verify")  # fmt: skip
        meter.phase("done")
    finally:
        meter.close()
    findings: list[Problem] = []
    for path in paths:
        findings.extend(sorted(results[path].problems, key=lambda p: _SEVERITY.get(p.error, 9)))
    return VerifyReport(
        step=m.step,
        files_checked=len(paths),
        bytes_read=sum(r.bytes_read for r in results.values()),
        blocks_checked=sum(r.blocks_checked for r in results.values()),
        findings=tuple(findings),
        quick=quick,
        size_only=tuple(p for p in paths if results[p].size_only),
    )


@dataclass
class _FileResult:
    problems: list[Problem] = field(default_factory=list)
    bytes_read: int = 0
    blocks_checked: int = 0
    size_only: bool = False  # quick: the store kept no CRC-32C to compare


@dataclass
class _Block:
    start: int  # absolute in the file
    end: int
    crc32c: int
    key: str
    index: int  # block number within the shard


class _BlockChecker:
    """Checks the blocks of every shard of one file as the file's bytes stream by in order."""

    def __init__(self, shards: list[_Stored], block_bytes: int) -> None:
        self.blocks: list[_Block] = []
        for key, _, s in shards:
            for i, want in enumerate(s.crc32c):
                lo = s.byte_range.start + i * block_bytes
                self.blocks.append(
                    _Block(lo, min(lo + block_bytes, s.byte_range.end), want, key, i)
                )
        self.blocks.sort(key=lambda b: b.start)
        self.next = 0
        self.crc = 0
        self.checked = 0
        self.bad: dict[str, list[_Block]] = {}  # key -> its failing blocks, in file order

    def feed(self, pos: int, data: memoryview) -> None:
        end = pos + len(data)
        while self.next < len(self.blocks):
            b = self.blocks[self.next]
            if b.start >= end:
                return
            lo, hi = max(b.start, pos), min(b.end, end)
            if lo < hi:
                self.crc = crc32c.crc32c(data[lo - pos : hi - pos], value=self.crc)
            if b.end > end:
                return  # continues in the next chunk
            if self.crc != b.crc32c:
                self.bad.setdefault(b.key, []).append(b)
            self.checked += 1
            self.next += 1
            self.crc = 0

    def unchecked_keys(self) -> list[str]:
        """Keys with blocks the stream never completed (the file ended early)."""
        return sorted({b.key for b in self.blocks[self.next :]})


def _check_stored(storage: Storage, m: Manifest, path: str) -> _FileResult:
    """``quick``: the file's size and the CRC-32C its store keeps, against the manifest; one
    metadata request, no data read."""
    out = _FileResult()
    where = storage.where(path)
    want = m.files[path]
    try:
        st = storage.stat(path)
    except MissingShardError:
        msg = f"{where}: missing; the manifest lists it ({want.size} bytes)"
        out.problems.append(Problem(MissingShardError, path, None, msg))
        return out
    except UnsafePathError as err:
        out.problems.append(Problem(UnsafePathError, path, None, str(err)))
        return out
    if st.size != want.size:
        kind = "truncated" if st.size < want.size else "extended"
        msg = f"{where}: {st.size} bytes, the manifest says {want.size}: {kind}"
        out.problems.append(Problem(ShardSizeMismatchError, path, None, msg))
    elif st.crc32c is None:
        out.size_only = True
    elif st.crc32c != want.crc32c:
        msg = (
            f"{where}: the store's crc32c of the file is {st.crc32c:#010x}, the manifest says "
            f"{want.crc32c:#010x}: its bytes are not the ones saved"
        )
        out.problems.append(Problem(ChecksumMismatchError, path, None, msg))
    return out


def _check_file(
    storage: Storage,
    m: Manifest,
    path: str,
    shards: list[_Stored],
    chunk_bytes: int,
    meter: Meter,
) -> _FileResult:
    out = _FileResult()
    where = storage.where(path)
    expected = m.files[path].size
    keys = sorted({k for k, _, _ in shards})

    def problem(error: type[CkptError], message: str, key: str | None = None) -> None:
        out.problems.append(Problem(error, path, key, message))

    try:
        actual = storage.size(path)
    except MissingShardError:
        msg = f"{where}: missing; the manifest lists it ({expected} bytes, keys {_few(keys)})"
        problem(MissingShardError, msg)
        return out
    except UnsafePathError as err:  # a link (on the way), a FIFO: never followed nor read
        problem(UnsafePathError, str(err))
        return out
    blocks = _BlockChecker(shards, m.block_bytes)
    head = bytearray()  # the file's first bytes: the 8-byte prefix, then the JSON header
    head_len: int | None = None  # 8 + N once the prefix is read; -1 after a prefix problem
    file_crc = 0
    buf = bytearray(min(chunk_bytes, max(expected, 1)))
    limit = min(actual, expected)  # bytes past the recorded size are never read
    pos = 0
    try:
        while pos < limit:
            n = min(len(buf), limit - pos)
            view = memoryview(buf)[:n]
            storage.read_into(path, pos, [view])
            file_crc = crc32c.crc32c(view, value=file_crc)
            if head_len != -1:
                # head holds the file's bytes [0, len(head)); when it is short, len(head) == pos
                want = 8 if head_len is None else head_len
                if len(head) < want:
                    head += view[len(head) - pos : want - pos]
                if head_len is None and len(head) >= 8:
                    try:
                        head_len = 8 + safetensors_format.header_length(
                            bytes(head[:8]), file_size=expected, where=where
                        )
                    except HeaderError as err:
                        problem(HeaderError, str(err))
                        head_len = -1
                    else:
                        head += view[len(head) - pos : head_len - pos]
            blocks.feed(pos, view)
            pos += n
            out.bytes_read += n
            meter.add(n)
    except (CorruptCheckpointError, UnsafePathError) as err:  # changed under us, or a link / non-file
        problem(type(err), str(err))
        return out
    finally:
        out.blocks_checked = blocks.checked

    if actual != expected:
        lost = blocks.unchecked_keys()
        detail = f"; blocks of keys {_few(lost)} lie beyond its end" if lost else ""
        kind = "truncated" if actual < expected else "extended"
        msg = f"{where}: {actual} bytes, the manifest says {expected}: {kind}{detail}"
        problem(ShardSizeMismatchError, msg)
    complete = actual >= expected or (head_len is not None and 0 < head_len <= len(head))
    if head_len != -1 and complete:
        try:
            header = safetensors_format.parse(bytes(head), file_size=expected, where=where)
        except HeaderError as err:
            problem(HeaderError, str(err))
        else:
            # a file of an older step that an incremental save references holds tensors this step
            # does not use (they changed since): only a file of its own attempt must hold no other
            own = path.startswith(layout.data_dir(m.step, m.attempt) + "/")
            _check_header(header, shards, where, problem, others_allowed=not own)
    n_blocks = Counter(blk.key for blk in blocks.blocks) if blocks.bad else Counter[str]()
    for key, bad in blocks.bad.items():
        b = bad[0]
        msg = (
            f"{where}: key {key!r}: {len(bad)} of {n_blocks[key]} crc32c blocks do not match the "
            f"manifest, the first at bytes [{b.start}, {b.end}) (block {b.index})"
        )
        problem(ChecksumMismatchError, msg, key)
    if actual >= expected and file_crc != m.files[path].crc32c:
        span = "of the file" if actual == expected else f"of its first {expected} bytes"
        want = m.files[path].crc32c
        msg = f"{where}: crc32c {span} is {file_crc:#010x}, the manifest says {want:#010x}"
        problem(ChecksumMismatchError, msg)
    return out


def _check_header(
    header: safetensors_format.Header,
    shards: list[_Stored],
    where: str,
    problem: Callable[[type[CorruptCheckpointError], str, str | None], None],
    *,
    others_allowed: bool = False,
) -> None:
    entries = {e.name: e for e in header.entries}
    for key, dtype, s in shards:
        e = entries.pop(key, None)
        at = f"{where}: key {key!r}"
        if e is None:
            problem(HeaderError, f"{at}: not in the safetensors header", key)
            continue
        if e.dtype != dtype:
            problem(HeaderError, f"{at}: header dtype {e.dtype}, the manifest says {dtype}", key)
        if e.shape != s.sizes:
            problem(
                HeaderError,
                f"{at}: header shape {list(e.shape)}, the manifest's shard sizes {list(s.sizes)}",
                key,
            )
        got = (header.data_start + e.begin, header.data_start + e.end)
        if got != (s.byte_range.start, s.byte_range.end):
            msg = (
                f"{at}: header places the data at bytes [{got[0]}, {got[1]}), the manifest at "
                f"[{s.byte_range.start}, {s.byte_range.end})"
            )
            problem(HeaderError, msg, key)
    for name in [] if others_allowed else sorted(entries):
        problem(
            HeaderError,
            f"{where}: the header holds tensor {name!r}, which the manifest does not place here",
            name,
        )


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}]"
