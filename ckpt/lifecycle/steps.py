"""Steps: the committed checkpoints of a root. Listing them, reading and resolving a manifest,
the newest valid one, and the one check of whether a root may be committed to (with the S3
conditional-write probe), used by save, copy and adopt alike. Paths come from
:mod:`ckpt.format.layout`; every storage call runs under the storage's deadline
(``Storage.io_timeout_s``). The manifest model (numpy, crc32c) is imported by the first read:
listing the steps of a root (``ckpt ls`` of an empty one) does without it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from ckpt._concurrency import DEFAULT_IO_TIMEOUT_S
from ckpt.errors import (
    CheckpointNotFoundError,
    CkptWarning,
    ConditionalWriteUnsupportedError,
    ManifestError,
    ManifestTooLargeError,
    MissingShardError,
    PlanError,
    StorageError,
)
from ckpt.format import layout
from ckpt.storage import Root, Storage, open_storage, root_url

if TYPE_CHECKING:
    from ckpt.format.manifest import Head, Manifest


def committed_steps(storage: Storage) -> list[int]:
    """Steps that have a ``steps/<step>/manifest.json`` file, ascending (one listing; manifests
    are not parsed). Anything else under ``steps/`` is ignored (docs/FORMAT.md 2.2)."""
    listed = storage.list_files(layout.STEPS)
    return sorted(s for f in listed if (s := layout.step_of_manifest(f.path)) is not None)


def list_steps(
    root: Root, *, storage_options: dict[str, Any] | None = None, io_timeout_s: float | None = DEFAULT_IO_TIMEOUT_S
) -> list[int]:
    """Steps with a manifest present, ascending (one listing; manifests are not parsed).
    ``io_timeout_s`` bounds the listing (StorageTimeoutError); None waits as long as it takes."""
    root = root_url(root)
    return committed_steps(open_storage(root, storage_options, io_timeout_s=io_timeout_s))


def latest_step(
    root: Root, *, storage_options: dict[str, Any] | None = None, io_timeout_s: float | None = DEFAULT_IO_TIMEOUT_S
) -> int | None:
    """The newest step whose manifest exists and validates; None if there is none.

    A newer manifest that fails validation is skipped with a CkptWarning (it is not a checkpoint).
    ``io_timeout_s`` bounds each storage call.
    """
    root = root_url(root)
    m = _latest(open_storage(root, storage_options, io_timeout_s=io_timeout_s), lazy=True)
    return None if m is None else m.step


def _latest(storage: Storage, *, below: int | None = None, lazy: bool = False) -> Manifest | None:
    """The newest manifest that validates (of the steps before ``below``, if given; ``lazy``:
    see :func:`read_step`)."""
    steps = committed_steps(storage)
    for step in reversed(steps):
        if below is not None and step >= below:
            continue
        try:
            return read_step(storage, step, lazy=lazy)
        except ManifestError as err:
            warnings.warn(f"skipping step {step}: {err}", CkptWarning, stacklevel=3)
        except CheckpointNotFoundError:
            continue  # retired between the listing and the read
    return None


def read_manifest(
    root: Root,
    step: int | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    io_timeout_s: float | None = DEFAULT_IO_TIMEOUT_S,
) -> Manifest:
    """The parsed, validated manifest of ``step`` (default: the latest); ``io_timeout_s``
    bounds each storage call."""
    root = root_url(root)
    return resolve_step(open_storage(root, storage_options, io_timeout_s=io_timeout_s), step)


def resolve_step(storage: Storage, step: int | None, *, lazy: bool = False) -> Manifest:
    """``step``'s manifest, or the newest one that validates when ``step`` is None (newer
    invalid ones are skipped with a CkptWarning: they are not checkpoints). ``lazy``: see
    :func:`read_step`."""
    if step is not None:
        return read_step(storage, step, lazy=lazy)
    m = _latest(storage, lazy=lazy)
    if m is None:
        raise CheckpointNotFoundError(f"{storage.url}: no committed checkpoint")
    return m


def read_step(storage: Storage, step: int, *, lazy: bool = False) -> Manifest:
    """The validated manifest of ``step``: CheckpointNotFoundError if absent, a ManifestError if
    it does not validate. The size is checked before anything is read (``Storage.read_small``:
    one GetObject on S3, whose reply states the size before the body). ``lazy``: a v2 manifest's
    head, tree, objects and checksums are checked now, each tensor entry when it is asked for
    (``Manifest.entries``)."""
    from ckpt.format import manifest as manifest_mod

    data = _manifest_bytes(storage, step)
    return manifest_mod.parse(data, where=storage.where(layout.manifest_path(step)), expected_step=step, lazy=lazy)


def read_head(storage: Storage, step: int) -> Head:
    """What a listing shows of ``step``: a v2 manifest's sealed head (its body is neither read
    nor decoded: a manifest over :data:`HEAD_PROBE_BYTES` is read from its start up to that
    many bytes, which hold the head of any but the very largest, after a stat), or a v1
    manifest validated whole. Errors as :func:`read_step`."""
    from ckpt.format import manifest as manifest_mod

    rel = layout.manifest_path(step)
    data: bytes | None = None
    try:
        if storage.size(rel) > HEAD_PROBE_BYTES:  # a stat (HEAD), then a ranged read of the start
            buf = bytearray(HEAD_PROBE_BYTES)
            storage.read_into(rel, 0, [memoryview(buf)])
            data = bytes(buf) if manifest_mod.is_paged(buf) and b"\n" in buf else None  # else read whole
    except MissingShardError:  # absent, or retired between the listing and the read
        raise CheckpointNotFoundError(f"{storage.url}: no committed checkpoint for step {step}") from None
    if data is None:
        data = _manifest_bytes(storage, step)
    return manifest_mod.parse_head(data, where=storage.where(rel), expected_step=step)


HEAD_PROBE_BYTES = 256 << 10  # a paged manifest's head: ~13 KB at 20,000 tensors, ~60 KB at 100,000


def _manifest_bytes(storage: Storage, step: int) -> bytes:
    from ckpt.format import manifest as manifest_mod

    rel = layout.manifest_path(step)
    where = storage.where(rel)
    try:
        size, data = storage.read_small(rel, manifest_mod.MAX_MANIFEST_BYTES)
    except MissingShardError:  # absent, or retired between the stat and the read
        raise CheckpointNotFoundError(f"{storage.url}: no committed checkpoint for step {step}") from None
    if data is None:
        raise ManifestTooLargeError(
            f"{where}: {size} bytes is over the {manifest_mod.MAX_MANIFEST_BYTES}-byte manifest cap"
        )
    if len(data) < size:  # manifests are never rewritten: fewer bytes than stat said is a failed read
        raise StorageError(f"{where}: short read: got {len(data)} of its {size} bytes")
    return data



def newest_step(storage: Storage, *, below: int | None = None) -> int | None:
    """The newest step (before ``below``) whose manifest exists and validates, or None."""
    m = _latest(storage, below=below, lazy=True)
    return None if m is None else m.step


def ensure_committable(storage: Storage, *, allow_non_atomic: bool, switch: str | None) -> None:
    """The one check of "may we commit to this root?" (save, copy, adopt): the backend must have
    a create-only write ckpt trusts, and where that write needs a probe (S3), the endpoint must
    pass it; ``allow_non_atomic`` (the caller declares a single writer) skips both. ``switch``
    names the options class that has that switch (None: the operation has none)."""
    if allow_non_atomic:
        return
    escape = (
        f" Pass {switch}(allow_non_atomic_commit=True) if only one job ever writes this root." if switch else ""
    )
    if not storage.atomic_create:
        raise PlanError(
            f"{storage.url}: this backend has no create-only write ckpt trusts; concurrent commits "
            f"could overwrite each other.{escape}"
        )
    if not storage.conditional_writes_work():
        raise ConditionalWriteUnsupportedError(
            f"{storage.url}: the endpoint {storage.endpoint()} ignores {storage.precondition} (a second "
            "create-only write of a probe key succeeded instead of being refused), so two writers "
            f"committing the same step could overwrite each other's manifest.{escape} (docs/storage.md)"
        )
