"""Garbage: what no committed checkpoint needs, and is old enough that no save can still be
writing it. The planner is pure; :func:`collect` lists the root and deletes.

Garbage is, by name (only names ckpt itself writes: docs/CLI.md, "ckpt gc")
- a shard file ``data/<step:012d>-<attempt>/<writer:05d>-<k>.safetensors`` no committed manifest
  references, in an attempt directory none of whose shard files was modified within the grace
  period (a save in progress writes its attempt's files over minutes: the newest file of a
  directory speaks for all of them);
- a temporary file ``.<name>.<32 hex digits>.tmp`` (left by a crash between write and link or
  rename) in ``steps/<step>/``, in an attempt directory or at the root, older than the grace period;
- on object stores, a multipart upload under the root started before the grace period.

Nothing else under the root is touched: files that are not ckpt's (a note in a step directory, a
file of another name under ``data/``) are not garbage, whatever their age. If a manifest under
the root does not validate, no data file is collected: what it references is unknown (it could
be a newer format's checkpoint).
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ckpt.errors import CheckpointNotFoundError, ManifestError
from ckpt.format import layout
from ckpt.lifecycle.steps import committed_steps, read_step
from ckpt.storage import Listed, Storage, Upload

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


def collect(
    storage: Storage, *, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False, now: float | None = None
) -> GcPlan:
    """List the root, plan, and (unless ``dry_run``) delete the garbage and abort stale uploads."""
    now = time.time() if now is None else now
    listed = storage.list_files()
    uploads = storage.multipart_uploads()
    referenced: set[str] = set()
    unreadable: list[str] = []
    for step in committed_steps(storage):
        try:
            m = read_step(storage, step)
        except CheckpointNotFoundError:
            continue
        except ManifestError:
            unreadable.append(layout.manifest_path(step))
            continue
        referenced.update(m.files)
        referenced.add(layout.manifest_path(step))
    plan = plan_gc(listed, uploads, referenced, now=now, grace_s=grace_s, unreadable=unreadable)
    if not dry_run:
        _delete(storage, plan.delete)
        for u in plan.abort:
            storage.abort_upload(u)
    return plan


def _delete(storage: Storage, paths: Iterable[str]) -> None:
    dirs = set()
    for p in paths:
        storage.delete(p)
        dirs.add(posixpath.dirname(p))
    for d in sorted(dirs, key=len, reverse=True):
        storage.remove_empty_dir(d)
