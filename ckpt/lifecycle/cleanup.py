"""Cleanup: everything that deletes under a root, in the orders that never lose a committed
checkpoint. Both operations share one scan of the committed manifests (:func:`referenced_files`).

**Retirement** (``ckpt rm``, retention): the manifests go first (from then on the steps do not
exist), then a scan of what the remaining manifests reference, then the data files that none of
them references (docs/FORMAT.md 9.5; incremental saves share files between steps),
then their directories if empty. A crash in between leaves only unreferenced data: garbage, never a
manifest whose data is gone. Every path is checked for links before anything is deleted.

**Garbage collection** (``ckpt gc``): what no committed checkpoint needs, and is old enough that no
save can still be writing it; the planner is pure. Garbage is, by name (only names ckpt itself
writes, :mod:`ckpt.format.layout`; docs/CLI.md, "ckpt gc")
- a shard file no committed manifest references, in an attempt directory none of whose shard files
  was modified within the grace period (a save in progress writes its attempt's files over minutes:
  the newest file of a directory speaks for all of them);
- a temp file of ckpt's create-only or atomic writes older than the grace period;
- on object stores, a multipart upload under the root started before the grace period.

Nothing is deleted by prefix, and files that are not ckpt's (a note in a step directory, a file of
another name under ``data/``) are never deleted, whatever their age. If a manifest under the root
does not validate, no data file is deleted: what it references is unknown (it could be a newer
format's checkpoint).
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ckpt._concurrency import DEFAULT_IO_TIMEOUT_S
from ckpt.errors import CheckpointNotFoundError, ManifestError
from ckpt.format import layout
from ckpt.format.manifest import Manifest
from ckpt.lifecycle.steps import committed_steps, read_step
from ckpt.storage import Listed, Root, Storage, Upload, open_storage, root_url

# --- the public operations on a root ---------------------------------------------------------


def retire(
    root: Root,
    steps: Iterable[int],
    *,
    storage_options: dict[str, Any] | None = None,
    dry_run: bool = False,
    io_timeout_s: float | None = DEFAULT_IO_TIMEOUT_S,
) -> list[Retired]:
    """Retire committed checkpoints ``steps`` under ``root`` (``ckpt rm``); see the module docs.
    ``io_timeout_s`` bounds each storage call (StorageTimeoutError)."""
    root = root_url(root)
    return retire_steps(open_storage(root, storage_options, io_timeout_s=io_timeout_s), steps, dry_run=dry_run)


def collect(
    root: Root,
    *,
    grace_s: float | None = None,
    dry_run: bool = False,
    storage_options: dict[str, Any] | None = None,
    io_timeout_s: float | None = DEFAULT_IO_TIMEOUT_S,
) -> GcPlan:
    """Collect the garbage under ``root`` (``ckpt gc``); see the module docs. ``grace_s``
    defaults to 24 hours; ``io_timeout_s`` bounds each storage call."""
    root = root_url(root)
    grace = DEFAULT_GRACE_S if grace_s is None else grace_s
    return collect_garbage(open_storage(root, storage_options, io_timeout_s=io_timeout_s), grace_s=grace, dry_run=dry_run)


# --- the one scan ----------------------------------------------------------------------------


def referenced_files(storage: Storage, *, skip: Iterable[int] = ()) -> tuple[set[str], list[str]]:
    """Every file a committed manifest (other than those of ``skip``) names, the manifests
    themselves included; and the manifests that do not validate (what they name is unknown)."""
    skipped = set(skip)
    referenced: set[str] = set()
    unreadable: list[str] = []
    for step in committed_steps(storage):
        if step in skipped:
            continue
        try:
            m = read_step(storage, step, lazy=True)  # its files and checksums; no tensor entry is used
        except CheckpointNotFoundError:
            continue  # retired between the listing and the read
        except ManifestError:
            unreadable.append(layout.manifest_path(step))
            continue
        referenced.update(m.files)
        referenced.add(layout.manifest_path(step))
    return referenced, unreadable


# --- retirement --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Retired:
    step: int
    files_deleted: tuple[str, ...]
    files_kept: tuple[str, ...]  # still referenced by a remaining checkpoint (or by one unreadable), or adopted


def retire_steps(storage: Storage, steps: Iterable[int], *, dry_run: bool = False) -> list[Retired]:
    """Retire ``steps`` (committed checkpoints under ``storage``), oldest first."""
    doomed = sorted(set(steps))
    manifests = {s: read_step(storage, s, lazy=True) for s in doomed}  # their files: the heads say
    for s in doomed:  # refused before anything is deleted: never through a link (Storage.check_no_links)
        for rel in (layout.manifest_path(s), *manifests[s].files):
            storage.check_no_links(rel)
    if not dry_run:
        for s in doomed:
            rel = layout.manifest_path(s)
            storage.delete(rel)  # the step ceases to exist here
            storage.remove_empty_dir(posixpath.dirname(rel))
    # The scan runs after the manifests are gone, never before: an incremental save that commits
    # a reference to a retired step's files either commits before this scan (and is seen by it) or
    # finds its base gone after its commit and withdraws (ckpt.lifecycle.save._check_base_kept).
    referenced, unreadable = referenced_files(storage, skip=doomed)
    out = []
    for s in doomed:
        m = manifests[s]
        if unreadable:
            out.append(Retired(s, (), tuple(sorted(m.files))))
            continue
        gone, kept = _retire_data(storage, m, referenced, dry_run=dry_run)
        out.append(Retired(s, gone, kept))
    return out


def _retire_data(
    storage: Storage, m: Manifest, referenced: set[str], *, dry_run: bool
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # Only ckpt's own data files (under data/) are ever deleted: files a manifest adopted
    # (ckpt.interop.adopt: a model directory's safetensors files, elsewhere under the root) are kept.
    own = f"{layout.DATA}/"
    gone = tuple(sorted(p for p in m.files if p not in referenced and p.startswith(own)))
    kept = tuple(sorted(p for p in m.files if p in referenced or not p.startswith(own)))
    if not dry_run:
        _delete_files(storage, gone)
    return gone, kept


# --- garbage collection ------------------------------------------------------------------------


DEFAULT_GRACE_S = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class GcPlan:
    delete: tuple[str, ...]  # relative paths, files
    delete_bytes: int
    abort: tuple[Upload, ...]  # stale multipart uploads
    too_recent: tuple[str, ...]  # unreferenced, but within the grace period
    blocked_by: tuple[str, ...]  # manifests that do not validate: no data collected because of them


def plan_gc(
    listed: Sequence[Listed],
    uploads: Sequence[Upload],
    referenced: set[str],
    *,
    now: float,
    grace_s: float,
    unreadable: Sequence[str] = (),
) -> GcPlan:
    """What to delete. Pure: ``listed`` is every file under the root (relative paths, sizes,
    modification times), ``referenced`` every file a committed manifest names."""
    cutoff = now - grace_s
    newest_in: dict[str, float] = {}
    for f in listed:
        d = layout.attempt_dir_of(f.path)
        if d is not None:
            newest_in[d] = max(newest_in.get(d, f.mtime), f.mtime)
    delete: list[Listed] = []
    recent: list[str] = []
    for f in listed:
        if f.path in referenced:
            continue
        d = layout.attempt_dir_of(f.path)
        if d is not None:  # a shard file: its attempt's newest file decides
            if unreadable:
                continue
            last = newest_in[d]
        elif layout.is_temp(f.path):
            last = f.mtime
        else:
            continue  # not ckpt's, or not garbage (a manifest, LATEST)
        if last < cutoff:
            delete.append(f)
        else:
            recent.append(f.path)
    stale = tuple(u for u in uploads if u.initiated < cutoff)
    return GcPlan(
        tuple(sorted(f.path for f in delete)), sum(f.size for f in delete), stale, tuple(sorted(recent)),
        tuple(unreadable),
    )  # fmt: skip


def collect_garbage(
    storage: Storage,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    dry_run: bool = False,
    now: float | None = None,
) -> GcPlan:
    """List the root, plan, and (unless ``dry_run``) delete the garbage and abort stale uploads."""
    now = time.time() if now is None else now
    listed = storage.list_files()
    uploads = storage.multipart_uploads()
    referenced, unreadable = referenced_files(storage)
    plan = plan_gc(listed, uploads, referenced, now=now, grace_s=grace_s, unreadable=unreadable)
    if not dry_run:
        _delete_files(storage, plan.delete)
        for u in plan.abort:
            storage.abort_upload(u)
    return plan


# --- deleting --------------------------------------------------------------------------------


def _delete_files(storage: Storage, paths: Iterable[str]) -> None:
    """Delete ``paths`` one by one, then their directories where empty, deepest first (local
    disks: files that are not ckpt's keep a directory, and are kept)."""
    dirs = set()
    for p in paths:
        storage.delete(p)
        dirs.add(posixpath.dirname(p))
    for d in sorted(dirs, key=len, reverse=True):
        storage.remove_empty_dir(d)
