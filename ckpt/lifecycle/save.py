"""Save orchestration: ``begin`` (coordinator), ``write_shards`` (each writer), ``commit``
(coordinator), and ``save`` for one process (all three in a row).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
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
from ckpt.engine import executor, owners, reuse, save_plan
from ckpt.errors import (
    BaseRetiredError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ManifestError,
    PlanError,
)
from ckpt.format import dtypes, layout
from ckpt.format.manifest import Manifest
from ckpt.lifecycle import attempt as attempt_mod
from ckpt.lifecycle import commit as commit_mod
from ckpt.lifecycle import steps
from ckpt.lifecycle.attempt import Attempt, FileRecord, Report, ShardRecord
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
    storage = _storage(a, storage_options)
    _begin(storage, a)
    return _with_base(a, _base(storage, a))


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


def _base(storage: Storage, a: Attempt) -> Manifest | None:
    """An incremental save's base: ``base_step``'s manifest, or the newest committed one before
    ``a.step`` (None: there is none, so everything is written). Read in part (its head, tree and
    checksums): the entries a writer compares with are read when it asks for them."""
    if not a.options.incremental:
        return None
    if a.options.base_step is not None:
        return steps.read_step(storage, a.options.base_step, lazy=True)
    return steps._latest(storage, below=a.step, lazy=True)


def _with_base(a: Attempt, base: Manifest | None) -> Attempt:
    return a if base is None else dataclasses.replace(a, base_step=base.step, base_attempt=base.attempt)


def _writer_base(storage: Storage, a: Attempt) -> Manifest | None:
    """The base a writer compares with: the step and attempt the coordinator chose, read once."""
    if a.base_step is None:
        return None
    try:
        m = steps.read_step(storage, a.base_step, lazy=True)
    except CheckpointNotFoundError:
        m = None
    if m is None or m.attempt != a.base_attempt:
        raise BaseRetiredError(
            f"{storage.url}: step {a.step}: the base step {a.base_step} (attempt {a.base_attempt}) of this "
            "incremental save was retired or replaced before this writer read it"
        )
    return m


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
        base = _writer_base(storage, attempt)
        report = _write_shards(storage, attempt, state, rank=rank, plain_tensors=plain_tensors, meter=meter, base=base)
        meter.phase("done")
    finally:
        meter.close()
    return report


def _write_shards(
    storage: Storage, attempt: Attempt, state: object, *, rank: int, plain_tensors: PlainTensors, meter: Meter | None = None,
    base: Manifest | None = None, sync_later: bool = False,
) -> Report:
    """This writer's files written and their report. ``sync_later``: the files are not yet
    durable on return (the caller runs :func:`_make_durable` before it commits)."""
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
    decisions = _decide(items, tensors, base, opts) if opts.incremental else None
    to_write = items if decisions is None else [i for i, d in zip(items, decisions, strict=True) if d.reuse is None]
    plan = save_plan.plan_save(
        to_write,
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
    hash_keys = frozenset(i.key for i, d in zip(items, decisions or (), strict=False) if d.reuse is None and d.hash_on_write)
    written = executor.write_files(
        storage, plan.files, tensors, block_bytes=opts.block_bytes, num_threads=opts.num_threads,
        fsync=opts.fsync and not sync_later, meter=meter, hash_keys=hash_keys,
    )  # fmt: skip
    if opts.fsync and plan.files and not sync_later:
        storage.sync_dirs(_data_dirs(attempt))
    _log.info("%s: step %d: rank %d wrote %d files: %s", storage.url, attempt.step, rank, len(written),
              summary(nbytes, time.perf_counter() - t0, storage.retries))  # fmt: skip
    known = {} if decisions is None else {i.key: d.hash for i, d in zip(items, decisions, strict=True) if d.hash}
    shards: list[ShardRecord] = []
    for fp, wf in zip(plan.files, written, strict=True):
        for item, br in fp.items:
            shards.append(
                {
                    "key": item.key, "dtype": item.dtype, "shape": list(item.global_shape),
                    "offsets": list(item.offsets), "sizes": list(item.sizes), "file": fp.path,
                    "byte_range": [br.start, br.end], "crc32c": list(wf.block_crcs[item.key]),
                    "hash": wf.hashes.get(item.key, known.get(item.key)),
                }
            )  # fmt: skip
    files: dict[str, FileRecord] = {wf.path: {"size": wf.size, "crc32c": wf.crc32c} for wf in written}
    for item, d in zip(items, decisions or (), strict=False):
        if d.reuse is None:
            continue
        r = d.reuse
        shards.append(
            {
                "key": item.key, "dtype": item.dtype, "shape": list(item.global_shape), "offsets": list(item.offsets),
                "sizes": list(item.sizes), "file": r.file, "byte_range": [r.start, r.end], "crc32c": list(r.crc32c),
                "hash": r.hash,
            }
        )  # fmt: skip
        if r.file not in files:
            assert base is not None
            f = base.files[r.file]
            files[r.file] = {"size": f.size, "crc32c": f.crc32c}
    if decisions is not None:
        reused = sum(i.nbytes for i, d in zip(items, decisions, strict=True) if d.reuse is not None)
        _log.info("%s: step %d: rank %d reused %s of the base step %s, wrote %s", storage.url, attempt.step, rank,
                  human_size(reused), attempt.base_step, human_size(nbytes))  # fmt: skip
    return {
        "step": attempt.step,
        "attempt": attempt.attempt,
        "rank": rank,
        "files": files,
        "shards": shards,
        "keys": {k: {"dtype": v[3], "shape": list(v[2])} for k, v in local.items()},
        "objects": flat.objects,
        "tree": flat.tree,
    }


def _data_dirs(a: Attempt) -> list[str]:
    """The directories a writer's new files are entries of (the attempt's, its parents)."""
    return [layout.data_dir(a.step, a.attempt), "data", ""]


def _make_durable(storage: Storage, a: Attempt, report: Report) -> None:
    """The files ``report`` says this writer wrote (``_write_shards(sync_later=True)``) and
    their directories made to survive a crash."""
    if not a.options.fsync:
        return
    own = layout.data_dir(a.step, a.attempt) + "/"
    paths = sorted(p for p in report["files"] if p.startswith(own))
    if paths:
        executor.sync_files(storage, paths, num_threads=a.options.num_threads)
        storage.sync_dirs(_data_dirs(a))


def _decide(
    items: list[save_plan.WriteItem], tensors: dict[str, torch.Tensor], base: Manifest | None, opts: SaveOptions
) -> list[reuse.Decision]:
    """Each item's incremental decision against ``base`` (``ckpt.engine.reuse``): the base's
    entries of these keys are read (only their pages), nothing of its data."""
    if base is None:
        return [reuse.Decision(None, hash_on_write=True) for _ in items]
    entries = base.entries([i.key for i in items if i.key in base.tensors])
    same = base.block_bytes == opts.block_bytes
    bases = [reuse.match(i, entries.get(i.key), same_blocks=same) for i in items]
    views = {i: executor.byte_view(tensors[it.key]) for i, it in enumerate(items) if bases[i] is not None}

    def first_crc(i: int) -> int:
        return reuse.first_block_crc(views[i], opts.block_bytes)

    def full(indices: Sequence[int]) -> dict[int, str]:
        return reuse.hash_all({i: views[i] for i in indices}, num_threads=opts.num_threads)

    return reuse.decide(items, bases, first_crc, full)


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


def _commit(
    storage: Storage, attempt: Attempt, reports: list[Report], *, stat_files: bool = True,
    durable: concurrent.futures.Future[None] | None = None,
) -> Manifest:
    """Build, check and publish the manifest. ``stat_files=False``: the caller wrote every file
    through ``storage`` itself and the backend confirmed each write's size
    (``Storage.write_confirms_size``), so the stats would only repeat what it knows.
    ``durable``: the flushes of the files, running while the manifest is built; the manifest is
    published only once they succeeded."""
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    m = commit_mod.build_manifest(attempt, reports, created=created)
    if durable is not None:
        durable.result()
    opts = attempt.options
    own = layout.data_dir(attempt.step, attempt.attempt) + "/"
    foreign = sorted(p for p in m.files if not p.startswith(own)) if attempt.base_step is not None else []
    if foreign:  # the base's files an incremental save references are stat-checked in any case
        try:
            commit_mod.check_files(storage, m, num_threads=opts.num_threads, paths=foreign)
        except CorruptCheckpointError as err:
            raise BaseRetiredError(
                f"{storage.url}: step {attempt.step}: a file of the base step {attempt.base_step} that this "
                f"incremental save references is gone or changed (the base was retired?): {err}"
            ) from err
    if stat_files:
        commit_mod.check_files(storage, m, num_threads=opts.num_threads, paths=sorted(set(m.files) - set(foreign)))
    commit_mod.publish(storage, m, fsync=opts.fsync, update_latest=opts.update_latest)
    if attempt.base_step is not None:
        _check_base_kept(storage, attempt, m)
    _log.info("%s: step %d committed: %d tensors, %d files, %s from %d writer%s", storage.url, m.step,
              len(m.tensors), len(m.files), human_size(m.total_bytes), attempt.world_size,
              "" if attempt.world_size == 1 else "s")  # fmt: skip
    return m


def _check_base_kept(storage: Storage, a: Attempt, m: Manifest) -> None:
    """After an incremental commit: the base manifest must still be there, by the same attempt.

    Retirement deletes a manifest before it scans which files the remaining manifests reference
    (``ckpt.lifecycle.cleanup``). So if the base is still there now, any retirement that deletes it
    later scans after our commit and sees our references; if it is gone, a retirement may have
    scanned before our commit and may delete the bytes we reference: the save is withdrawn (our
    manifest deleted again) and BaseRetiredError raised."""
    try:
        kept = steps.read_head(storage, a.base_step).attempt == a.base_attempt  # type: ignore[arg-type]
    except (CheckpointNotFoundError, ManifestError):
        kept = False
    if kept:
        return
    _log.warning("%s: step %d: the base step %s was retired during the incremental save; withdrawing it",
                 storage.url, a.step, a.base_step)  # fmt: skip
    storage.delete(layout.manifest_path(a.step))
    own = layout.data_dir(a.step, a.attempt) + "/"
    with contextlib.suppress(Exception):
        for path in m.files:
            if path.startswith(own):
                storage.delete(path)
        storage.remove_empty_dir(layout.data_dir(a.step, a.attempt))
    raise BaseRetiredError(
        f"{storage.url}: step {a.step}: the base step {a.base_step} (attempt {a.base_attempt}) was retired "
        "while this incremental save ran; the save was withdrawn"
    )


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
            try:
                m = _save_once(storage, a, state, meter, with_base=True)
            except BaseRetiredError as err:  # the base went away mid-save: write everything
                _log.warning("%s; saving step %d in full", err, step)
                a = attempt_mod.new_attempt(root, step, 1, a.options, user_metadata)
                m = _save_once(storage, a, state, meter, with_base=False)
            meter.phase("done")
    finally:
        meter.close()
    return m


def _save_once(storage: Storage, a: Attempt, state: object, meter: Meter, *, with_base: bool) -> Manifest:
    step = a.step
    _begin(storage, a, check_step=False)
    base = _base(storage, a) if with_base else None
    a = _with_base(a, base)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-save") as pool:
        taken = pool.submit(storage.exists, layout.manifest_path(step))
        report = _write_shards(storage, a, state, rank=0, plain_tensors="exclusive", meter=meter, base=base,
                               sync_later=True)  # fmt: skip
        if taken.result():
            _discard(storage, a, report)
            raise _taken(storage, step)
        del base
        meter.phase("commit")
        # the files are flushed while the manifest is built (an fsync waits with the GIL released)
        durable = pool.submit(_make_durable, storage, a, report)
        try:
            m = _commit(storage, a, [report], stat_files=not storage.write_confirms_size, durable=durable)
        finally:
            concurrent.futures.wait([durable])
    del report  # freed before the collector is on again
    return m


def _discard(storage: Storage, a: Attempt, report: Report) -> None:
    """Delete the files of a refused save (best effort: what stays is garbage for gc)."""
    with contextlib.suppress(Exception):
        for path in report["files"]:
            storage.delete(path)
        storage.remove_empty_dir(layout.data_dir(a.step, a.attempt))
