"""Save orchestration: ``begin`` (coordinator), ``write_shards`` (each writer), ``commit``
(coordinator), and ``save`` for one process (all three in a row).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ckpt import _collector as collector
from ckpt.engine import executor, owners, save_plan
from ckpt.errors import CheckpointExistsError, PlanError
from ckpt.format import dtypes, layout
from ckpt.format.manifest import Manifest
from ckpt.lifecycle import attempt as attempt_mod
from ckpt.lifecycle import commit as commit_mod
from ckpt.lifecycle import steps
from ckpt.lifecycle.attempt import Attempt, Report, ShardRecord
from ckpt.options import SaveOptions
from ckpt.progress import Meter, ProgressArg, summary
from ckpt.state import tree
from ckpt.state.shard import Shard, dtensor_layout, is_dtensor
from ckpt.storage import Root, Storage, open_storage, root_url
from ckpt.units import human_size

_log = logging.getLogger("ckpt.save")


@dataclass(frozen=True, slots=True)
class Held:
    """Who holds a plain tensor (sorted ranks) and what it is."""

    ranks: tuple[int, ...]
    dtype: str
    shape: tuple[int, ...]


PlainTensors = Literal["exclusive", "replicated"] | Mapping[str, Held]


def begin(
    root: Root,
    *,
    step: int,
    world_size: int = 1,
    options: SaveOptions | None = None,
    user_metadata: dict[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Attempt:
    """Start a save attempt (coordinator). Refuses a step that is already committed."""
    root = root_url(root)
    a = attempt_mod.new_attempt(root, step, world_size, options or SaveOptions(), user_metadata)
    _begin(_storage(a, storage_options), a)
    return a


def _storage(a: Attempt, storage_options: dict[str, Any] | None) -> Storage:
    """The storage of an attempt's root, with the attempt's write knobs and deadline."""
    return open_storage(
        a.root, storage_options, part_bytes=a.options.write_chunk_bytes, max_inflight_bytes=a.options.max_inflight_bytes,
        io_timeout_s=a.options.io_timeout_s,
    )  # fmt: skip


def _begin(storage: Storage, a: Attempt, *, check_step: bool = True) -> None:
    """May we commit here (the probe), no links, and (``check_step``) the step is free."""
    step = a.step
    steps.ensure_committable(storage, allow_non_atomic=a.options.allow_non_atomic_commit, switch="SaveOptions")
    rel = layout.manifest_path(step)
    # a linked steps/ or data/ is refused here, before any writer writes (Storage.check_no_links)
    storage.check_no_links(rel)
    storage.check_no_links(layout.shard_path(step, a.attempt, 0, 0))
    if check_step and storage.exists(rel):
        raise _taken(storage, step)
    _log.info("%s: step %d: attempt %s begins (%d writer%s)", storage.url, step, a.attempt, a.world_size,
              "" if a.world_size == 1 else "s")  # fmt: skip


def _taken(storage: Storage, step: int) -> CheckpointExistsError:
    return CheckpointExistsError(f"{storage.url}: step {step} is already committed")


def write_shards(
    attempt: Attempt,
    state: object,
    *,
    rank: int = 0,
    plain_tensors: PlainTensors = "exclusive",
    storage_options: dict[str, Any] | None = None,
    progress: ProgressArg = None,
) -> Report:
    """Write this writer's share of ``state`` as safetensors shard files; return its report.

    Args:
        rank: this writer's rank in ``[0, attempt.world_size)``. For DTensors it must be the
            global rank of the device mesh.
        plain_tensors: ``"exclusive"``: plain tensors are this rank's own (a pipeline stage's
            layers); two ranks saving the same key fail the commit. ``"replicated"``: every rank
            holds identical copies of every plain tensor (DDP): each is written once, by an owner
            all ranks compute alike, balanced by bytes. A mapping ``key -> ranks`` (from
            :func:`holders` over every rank's :func:`describe`) says exactly who holds each plain
            tensor: keys several ranks hold are replicas, written once. ``ckpt.Shard`` and DTensor
            leaves carry their own replica information.
        progress: a callable given a ``ckpt.Progress`` as this writer's bytes are written, or
            True for a tqdm bar (``ckpt.progress``).
    """
    if type(rank) is not int or not 0 <= rank < attempt.world_size:
        raise PlanError(f"rank {rank!r} is outside [0, {attempt.world_size})")
    if not isinstance(plain_tensors, Mapping) and plain_tensors not in ("exclusive", "replicated"):
        raise PlanError(f"plain_tensors must be 'exclusive', 'replicated' or a key -> ranks mapping, got {plain_tensors!r}")
    storage = _storage(attempt, storage_options)
    meter = Meter("save", progress, step=attempt.step, retries=lambda: storage.retries)
    try:
        report = _write_shards(storage, attempt, state, rank=rank, plain_tensors=plain_tensors, meter=meter)
        meter.phase("done")
    finally:
        meter.close()
    return report


def _write_shards(
    storage: Storage, attempt: Attempt, state: object, *, rank: int, plain_tensors: PlainTensors, meter: Meter | None = None
) -> Report:
    flat = state if isinstance(state, tree.Flat) else tree.flatten(state)  # a Flat: a staged snapshot
    opts = attempt.options
    everyone = tuple(range(attempt.world_size))
    regions: list[owners.Region] = []
    local: dict[str, tuple[torch.Tensor, tuple[int, ...], tuple[int, ...], str]] = {}
    for key, leaf in flat.tensors.items():
        if isinstance(leaf, Shard):
            t, offs, gshape = leaf.tensor, leaf.offsets, leaf.global_shape
            holders = leaf.replica_ranks or (rank,)
            if rank not in holders:
                raise PlanError(f"key {key!r}: rank {rank} holds a Shard whose replica_ranks {list(holders)} exclude it")
            dt = dtypes.from_torch(t.dtype, key=key)
            regions.append(owners.Region(key, offs, tuple(t.shape), dt.itemsize, holders, False))
        elif is_dtensor(leaf):
            lay = dtensor_layout(leaf, key)
            t, offs, gshape = lay.local, lay.offsets, lay.global_shape
            dt = dtypes.from_torch(t.dtype, key=key)
            regions.extend(owners.Region(key, o, sz, dt.itemsize, h, True) for o, sz, h in lay.regions)
        else:
            t, gshape = leaf, tuple(leaf.shape)
            offs = (0,) * t.ndim
            dt = dtypes.from_torch(t.dtype, key=key)
            if isinstance(plain_tensors, Mapping):
                held = plain_tensors.get(key)
                if held is None or rank not in held.ranks or (held.dtype, held.shape) != (dt.code, gshape):
                    raise PlanError(f"key {key!r}: rank {rank} holds {dt.code} {list(gshape)}, the holders map says {held}")
            else:
                shared = plain_tensors == "replicated"
                regions.append(owners.Region(key, offs, gshape, dt.itemsize, everyone if shared else (rank,), shared))
        local[key] = (t, offs, gshape, dt.code)
    if isinstance(plain_tensors, Mapping):  # every rank enumerates every plain tensor alike
        for key, held in plain_tensors.items():
            size = dtypes.from_code(held.dtype, where=f"key {key!r}").itemsize
            regions.append(owners.Region(key, (0,) * len(held.shape), held.shape, size, held.ranks, True))
    tensors: dict[str, torch.Tensor] = {}
    items: list[save_plan.WriteItem] = []
    for piece in owners.assign(regions, split_bytes=opts.split_bytes):
        if piece.owner != rank or piece.key not in local:
            continue
        t, offs, gshape, code = local[piece.key]
        if math.prod(piece.sizes) == 0 and math.prod(gshape) != 0:
            continue  # an empty region of a non-empty tensor carries nothing
        tensors[piece.key] = _to_host(_slice(t, offs, piece.offsets, piece.sizes))
        items.append(save_plan.WriteItem(piece.key, code, gshape, piece.offsets, piece.sizes))
    plan = save_plan.plan_save(
        items,
        step=attempt.step,
        attempt=attempt.attempt,
        rank=rank,
        max_file_bytes=opts.max_file_bytes,
        parallel_files=opts.parallel_files,
        min_file_bytes=opts.min_file_bytes,
    )
    nbytes = sum(fp.size for fp in plan.files)
    if meter is not None:
        meter.phase("write", bytes_total=nbytes, files_total=len(plan.files))
    t0 = time.perf_counter()
    written = executor.write_files(
        storage, plan.files, tensors, block_bytes=opts.block_bytes, num_threads=opts.num_threads, fsync=opts.fsync,
        meter=meter,
    )  # fmt: skip
    if opts.fsync and plan.files:
        dirs = [layout.data_dir(attempt.step, attempt.attempt), "data", ""]
        storage.sync_dirs(dirs)
    _log.info("%s: step %d: rank %d wrote %d files: %s", storage.url, attempt.step, rank, len(written),
              summary(nbytes, time.perf_counter() - t0, storage.retries))  # fmt: skip
    shards: list[ShardRecord] = []
    for fp, wf in zip(plan.files, written, strict=True):
        for item, br in fp.items:
            shards.append(
                {
                    "key": item.key, "dtype": item.dtype, "shape": list(item.global_shape),
                    "offsets": list(item.offsets), "sizes": list(item.sizes), "file": fp.path,
                    "byte_range": [br.start, br.end], "crc32c": list(wf.block_crcs[item.key]),
                }
            )  # fmt: skip
    return {
        "step": attempt.step,
        "attempt": attempt.attempt,
        "rank": rank,
        "files": {wf.path: {"size": wf.size, "crc32c": wf.crc32c} for wf in written},
        "shards": shards,
        "keys": {k: {"dtype": v[3], "shape": list(v[2])} for k, v in local.items()},
        "objects": flat.objects,
        "tree": flat.tree,
    }


def describe(state: object) -> dict[str, list[Any]]:
    """This rank's plain tensors as ``key -> [dtype code, shape]``: the small, JSON-able record
    a coordinator gathers from every rank to learn who holds which tensor."""
    flat = state if isinstance(state, tree.Flat) else tree.flatten(state)
    return {
        k: [dtypes.from_torch(t.dtype, key=k).code, list(t.shape)]
        for k, t in flat.tensors.items()
        if isinstance(t, torch.Tensor) and not is_dtensor(t)
    }


def holders(descriptions: Sequence[dict[str, list[Any]]]) -> dict[str, Held]:
    """``key -> ranks holding it`` from every rank's :func:`describe` (index = rank). Ranks that
    hold the same key must agree on its dtype and shape; they are then replicas of it."""
    out: dict[str, list[int]] = {}
    seen: dict[str, tuple[int, list[Any]]] = {}
    for rank, desc in enumerate(descriptions):
        for key, info in desc.items():
            if key in seen and seen[key][1] != info:
                first, other = seen[key]
                raise PlanError(
                    f"key {key!r}: rank {first} holds {other[0]} {other[1]}, rank {rank} holds "
                    f"{info[0]} {info[1]}; ranks saving one key must hold identical replicas"
                )
            seen.setdefault(key, (rank, info))
            out.setdefault(key, []).append(rank)
    return {k: Held(tuple(v), seen[k][1][0], tuple(seen[k][1][1])) for k, v in out.items()}


def _slice(t: torch.Tensor, local_offsets: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
    """The part of local tensor ``t`` (which starts at ``local_offsets``) that is ``offsets``/``sizes``."""
    if tuple(t.shape) == sizes:
        return t
    for d, (lo, o, n) in enumerate(zip(local_offsets, offsets, sizes, strict=True)):
        t = t.narrow(d, o - lo, n)
    return t


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()


def commit(
    attempt: Attempt, reports: list[Report], *, storage_options: dict[str, Any] | None = None
) -> Manifest:
    """Validate the reports of every writer and write the manifest create-only (coordinator)."""
    return _commit(_storage(attempt, storage_options), attempt, reports)


def _commit(storage: Storage, attempt: Attempt, reports: list[Report], *, stat_files: bool = True) -> Manifest:
    """Build, check and publish the manifest. ``stat_files=False``: the caller wrote every file
    through ``storage`` itself and the backend confirmed each write's size
    (``Storage.write_confirms_size``), so the stats would only repeat what it knows."""
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    m = commit_mod.build_manifest(attempt, reports, created=created)
    opts = attempt.options
    if stat_files:
        commit_mod.check_files(storage, m, num_threads=opts.num_threads)
    commit_mod.publish(storage, m, fsync=opts.fsync, update_latest=opts.update_latest)
    _log.info("%s: step %d committed: %d tensors, %d files, %s from %d writer%s", storage.url, m.step,
              len(m.tensors), len(m.files), human_size(m.total_bytes), attempt.world_size,
              "" if attempt.world_size == 1 else "s")  # fmt: skip
    return m


def save(
    root: Root,
    state: object,
    *,
    step: int,
    options: SaveOptions | None = None,
    user_metadata: dict[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressArg = None,
) -> Manifest:
    """Save ``state`` as checkpoint ``step`` from one process. Raises CheckpointExistsError if
    ``step`` is already committed. ``progress``: a callable given a ``ckpt.Progress`` as the bytes
    are written (phases "write", "commit", "done"), or True for a tqdm bar (``ckpt.progress``).

    Round trips (docs/s3.md, "Requests of a save and a restore"): the early "is the step
    free?" check runs while the data is written (a refused save deletes what it wrote), and
    files whose writes the backend confirmed are not stat-checked again before the commit."""
    root = root_url(root)
    a = attempt_mod.new_attempt(root, step, 1, options or SaveOptions(), user_metadata)
    storage = _storage(a, storage_options)  # one storage for the whole save
    meter = Meter("save", progress, step=step, retries=lambda: storage.retries)
    # The collector is paused for a save made on the main thread (not for the manager's background
    # saves: the training loop runs beside them), as for a restore (ckpt._collector).
    try:
        with collector.paused(threading.current_thread() is threading.main_thread()):
            _begin(storage, a, check_step=False)
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-step-check") as pool:
                taken = pool.submit(storage.exists, layout.manifest_path(step))
                report = _write_shards(storage, a, state, rank=0, plain_tensors="exclusive", meter=meter)
                if taken.result():
                    _discard(storage, a, report)
                    raise _taken(storage, step)
            meter.phase("commit")
            m = _commit(storage, a, [report], stat_files=not storage.write_confirms_size)
            del report  # freed before the collector is on again
            meter.phase("done")
    finally:
        meter.close()
    return m


def _discard(storage: Storage, a: Attempt, report: Report) -> None:
    """Delete the files of a refused save (best effort: what stays is garbage for gc)."""
    with contextlib.suppress(Exception):
        for path in report["files"]:
            storage.delete(path)
        storage.remove_empty_dir(layout.data_dir(a.step, a.attempt))
