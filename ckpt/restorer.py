"""Restore orchestration: find a step, read its manifest, plan, read, assemble.

``restore`` gives back the saved structure with the same container and leaf types. A ``target``
that mirrors the state selects what to read (keys missing from it are not read) and supplies
tensors to fill in place.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from ckpt import commit_protocol as commit_mod
from ckpt import dtypes, executor, regions, tree
from ckpt import manifest as manifest_mod
from ckpt.errors import (
    CheckpointNotFoundError,
    CkptWarning,
    ManifestError,
    ManifestTooLargeError,
    MissingShardError,
    ShardSizeMismatchError,
    StorageError,
    TargetMismatchError,
)
from ckpt.executor import DEFAULT_IO_TIMEOUT_S
from ckpt.manifest import Manifest
from ckpt.options import RestoreOptions
from ckpt.restore_plan import Request, plan_restore
from ckpt.shard import Shard, dtensor_layout, is_dtensor
from ckpt.storage import Storage


def list_steps(
    root: str, *, storage_options: dict[str, Any] | None = None, io_timeout_s: float | None = DEFAULT_IO_TIMEOUT_S
) -> list[int]:
    """Steps with a manifest present, ascending (one listing; manifests are not parsed).
    ``io_timeout_s`` bounds the listing (StorageTimeoutError); None waits as long as it takes."""
    storage = Storage(root, storage_options)
    return executor.bounded(storage.step_dirs, timeout_s=io_timeout_s, what=f"{storage.where('steps')}: listing")


def latest_step(
    root: str, *, storage_options: dict[str, Any] | None = None, io_timeout_s: float | None = DEFAULT_IO_TIMEOUT_S
) -> int | None:
    """The newest step whose manifest exists and validates; None if there is none.

    A newer manifest that fails validation is skipped with a CkptWarning (it is not a checkpoint).
    ``io_timeout_s`` bounds each storage call.
    """
    m = _latest(Storage(root, storage_options), timeout_s=io_timeout_s)
    return None if m is None else m.step


def _latest(storage: Storage, *, timeout_s: float | None = None) -> Manifest | None:
    steps = executor.bounded(storage.step_dirs, timeout_s=timeout_s, what=f"{storage.where('steps')}: listing")
    for step in reversed(steps):
        try:
            return read_step(storage, step, timeout_s=timeout_s)
        except ManifestError as err:
            warnings.warn(f"skipping step {step}: {err}", CkptWarning, stacklevel=3)
        except CheckpointNotFoundError:
            continue  # retired between the listing and the read
    return None


def read_manifest(
    root: str,
    step: int | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    io_timeout_s: float | None = DEFAULT_IO_TIMEOUT_S,
) -> Manifest:
    """The parsed, validated manifest of ``step`` (default: the latest); ``io_timeout_s``
    bounds each storage call."""
    return resolve_step(Storage(root, storage_options), step, timeout_s=io_timeout_s)


def resolve_step(storage: Storage, step: int | None, *, timeout_s: float | None = None) -> Manifest:
    """``step``'s manifest, or the newest one that validates when ``step`` is None (newer
    invalid ones are skipped with a CkptWarning: they are not checkpoints). ``timeout_s``
    bounds each storage operation (StorageTimeoutError)."""
    if step is not None:
        return read_step(storage, step, timeout_s=timeout_s)
    m = _latest(storage, timeout_s=timeout_s)
    if m is None:
        raise CheckpointNotFoundError(f"{storage.url}: no committed checkpoint")
    return m


def read_step(storage: Storage, step: int, *, timeout_s: float | None = None) -> Manifest:
    """The validated manifest of ``step``: CheckpointNotFoundError if absent, a ManifestError if
    it does not validate. The size is checked before anything is read. ``timeout_s`` bounds
    each storage operation (StorageTimeoutError)."""
    rel = commit_mod.manifest_path(step)
    where = storage.where(rel)
    try:
        size = executor.bounded(lambda: storage.size(rel), timeout_s=timeout_s, what=f"{where}: stat")
        if size > manifest_mod.MAX_MANIFEST_BYTES:
            raise ManifestTooLargeError(
                f"{where}: {size} bytes is over the {manifest_mod.MAX_MANIFEST_BYTES}-byte manifest cap"
            )
        data = executor.bounded(lambda: storage.read(rel), timeout_s=timeout_s, what=f"{where}: read")
    except MissingShardError:  # absent, or retired between the stat and the read
        raise CheckpointNotFoundError(f"{storage.url}: no committed checkpoint for step {step}") from None
    if len(data) < size:  # manifests are never rewritten: fewer bytes than stat said is a failed read
        raise StorageError(f"{where}: short read: got {len(data)} of its {size} bytes")
    return manifest_mod.parse(data, where=storage.where(rel), expected_step=step)


def restore(
    root: str,
    step: int | None = None,
    *,
    target: object = None,
    options: RestoreOptions | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Restore checkpoint ``step`` (default: the latest) under ``root``.

    Args:
        target: None for everything; or a structure mirroring the saved state whose tensor
            leaves are filled in place, whose ``None`` leaves are read whole, and whose missing
            keys are not read.

    Returns:
        The restored structure (the target's tensors are the same objects, now filled).
    """
    opts = options or RestoreOptions()
    storage = Storage(root, storage_options)
    m = resolve_step(storage, step, timeout_s=opts.io_timeout_s)
    return restore_manifest(storage, m, target=target, options=opts)


