"""Restore orchestration: find a step, read its manifest, plan, read, assemble.

``restore`` gives back the saved structure with the same container and leaf types. A ``target``
that mirrors the state selects what to read (keys missing from it are not read) and supplies
tensors to fill in place; its dicts and lists then hold the saved non-tensor values too
(:func:`assign`). ``restore_newest`` walks back over damaged steps (``fallback``), written once
for one process and for several ranks that must all land on the same step.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch

from ckpt import _collector as collector
from ckpt.engine import executor
from ckpt.engine.restore_plan import Request, RestorePlan, plan_restore
from ckpt.errors import (
    CheckpointNotFoundError,
    CkptWarning,
    CorruptCheckpointError,
    ManifestError,
    ManifestSchemaError,
    MissingShardError,
    NoIntactCheckpointError,
    ShardSizeMismatchError,
    TargetMismatchError,
    WorkerFailedError,
)
from ckpt.format import dtypes, skeleton
from ckpt.format.layout import manifest_path
from ckpt.format.manifest import Manifest
from ckpt.geometry import boxes as regions
from ckpt.lifecycle.steps import newest_step, read_step, resolve_step
from ckpt.options import RestoreOptions
from ckpt.progress import Meter, ProgressArg, summary
from ckpt.state import tree
from ckpt.state.shard import Shard, dtensor_layout, is_dtensor
from ckpt.storage import Root, Storage, open_storage, root_url


def restore(
    root: Root,
    step: int | None = None,
    *,
    target: object = None,
    options: RestoreOptions | None = None,
    storage_options: dict[str, Any] | None = None,
    fallback: bool = False,
    progress: ProgressArg = None,
) -> Any:
    """Restore checkpoint ``step`` (default: the latest) under ``root``.

    Args:
        step: the step to restore. An explicit step never falls back: if it is damaged, the
            error is raised.
        target: None for everything; or a structure mirroring the saved state whose tensor
            leaves are filled in place, whose ``None`` leaves are read whole, and whose missing
            keys are not read. After the restore, the target's dicts and lists also hold the
            saved non-tensor values (a learning rate, an epoch counter: see :func:`assign`), as
            with ``CheckpointManager.restore``.
        fallback: with ``step=None``, walk back from the newest committed step to the newest one
            that passes every check this restore makes (manifest, file sizes, checksums, no links),
            with a CkptWarning naming each step skipped and why; NoIntactCheckpointError if none
            does. Without it, damaged data of the newest step is raised. Either way a newest
            manifest that does not validate is skipped with a warning: it is not a checkpoint.
        progress: a callable given a ``ckpt.Progress`` as the bytes are read and checked, or
            True for a tqdm bar (``ckpt.progress``).

    Returns:
        The restored structure (the target's tensors are the same objects, now filled).
    """
    root = root_url(root)
    opts = options or RestoreOptions()
    t0 = time.perf_counter()
    storage = open_storage(root, storage_options, io_timeout_s=opts.io_timeout_s)
    meter = Meter("restore", progress, retries=lambda: storage.retries)
    try:
        with collector.paused():  # the manifest and all the restore makes of it (ckpt._collector)
            if step is None and fallback:
                found = restore_newest(storage, target, opts, fallback=True, meter=meter)
                if found is None:
                    raise CheckpointNotFoundError(f"{storage.url}: no committed checkpoint")
                out = found.state
            else:
                m = resolve_step(storage, step, lazy=True)
                out = restore_manifest(storage, m, target=target, options=opts, meter=meter)
                del m  # freed before the collector is on again
            meter.phase("done")
    finally:
        meter.close()
    assign(target, out)
    seconds = time.perf_counter() - t0
    _log.info("%s: restored step %s from %d files: %s", storage.url, meter.step, meter.files_done,
              summary(meter.bytes_done, seconds, storage.retries))  # fmt: skip
    return out


_log = logging.getLogger("ckpt.restore")

# The outcome of one rank's try at a step, combined over ranks by the maximum.
_OK, _DAMAGED, _FAILED = 0, 1, 2
DAMAGE = (ManifestError, CorruptCheckpointError)  # the step is damaged (not the caller's problem)


@dataclass(frozen=True, slots=True)
class Found:
    """What :func:`restore_newest` restored."""

    step: int
    state: Any  # the restored structure, not yet assign()-ed into the target
    skipped: tuple[int, ...] = ()  # newer steps skipped as damaged, newest first


def restore_newest(
    storage: Storage,
    target: object,
    options: RestoreOptions,
    *,
    fallback: bool,
    pick: Callable[[int | None], int | None] | None = None,
    agree: Callable[[int], int] | None = None,
    meter: Meter | None = None,
    restore_step: Callable[[int], Any] | None = None,
) -> Found | None:
    """Restore the newest committed step; with ``fallback``, the newest that passes every check
    of the restore (DAMAGE errors), skipping damaged ones with a CkptWarning. None when nothing
    is committed.

    Several ranks: ``pick(below)`` gives every rank the same candidate (rank 0's newest valid
    step before ``below``) and ``agree(code)`` the worst outcome over the ranks, so that all
    ranks restore one step or all move on together; a rank whose error is not damage (a storage
    failure, a target that does not match) stops every rank. One process: both are local.
    ``restore_step(step)``: how a step is restored (default: read its manifest and its data
    here; the manager's ranks share the reads, ``ckpt.parallel.torchrun.restore_shared``).
    """
    pick = pick or (lambda below: newest_step(storage, below=below))
    agree = agree or (lambda code: code)
    below: int | None = None
    skipped: list[str] = []
    skipped_steps: list[int] = []
    while (step := pick(below)) is not None:
        restored: Any = None
        err: Exception | None = None
        try:
            if restore_step is not None:
                restored = restore_step(step)
            else:
                with collector.paused():  # the manifest and all the restore makes of it (ckpt._collector)
                    m = read_step(storage, step, lazy=True)
                    restored = restore_manifest(storage, m, target=target, options=options, meter=meter)
                    del m  # freed before the collector is on again
        except Exception as e:
            err = e
        code = _OK if err is None else _DAMAGED if isinstance(err, DAMAGE) else _FAILED
        worst = agree(code)
        if worst == _OK:
            return Found(step, restored, tuple(skipped_steps))
        if err is not None and (code == _FAILED or not fallback):
            raise err
        if worst == _FAILED or not fallback:
            raise WorkerFailedError(f"{storage.url}: another rank failed to restore step {step} (its error names why)")
        why = f"{type(err).__name__}: {err}" if err is not None else "damaged data found by another rank"
        warnings.warn(f"{storage.url}: skipping damaged step {step}, falling back to an older one: {why}",
                      CkptWarning, stacklevel=3)  # fmt: skip
        skipped.append(f"step {step} ({why})")
        skipped_steps.append(step)
        below = step
    if skipped:
        raise NoIntactCheckpointError(f"{storage.url}: no intact checkpoint; skipped {'; '.join(skipped)}")
    return None


def assign(target: object, restored: object) -> None:
    """Copy the restored non-tensor values into ``target``'s dicts and lists, recursively
    (tensors and arrays were filled in place already). The rule of ``restore(target=)`` and
    ``CheckpointManager.restore``: a dict's or list's values are replaced by the saved ones (a
    list of another length takes the saved items whole); a tuple, or any other container that
    cannot be assigned into, is left as it is (the returned structure holds the saved values)."""
    if isinstance(target, dict) and isinstance(restored, dict):
        for k, v in restored.items():
            cur = target.get(k)
            if isinstance(cur, dict | list) and type(cur) is type(v):
                assign(cur, v)
            elif cur is not v and not isinstance(cur, torch.Tensor | np.ndarray):
                target[k] = v
    elif isinstance(target, list) and isinstance(restored, list):
        if len(target) != len(restored):  # a plain list saved as one value: take it whole
            target[:] = restored
            return
        for i, v in enumerate(restored):
            cur = target[i]
            if isinstance(cur, dict | list) and type(cur) is type(v):
                assign(cur, v)
            elif cur is not v and not isinstance(cur, torch.Tensor | np.ndarray):
                target[i] = v


class PlanRunner(Protocol):
    """Runs a restore plan in place of :func:`ckpt.engine.executor.read_plan` (the shared restore
    of several ranks, ``ckpt.parallel.torchrun.restore``: each byte fetched by one rank)."""

    def __call__(self, storage: Storage, plan: RestorePlan, dests: list[memoryview], options: RestoreOptions) -> None: ...


def restore_manifest(
    storage: Storage, m: Manifest, *, target: object, options: RestoreOptions, meter: Meter | None = None,
    runner: PlanRunner | None = None,
) -> Any:
    if meter is not None:
        meter.step = m.step
    sel = tree.Selection()
    where = storage.where(manifest_path(m.step))
    check = partial(skeleton.check_node, where=where) if m.partial else None  # a v2 tree read in part
    tree.walk(m.tree, target, "", sel, check=check)
    m.entries(sel.tensor_keys)  # validated together (a v2 manifest: only the pages that hold them)
    # Check every target region, shape and dtype before allocating anything.
    wanted = {key: _destination(key, m, sel.destinations.get(key)) for key in sel.tensor_keys}
    # in place where the target's tensor can take the bytes; else allocated after the size check
    finals = {key: t for key, (_, t) in wanted.items() if t is not None}
    direct = [t if t is not None and t.device.type == "cpu" and t.is_contiguous() else None for _, t in wanted.values()]
    got = read_regions(storage, m, [Request(k, box) for k, (box, _) in wanted.items()], direct, options, meter=meter,
                       runner=runner)  # fmt: skip
    bufs = dict(zip(wanted, got, strict=True))
    for key, t in finals.items():
        if bufs[key] is not t:
            t.copy_(bufs[key])

    def build(kind: str, key: str, leaf: object) -> object:
        if kind == "object":
            if key not in m.objects:  # only a tree read in part was not checked against the objects
                raise ManifestSchemaError(f"{where}: the tree references object {key[:200]!r}, which is missing")
            return tree.decode_value(m.objects[key], f"{where}: object {key[:200]!r}")
        if leaf is not None:
            return leaf
        return bufs[key].numpy() if kind == "ndarray" else bufs[key]

    return tree.walk(m.tree, target, "", sel, build)  # the same nodes as the first walk, which checked them


def read_regions(
    storage: Storage,
    m: Manifest,
    requests: list[Request],
    dests: list[torch.Tensor | None],
    options: RestoreOptions,
    *,
    sizes_checked: bool = False,
    meter: Meter | None = None,
    runner: PlanRunner | None = None,
) -> list[torch.Tensor]:
    """The regions ``requests`` ask for (a key may be asked for several times), read with one
    plan of verified ranged reads into ``dests[i]`` (a contiguous CPU tensor of the saved dtype,
    shaped like the box), or into a tensor allocated for a None; the files' sizes are checked
    before anything is allocated or read (``sizes_checked``: the caller did, for every key it
    will ask for, once). Returns the filled tensors.

    Where every destination is given (nothing is allocated, so a manifest claiming more bytes
    than its files hold cannot make this allocate them) and the backend learns a file's size
    from each read's reply (``Storage.sizes_on_reads``: S3), the reads check the sizes instead
    of a stat per file first: one round trip less before the data moves. A mismatch or missing
    file found there is then reported as the stats would have (naming the keys)."""
    keys = list(dict.fromkeys(r.key for r in requests))
    in_reads = not sizes_checked and runner is None and storage.sizes_on_reads and all(d is not None for d in dests)
    # Stat the files of the requested tensors before planning: a plan is as big as the bytes
    # the manifest claims, so a lying manifest (a 4 TiB tensor over a small file) stops here.
    if not sizes_checked and not in_reads:
        _check_sizes(storage, m, keys, options.num_threads)
    out = [
        d if d is not None else torch.empty(r.box.sizes, dtype=dtypes.BY_CODE[m.tensors[r.key].dtype].torch_dtype)
        for r, d in zip(requests, dests, strict=True)
    ]
    plan = plan_restore(
        m,
        requests,
        verify=options.verify,
        max_gap_bytes=options.gap_bytes(local=storage.local_disk),
        read_chunk_bytes=options.chunk_bytes(local=storage.local_disk),
    )
    if runner is not None:
        runner(storage, plan, [executor.byte_view(d) for d in out], options)
        return out
    if meter is not None:  # totals on top of what an earlier (fallen back from) step read
        paths = {op.path for op in plan.reads}
        meter.phase("read", bytes_total=meter.bytes_done + sum(op.range.length for op in plan.reads),
                    files_total=meter.files_done + len(paths))  # fmt: skip
    try:
        executor.read_plan(
            storage,
            plan,
            [executor.byte_view(d) for d in out],
            num_threads=options.num_threads,
            max_inflight_bytes=options.max_inflight_bytes,
            meter=meter,
            file_sizes={p: m.files[p].size for p in plan.files} if in_reads else None,
        )
    except (MissingShardError, ShardSizeMismatchError):
        if in_reads:  # the stats name the keys a missing or resized file holds
            _check_sizes(storage, m, keys, options.num_threads)
        raise
    return out


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


def _check_sizes(storage: Storage, m: Manifest, keys: list[str], num_threads: int) -> None:
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

    executor.run_all(check, sorted(users), num_threads=num_threads, timeout_s=storage.io_timeout_s,
                     what=lambda p: f"{storage.where(p)}: stat")  # fmt: skip
