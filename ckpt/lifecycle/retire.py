"""Retirement: deleting committed checkpoints in the order that never loses a live one.

The manifest goes first (from then on the step does not exist), then the data files that no
remaining committed manifest references (docs/FORMAT.md 9.5), then their directories if empty:
nothing is deleted by prefix, so files that are not ckpt's stay. A crash in between leaves only
unreferenced data: garbage, never a manifest whose data is gone. Data of attempts in progress is
never referenced by a retired manifest, so it is never touched here.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

from ckpt.engine.executor import DEFAULT_IO_TIMEOUT_S, bounded
from ckpt.errors import CheckpointNotFoundError, ManifestError
from ckpt.format import layout
from ckpt.format.manifest import Manifest
from ckpt.lifecycle.steps import committed_steps, read_step
from ckpt.storage import Storage


@dataclass(frozen=True, slots=True)
class Retired:
    step: int
    files_deleted: tuple[str, ...]
    files_kept: tuple[str, ...]  # still referenced by a remaining checkpoint (or by one unreadable), or adopted


def retire(
    storage: Storage, steps: Iterable[int], *, dry_run: bool = False, timeout_s: float | None = DEFAULT_IO_TIMEOUT_S
) -> list[Retired]:
    """Retire ``steps`` (committed checkpoints under ``storage``), oldest first. ``timeout_s``
    bounds each storage operation (StorageTimeoutError)."""
    doomed = sorted(set(steps))
    manifests = {s: read_step(storage, s, timeout_s=timeout_s) for s in doomed}
    listed = committed_steps(storage, timeout_s=timeout_s)
    remaining = [s for s in listed if s not in manifests]
    referenced: set[str] = set()
    unreadable = False
    for s in remaining:
        try:
            referenced.update(read_step(storage, s, timeout_s=timeout_s).files)
        except CheckpointNotFoundError:
            continue  # a directory without a manifest: not a checkpoint
        except ManifestError:
            unreadable = True  # not a checkpoint, but what it names is unknown: delete no data
    for s in doomed:  # refused before anything is deleted: never through a link (Storage.check_no_links)
        for rel in (layout.manifest_path(s), *manifests[s].files):
            storage.check_no_links(rel)
    out = []
    for s in doomed:
        m = manifests[s]
        if not dry_run:
            rel = layout.manifest_path(s)
            _delete(storage, rel, timeout_s=timeout_s)  # the step ceases to exist here
            _remove_dir(storage, posixpath.dirname(rel), timeout_s=timeout_s)
        if unreadable:
            out.append(Retired(s, (), tuple(sorted(m.files))))
            continue
        gone, kept = _data(storage, m, referenced, dry_run=dry_run, timeout_s=timeout_s)
        out.append(Retired(s, gone, kept))
    return out


def _delete(storage: Storage, rel: str, *, timeout_s: float | None) -> None:
    bounded(lambda: storage.delete(rel), timeout_s=timeout_s, what=f"{storage.where(rel)}: delete")


def _remove_dir(storage: Storage, rel: str, *, timeout_s: float | None) -> None:
    """The directory, once empty (local disks): files that are not ckpt's keep it, and them."""
    bounded(lambda: storage.remove_empty_dir(rel), timeout_s=timeout_s, what=f"{storage.where(rel)}: remove directory")


def _data(
    storage: Storage, m: Manifest, referenced: set[str], *, dry_run: bool, timeout_s: float | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # Only ckpt's own data files (under data/) are ever deleted: files a manifest adopted
    # (ckpt.interop.adopt: a model directory's safetensors files, elsewhere under the root) are kept.
    gone = tuple(sorted(p for p in m.files if p not in referenced and p.startswith("data/")))
    kept = tuple(sorted(p for p in m.files if p in referenced or not p.startswith("data/")))
    if not dry_run:
        for p in gone:
            _delete(storage, p, timeout_s=timeout_s)
        for d in sorted({posixpath.dirname(p) for p in gone}):
            if not any(posixpath.dirname(k) == d for k in kept):
                _remove_dir(storage, d, timeout_s=timeout_s)  # the attempt's directory (local disks)
    return gone, kept
