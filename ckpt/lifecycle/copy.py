"""Copying committed checkpoints between roots: ``ckpt.copy`` and ``ckpt cp``.

A copy is a sequence of create-only writes finished by the same create-only manifest commit a
save uses (docs/FORMAT.md section 9; docs/CLI.md, "ckpt cp"):

1. *Plan* (pure, :func:`plan_copy`): from the source manifests, the destination's listing (path
   -> size) and the destination's manifests of the same steps, decide which files to copy, which
   are already there, and which steps are already committed there identically (a no-op) or
   differently (:class:`~ckpt.errors.CheckpointExistsError`, before anything is written).
2. *Copy* every planned data file, in parallel, under a byte budget. Each file is streamed from
   the source in chunks; every checksum block of every shard in it and the whole-file crc32c
   are checked against the manifest as the bytes go by. A mismatch raises
   :class:`~ckpt.errors.ChecksumMismatchError` naming the source file and aborts that file's
   create-only write, so a data file is only ever published at the destination once all its
   bytes passed the checks (a local partial file is removed, an S3 multipart upload aborted).
3. *Commit* each step as soon as all of its files are in: the source manifest's exact bytes are
   written create-only (:func:`ckpt.lifecycle.commit.publish`), then ``LATEST`` is moved forward
   if the step is newer, as a save does.

Paths are kept: every file a manifest references (including an older step's files, for
incremental checkpoints) is copied to the same relative path, so the manifest is valid at the
destination unchanged and the copy is self-contained.

Resuming: a copy killed half way leaves data files but no manifest for the steps it had not
finished (a step does not exist without its manifest). Running it again lists the destination:
a file that exists with the manifest's size is re-read and its crc32c checked (``CopyOptions.
check_existing``; off, the size alone decides) and then skipped; one with the wrong size or
crc32c (a local file cut short by the kill) is deleted and copied again, unless a committed
manifest at the destination references it (then it is that checkpoint's data, and the copy
stops with the typed error naming it).
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import crc32c

from ckpt import _concurrency
from ckpt.errors import (
    CheckpointNotFoundError,
    ChecksumMismatchError,
    ManifestError,
    PlanError,
    ShardSizeMismatchError,
)
from ckpt.format import layout
from ckpt.format.manifest import Manifest
from ckpt.lifecycle import commit as commit_protocol
from ckpt.lifecycle._copy_plan import CopyPlan, FileTask, plan_copy
from ckpt.lifecycle.steps import committed_steps, ensure_committable, read_step
from ckpt.lifecycle.verify import _BlockChecker, _Stored
from ckpt.progress import Meter, ProgressArg, summary
from ckpt.storage import Root, Storage, open_storage, root_url

__all__ = ["CopyOptions", "CopyPlan", "CopyReport", "FileTask", "copy", "plan_copy"]

MiB = 1 << 20


_log = logging.getLogger("ckpt.copy")

@dataclass(frozen=True, slots=True)
class CopyOptions:
    """How :func:`copy` runs. Memory stays at about ``max_inflight_bytes`` of read buffers (plus,
    for an S3 destination, as much again of upload bodies)."""

    num_threads: int = 8  # files copied concurrently
    chunk_bytes: int = 16 * MiB  # one read from the source / one write to the destination
    max_inflight_bytes: int = 256 * MiB  # read buffers held at once over all files
    check_existing: bool = True  # re-read a destination file of the right size (crc32c) before skipping it
    max_bytes_per_s: int | None = None  # throttle the copy to this rate (None: as fast as it goes)
    fsync: bool = True  # local destinations: fsync data files and directories before the commit
    update_latest: bool = True  # move the destination's LATEST hint forward, as a save does
    allow_non_atomic_commit: bool = False  # permit destination backends without a create-only write

    def __post_init__(self) -> None:
        for name in ("num_threads", "chunk_bytes", "max_inflight_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CopyOptions.{name} must be positive")
        if self.max_bytes_per_s is not None and self.max_bytes_per_s <= 0:
            raise ValueError("CopyOptions.max_bytes_per_s must be positive or None")


@dataclass(frozen=True, slots=True)
class CopyReport:
    """What :func:`copy` did. ``files_copied`` counts ``files_replaced`` (a wrong or partial file
    at the destination, deleted and copied again); ``files_skipped`` were already there."""

    src: str
    dst: str
    steps_copied: tuple[int, ...]  # committed at the destination by this run
    steps_present: tuple[int, ...]  # already committed there with the identical manifest
    files_copied: int
    files_skipped: int
    files_replaced: int
    bytes_copied: int
    bytes_checked: int  # bytes of existing destination files re-read to check them
    seconds: float

    @property
    def mb_per_s(self) -> float:
        """Copied bytes per second, in MB (10**6 bytes), over the whole run."""
        return self.bytes_copied / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "steps_copied": list(self.steps_copied),
            "steps_present": list(self.steps_present),
            "files_copied": self.files_copied,
            "files_skipped": self.files_skipped,
            "files_replaced": self.files_replaced,
            "bytes_copied": self.bytes_copied,
            "bytes_checked": self.bytes_checked,
            "seconds": round(self.seconds, 6),
            "mb_per_s": round(self.mb_per_s, 3),
        }


# --- planning (pure) -----------------------------------------------------------------------------


class _Throttle:
    """Holds the callers of ``take(n)`` to ``rate`` bytes per second in all."""

    def __init__(self, rate: int | None) -> None:
        self._rate = rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        if self._rate is None:
            return
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + n / self._rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)


@dataclass
class _Tally:
    copied: int = 0
    skipped: int = 0
    replaced: int = 0
    bytes_copied: int = 0
    bytes_checked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def copy(
    src_root: Root,
    dst_root: Root,
    steps: Sequence[int] | None = None,
    *,
    src_storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    options: CopyOptions | None = None,
    progress: ProgressArg = None,
    on_plan: Callable[[CopyPlan], None] | None = None,
) -> CopyReport:
    """Copy committed checkpoints from ``src_root`` to ``dst_root`` (any two fsspec roots),
    verifying every checksum on the way; resumable (see the module docs).

    Args:
        steps: the steps to copy; None: every committed step of the source whose manifest
            validates (invalid ones are skipped: they are not checkpoints).
        progress: a callable given a ``ckpt.Progress`` as bytes are copied or checked (from
            worker threads), or True for a tqdm bar (``ckpt.progress``).
        on_plan: called once with the plan, before any file is copied (e.g. to size a
            progress bar: ``plan.bytes_to_copy + plan.bytes_to_check``).

    Raises:
        CheckpointNotFoundError: a named step is not committed at the source (or, with
            ``steps=None``, the source has none).
        CheckpointExistsError: a step is committed at the destination with another manifest
            (raised before anything is copied).
        ChecksumMismatchError / ShardSizeMismatchError / MissingShardError: a source file is
            corrupt, truncated or missing (the message names it); that step is not committed.
    """
    src_root = root_url(src_root, "src_root")
    dst_root = root_url(dst_root, "dst_root")
    opts = options or CopyOptions()
    t0 = time.perf_counter()
    src = open_storage(src_root, src_storage_options)
    dst = open_storage(
        dst_root, dst_storage_options,
        part_bytes=opts.chunk_bytes, max_inflight_bytes=opts.max_inflight_bytes,
    )  # fmt: skip
    ensure_committable(dst, allow_non_atomic=opts.allow_non_atomic_commit, switch="CopyOptions")
    manifests = _source_manifests(src, steps, opts.num_threads)
    dst_steps = set(committed_steps(dst))
    there: dict[int, bytes] = {}

    def read_dst(step: int) -> None:
        with contextlib.suppress(FileNotFoundError):  # retired between the listing and the read
            there[step] = dst.read(layout.manifest_path(step))

    _concurrency.run_all(read_dst, [m.step for m in manifests if m.step in dst_steps], num_threads=opts.num_threads)
    listing = {f.path: f.size for f in dst.list_files()} if any(m.step not in there for m in manifests) else {}
    plan = plan_copy(manifests, listing, there, dst_url=dst.url, check_existing=opts.check_existing)
    if on_plan is not None:
        on_plan(plan)
    by_step = {m.step: m for m in manifests}
    tally = _Tally()
    committed: list[int] = []
    meter = Meter("copy", progress, retries=lambda: src.retries + dst.retries)
    todo = [t for t in plan.tasks if t.action != "skip"]
    meter.phase("copy", bytes_total=plan.bytes_to_copy + plan.bytes_to_check, files_total=len(todo))
    runner = _Runner(src, dst, opts, by_step, tally, meter)

    # each step commits as soon as the last of its files is in (steps sharing files wait for them)
    waiting = {s: set(plan.needs[s]) for s in plan.commit}
    lock = threading.Lock()

    def commit_ready(done_path: str | None) -> None:
        with lock:
            ready = []
            for s in plan.commit:
                w = waiting.get(s)
                if w is None:
                    continue
                w.discard(done_path or "")
                if not w:
                    ready.append(s)
                    del waiting[s]
            for s in ready:  # under the lock: LATEST only ever moves forward
                if opts.fsync:
                    dst.sync_dirs([*sorted({posixpath.dirname(p) for p in by_step[s].files}), "data", ""])
                commit_protocol.publish(dst, by_step[s], fsync=opts.fsync, update_latest=opts.update_latest)
                committed.append(s)

    done_before = {t.path for t in plan.tasks if t.action == "skip"}
    for s in plan.commit:
        waiting[s] -= done_before
    with tally.lock:
        tally.skipped += len(done_before)
    commit_ready(None)

    def run(task: FileTask) -> None:
        runner.run(task)
        meter.add(files=1)
        commit_ready(task.path)

    try:
        _concurrency.run_all(run, todo, num_threads=opts.num_threads)
        meter.phase("done")
    finally:
        meter.close()
    _log.info("%s -> %s: copied steps %s: %s", src.url, dst.url, sorted(committed),
              summary(tally.bytes_copied, time.perf_counter() - t0, dst.retries + src.retries))  # fmt: skip
    return CopyReport(
        src=src.url,
        dst=dst.url,
        steps_copied=tuple(sorted(committed)),
        steps_present=plan.present,
        files_copied=tally.copied,
        files_skipped=tally.skipped,
        files_replaced=tally.replaced,
        bytes_copied=tally.bytes_copied,
        bytes_checked=tally.bytes_checked,
        seconds=time.perf_counter() - t0,
    )


def _source_manifests(src: Storage, steps: Sequence[int] | None, num_threads: int) -> list[Manifest]:
    found: dict[int, Manifest] = {}
    explicit = steps is not None
    wanted = sorted(set(steps)) if steps is not None else committed_steps(src)

    def load(step: int) -> None:
        try:
            found[step] = read_step(src, step)
        except (ManifestError, CheckpointNotFoundError):
            if explicit:
                raise
            # steps=None: an invalid manifest is not a checkpoint; a vanished one is retired

    _concurrency.run_all(load, wanted, num_threads=num_threads)
    if not found:
        raise CheckpointNotFoundError(f"{src.url}: no committed checkpoint to copy")
    return [found[s] for s in sorted(found)]


class _Runner:
    """Runs one :class:`FileTask`: checks, deletes and copies, with the budget and throttle."""

    def __init__(
        self,
        src: Storage,
        dst: Storage,
        opts: CopyOptions,
        manifests: dict[int, Manifest],
        tally: _Tally,
        meter: Meter,
    ) -> None:
        self.src, self.dst, self.opts, self.manifests = src, dst, opts, manifests
        self.tally, self.meter = tally, meter
        self.budget = _concurrency.ByteBudget(opts.max_inflight_bytes)
        self.throttle = _Throttle(opts.max_bytes_per_s)
        self._shards: dict[int, dict[str, list[_Stored]]] = {}
        self._referenced: set[str] | None = None
        self._lock = threading.Lock()
        # local disks and S3 consume each chunk before asking for the next: one buffer per file
        self._reuse = dst.streams_chunks

    def run(self, task: FileTask) -> None:
        action = task.action
        if action == "check":
            if self._dst_crc(task) == task.crc32c:
                with self.tally.lock:
                    self.tally.skipped += 1
                return
            action = "replace"
        if action == "replace":
            self._delete_stale(task)
        self._copy(task)
        with self.tally.lock:
            self.tally.copied += 1
            self.tally.bytes_copied += task.size
            self.tally.replaced += action == "replace"

    def _shards_of(self, step: int) -> dict[str, list[_Stored]]:
        with self._lock:
            out = self._shards.get(step)
            if out is None:
                m = self.manifests[step]
                out = {p: [] for p in m.files}
                for key, t in m.tensors.items():
                    for s in t.shards:
                        out[s.file].append((key, t.dtype, s))
                self._shards[step] = out
            return out

    def _dst_crc(self, task: FileTask) -> int | None:
        """The crc32c of the destination's file (None if it changed size under us)."""
        cost = min(task.size, self.opts.chunk_bytes)
        self.budget.acquire(cost)
        try:
            buf = bytearray(cost)
            crc, pos = 0, 0
            while pos < task.size:
                n = min(cost, task.size - pos)
                view = memoryview(buf)[:n]
                try:
                    self.dst.read_into(task.path, pos, [view])
                except ShardSizeMismatchError:
                    return None
                crc = crc32c.crc32c(view, value=crc)
                pos += n
                with self.tally.lock:
                    self.tally.bytes_checked += n
                self.meter.add(n)
            return crc
        finally:
            self.budget.release(cost)

    def _delete_stale(self, task: FileTask) -> None:
        """Delete a wrong or partial destination file, unless a committed checkpoint there
        references it (then it is that checkpoint's data: never touched)."""
        with self._lock:
            if self._referenced is None:
                self._referenced = self._dst_referenced()
            referenced = task.path in self._referenced
        if referenced:
            raise ChecksumMismatchError(
                f"{self.dst.where(task.path)}: its size or crc32c differs from the source's manifest "
                f"({task.size} bytes, crc32c {task.crc32c:#010x}) and a committed checkpoint at the "
                "destination references it; verify the destination (ckpt verify --all), then "
                "retire the damaged step or delete the file, and copy again"
            )
        self.dst.delete(task.path)

    def _dst_referenced(self) -> set[str]:
        out: set[str] = set()
        for step in committed_steps(self.dst):
            try:
                out.update(read_step(self.dst, step).files)
            except CheckpointNotFoundError:
                continue
            except ManifestError as err:
                raise PlanError(
                    f"{self.dst.url}: a destination file must be replaced but step {step}'s manifest "
                    f"there does not validate, so what it references is unknown ({err})"
                ) from err
        return out

    def _copy(self, task: FileTask) -> None:
        m = self.manifests[task.step]
        shards = self._shards_of(task.step).get(task.path, [])
        chunk = self.opts.chunk_bytes
        # local and S3 writes stream (one chunk at a time); other backends gather the file
        cost = min(task.size, chunk) if self._reuse else task.size
        self.budget.acquire(cost)
        try:
            self.dst.write_file(task.path, self._chunks(task, shards, m.block_bytes), size=task.size, fsync=self.opts.fsync)
        finally:
            self.budget.release(cost)

    def _chunks(self, task: FileTask, shards: list[_Stored], block_bytes: int) -> Iterator[memoryview]:
        """The source file's bytes, checked against the manifest as they go by: a bad block
        raises before its chunk is handed on, a bad file crc32c before the write completes."""
        where = self.src.where(task.path)
        blocks = _BlockChecker(shards, block_bytes)
        chunk = self.opts.chunk_bytes
        buf = bytearray(min(chunk, task.size)) if self._reuse else None
        crc, pos = 0, 0
        while pos < task.size:
            n = min(chunk, task.size - pos)
            view = memoryview(buf if buf is not None else bytearray(n))[:n]
            self.src.read_into(task.path, pos, [view])
            self.throttle.take(n)
            crc = crc32c.crc32c(view, value=crc)
            blocks.feed(pos, view)
            if blocks.bad:
                key, bad = next(iter(blocks.bad.items()))
                b = bad[0]
                raise ChecksumMismatchError(
                    f"{where}: key {key!r}: crc32c of bytes [{b.start}, {b.end}) (block {b.index}) "
                    f"does not match the manifest; the source is corrupt, nothing was written to "
                    f"{self.dst.where(task.path)}"
                )
            pos += n
            self.meter.add(n)
            yield view
        if crc != task.crc32c:
            raise ChecksumMismatchError(
                f"{where}: crc32c of the file is {crc:#010x}, the manifest says {task.crc32c:#010x}; "
                f"the source is corrupt, nothing was written to {self.dst.where(task.path)}"
            )
