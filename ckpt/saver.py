"""Save orchestration: ``begin`` (coordinator), ``write_shards`` (each writer), ``commit``
(coordinator), and ``save`` for one process (all three in a row).
"""

from __future__ import annotations

import datetime
from typing import Any

import torch

from ckpt import attempt as attempt_mod
from ckpt import commit_protocol as commit_mod
from ckpt import dtypes, executor, save_plan, tree
from ckpt.attempt import Attempt, Report
from ckpt.errors import CheckpointExistsError, PlanError
from ckpt.manifest import Manifest
from ckpt.options import SaveOptions
from ckpt.storage import Storage


def begin(
    root: str,
    *,
    step: int,
    world_size: int = 1,
    options: SaveOptions | None = None,
    user_metadata: dict[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Attempt:
    """Start a save attempt (coordinator). Refuses a step that is already committed."""
    a = attempt_mod.new_attempt(root, step, world_size, options or SaveOptions(), user_metadata)
    storage = Storage(root, storage_options)
    if not storage.atomic_create and not a.options.allow_non_atomic_commit:
        raise PlanError(
            f"{storage.url}: the {storage.protocol!r} backend has no create-only write ckpt trusts; "
            "concurrent commits could overwrite each other. Pass "
            "SaveOptions(allow_non_atomic_commit=True) if only one job ever writes this root."
        )
    if storage.exists(commit_mod.manifest_path(step)):
        raise CheckpointExistsError(f"{storage.url}: step {step} is already committed")
    return a


def write_shards(
    attempt: Attempt, state: object, *, rank: int = 0, storage_options: dict[str, Any] | None = None
) -> Report:
    """Write this writer's tensors as safetensors shard files; return its report (writer side)."""
    if type(rank) is not int or not 0 <= rank < attempt.world_size:
        raise PlanError(f"rank {rank!r} is outside [0, {attempt.world_size})")
    storage = Storage(attempt.root, storage_options)
    flat = tree.flatten(state)
    tensors = {k: _to_host(t) for k, t in flat.tensors.items()}
    items = [
        save_plan.WriteItem(k, dtypes.from_torch(t.dtype, key=k).code, tuple(t.shape), (0,) * t.ndim, tuple(t.shape))
        for k, t in tensors.items()
    ]
    opts = attempt.options
    plan = save_plan.plan_save(
        items, step=attempt.step, attempt=attempt.attempt, rank=rank, max_file_bytes=opts.max_file_bytes
    )
    written = executor.write_files(
        storage, plan.files, tensors, block_bytes=opts.block_bytes, num_threads=opts.num_threads, fsync=opts.fsync
    )
    if opts.fsync and plan.files:
        storage.sync_dirs([save_plan.data_dir(attempt.step, attempt.attempt), "data"])
    shards = []
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
        "objects": flat.objects,
        "tree": flat.tree,
    }


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()


def commit(
    attempt: Attempt, reports: list[Report], *, storage_options: dict[str, Any] | None = None
) -> Manifest:
    """Validate the reports of every writer and write the manifest create-only (coordinator)."""
    storage = Storage(attempt.root, storage_options)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    m = commit_mod.build_manifest(attempt, reports, created=created)
    commit_mod.check_files(storage, m, num_threads=attempt.options.num_threads)
    commit_mod.publish(storage, m, fsync=attempt.options.fsync, update_latest=attempt.options.update_latest)
    return m


def save(
    root: str,
    state: object,
    *,
    step: int,
    options: SaveOptions | None = None,
    user_metadata: dict[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Save ``state`` as checkpoint ``step`` from one process. Raises CheckpointExistsError if
    ``step`` is already committed."""
    a = begin(root, step=step, options=options, user_metadata=user_metadata, storage_options=storage_options)
    report = write_shards(a, state, rank=0, storage_options=storage_options)
    return commit(a, [report], storage_options=storage_options)