def restore_manifest(storage: Storage, m: Manifest, *, target: object, options: RestoreOptions) -> Any:
    sel = tree.Selection()
    tree.walk(m.tree, target, "", sel)
    # Check every target region, shape and dtype before allocating anything.
    wanted = {key: _destination(key, m, sel.destinations.get(key)) for key in sel.tensor_keys}
    # Stat the files of the requested tensors before planning: a plan is as big as the bytes
    # the manifest claims, so a lying manifest (a 4 TiB tensor over a small file) stops here.
    _check_sizes(storage, m, sel.tensor_keys, options.num_threads, options.io_timeout_s)
    requests = [Request(k, box) for k, (box, _) in wanted.items()]
    plan = plan_restore(
        m,
        requests,
        verify=options.verify,
        max_gap_bytes=options.gap_bytes(local=storage.is_local),
        read_chunk_bytes=options.chunk_bytes(local=storage.is_local),
    )
    bufs: dict[str, torch.Tensor] = {}
    finals: dict[str, torch.Tensor] = {}
    for key, (box, t) in wanted.items():
        if t is not None and t.device.type == "cpu" and t.is_contiguous():
            bufs[key] = t
        else:
            bufs[key] = torch.empty(box.sizes, dtype=dtypes.BY_CODE[m.tensors[key].dtype].torch_dtype)
        if t is not None:
            finals[key] = t
    executor.read_plan(
        storage,
        plan,
        [executor.byte_view(bufs[k]) for k in sel.tensor_keys],
        num_threads=options.num_threads,
        max_inflight_bytes=options.max_inflight_bytes,
        timeout_s=options.io_timeout_s,
    )
    for key, t in finals.items():
        if bufs[key] is not t:
            t.copy_(bufs[key])

    def build(kind: str, key: str, leaf: object) -> object:
        if kind == "object":
            return tree.decode_value(m.objects[key], f"object {key!r}")
        if leaf is not None:
            return leaf
        return bufs[key].numpy() if kind == "ndarray" else bufs[key]

    return tree.walk(m.tree, target, "", sel, build)


def _destination(key: str, m: Manifest, dest: object) -> tuple[regions.Box, torch.Tensor | None]:
    """The region a target leaf asks for and the tensor to fill (None: allocate)."""
    entry = m.tensors[key]
    want = dtypes.BY_CODE[entry.dtype].torch_dtype
    if dest is None:
        return regions.Box.whole(entry.shape), None
    if isinstance(dest, Shard):
        t, gshape, box = dest.tensor, dest.global_shape, regions.Box(dest.offsets, dest.sizes)
    elif is_dtensor(dest):
        lay = dtensor_layout(dest, key)  # type: ignore[arg-type]
        t, gshape, box = lay.local, lay.global_shape, regions.Box(lay.offsets, tuple(lay.local.shape))
    else:
        t = torch.from_numpy(dest) if isinstance(dest, np.ndarray) else dest  # type: ignore[assignment]
        gshape, box = tuple(t.shape), regions.Box.whole(tuple(t.shape))
    if t.dtype != want or gshape != entry.shape:
        raise TargetMismatchError(
            f"key {key!r}: target is {t.dtype} of global shape {list(gshape)}, the checkpoint holds "
            f"{want} {list(entry.shape)}"
        )
    return box, t


def _check_sizes(storage: Storage, m: Manifest, keys: list[str], num_threads: int, timeout_s: float | None = None) -> None:
    """One stat per file holding the requested tensors: truncated or extended files fail before
    any read."""
    users: dict[str, list[str]] = {}
    for k in keys:
        for p in m.tensors[k].shards.used_paths():  # no per-shard objects
            users.setdefault(p, []).append(k)

    def check(path: str) -> None:
        try:
            size = storage.size(path)
        except MissingShardError:
            raise MissingShardError(
                f"{storage.where(path)}: missing; it holds keys {users.get(path, [])[:5]}"
            ) from None
        if size != m.files[path].size:
            raise ShardSizeMismatchError(
                f"{storage.where(path)}: {size} bytes, the manifest says {m.files[path].size}; "
                f"truncated or extended (keys {users.get(path, [])[:5]})"
            )

    executor.run_all(check, sorted(users), num_threads=num_threads, timeout_s=timeout_s,
                     what=lambda p: f"{storage.where(p)}: stat")  # fmt: skip
