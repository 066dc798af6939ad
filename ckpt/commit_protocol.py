"""The commit: validate what the writers report, then write the manifest create-only.

``build_manifest`` is pure: it checks that every report belongs to the attempt, that every rank
reported once, that writers agree on each tensor's dtype and shape, and that each tensor's
regions are covered exactly once, naming keys and ranks; then it runs the manifest parser over
the result, so a committed manifest always passes the same validation a reader applies.
``publish`` is the commit point (DESIGN section 4).
"""

from __future__ import annotations

import math
from typing import Any

from ckpt import manifest as manifest_mod
from ckpt import regions, strictjson, tree
from ckpt.attempt import Attempt, Report
from ckpt.errors import CheckpointExistsError, MissingShardError, PlanError, ShardSizeMismatchError
from ckpt.executor import run_all
from ckpt.manifest import FileEntry, Manifest, ShardEntry, TensorEntry
from ckpt.ranges import ByteRange
from ckpt.storage import Storage

LATEST = "LATEST"


def manifest_path(step: int) -> str:
    return f"steps/{step:012d}/manifest.json"


def build_manifest(attempt: Attempt, reports: list[Report], *, created: str) -> Manifest:
    """Merge and validate the writers' reports into a manifest. Pure (no I/O)."""
    by_rank: dict[int, Report] = {}
    for r in reports:
        if r.get("step") != attempt.step or r.get("attempt") != attempt.attempt:
            raise PlanError(
                f"a report of rank {r.get('rank')!r} is for step {r.get('step')!r} attempt "
                f"{r.get('attempt')!r}, not step {attempt.step} attempt {attempt.attempt}"
            )
        rank = r["rank"]
        if rank in by_rank:
            raise PlanError(f"rank {rank} reported twice")
        by_rank[rank] = r
    missing = sorted(set(range(attempt.world_size)) - by_rank.keys())
    if missing:
        raise PlanError(f"no report from ranks {missing} (world_size {attempt.world_size}); nothing was committed")
    files: dict[str, FileEntry] = {}
    tensors: dict[str, dict[str, Any]] = {}
    owners: dict[str, list[tuple[int, ShardEntry]]] = {}
    for rank in sorted(by_rank):
        r = by_rank[rank]
        for path, f in r["files"].items():
            files[path] = FileEntry(f["size"], f["crc32c"])
        for s in r["shards"]:
            key = s["key"]
            info = tensors.setdefault(key, {"dtype": s["dtype"], "shape": tuple(s["shape"]), "rank": rank})
            if (info["dtype"], info["shape"]) != (s["dtype"], tuple(s["shape"])):
                raise PlanError(
                    f"key {key!r}: rank {info['rank']} has {info['dtype']} {list(info['shape'])}, "
                    f"rank {rank} has {s['dtype']} {list(s['shape'])}"
                )
            br = ByteRange(*s["byte_range"])
            entry = ShardEntry(s["file"], tuple(s["offsets"]), tuple(s["sizes"]), br, tuple(s["crc32c"]))
            owners.setdefault(key, []).append((rank, entry))
    for key, shards in owners.items():
        _check_exactly_once(key, tensors[key]["shape"], shards)
    skeleton, objects = _merge_trees(by_rank)
    m = Manifest(
        step=attempt.step,
        attempt=attempt.attempt,
        created=created,
        world_size=attempt.world_size,
        block_bytes=attempt.options.block_bytes,
        files=files,
        tensors={
            k: TensorEntry(tensors[k]["dtype"], tensors[k]["shape"], tuple(e for _, e in owners[k]))
            for k in owners
        },
        objects=objects,
        tree=skeleton,
        user_metadata=dict(attempt.user_metadata),
    )
    return manifest_mod.parse(m.to_json(), where=f"{attempt.root}: manifest of step {attempt.step}")


def _merge_trees(by_rank: dict[int, Report]) -> tuple[Any, dict[str, Any]]:
    """One skeleton for the checkpoint: the union of every writer's, lower ranks winning where
    two writers save the same non-tensor value (so per-rank values need per-rank keys)."""
    skeleton = by_rank[0]["tree"]
    for rank in sorted(by_rank)[1:]:
        try:
            skeleton = tree.merge(skeleton, by_rank[rank]["tree"])
        except ValueError as err:
            raise PlanError(f"rank {rank}'s state does not fit rank 0's structure: {err}") from None
    objects: dict[str, Any] = {}
    for kind, key in tree.references(skeleton):
        if kind == "object":
            objects[key] = next(by_rank[r]["objects"][key] for r in sorted(by_rank) if key in by_rank[r]["objects"])
    return skeleton, objects


def _check_exactly_once(key: str, shape: tuple[int, ...], shards: list[tuple[int, ShardEntry]]) -> None:
    for i, (ra, a) in enumerate(shards):
        for rb, b in shards[i + 1 :]:
            if a.box.numel and b.box.numel and regions.intersect(a.box, b.box) is not None:
                raise PlanError(
                    f"key {key!r}: rank {ra} and rank {rb} both wrote the region at {list(b.offsets)}; "
                    "each region must be written exactly once"
                )
    covered = sum(math.prod(s.sizes) for _, s in shards)
    if covered != math.prod(shape):
        raise PlanError(
            f"key {key!r}: ranks {sorted({r for r, _ in shards})} wrote {covered} of "
            f"{math.prod(shape)} elements; some region was written by no rank"
        )


def check_files(storage: Storage, m: Manifest, *, num_threads: int) -> None:
    """Every file the manifest names exists with the reported size (one stat each)."""

    def check(path: str) -> None:
        try:
            size = storage.size(path)
        except MissingShardError as err:
            raise MissingShardError(f"{storage.where(path)}: reported by a writer but not found") from err
        if size != m.files[path].size:
            raise ShardSizeMismatchError(
                f"{storage.where(path)}: {size} bytes on storage, the writer reported {m.files[path].size}"
            )

    run_all(check, sorted(m.files), num_threads=num_threads)


def publish(storage: Storage, m: Manifest, *, fsync: bool, update_latest: bool) -> None:
    """THE commit point: create the manifest only if absent. A lost-response retry that finds
    our own attempt there counts as success; anyone else's is CheckpointExistsError."""
    rel = manifest_path(m.step)
    if not storage.put_if_absent(rel, m.to_json(), fsync=fsync):
        existing = manifest_mod.parse(storage.read(rel), where=storage.where(rel), expected_step=m.step)
        if existing.attempt != m.attempt:
            raise CheckpointExistsError(
                f"{storage.url}: step {m.step} was committed by attempt {existing.attempt} "
                f"(ours: {m.attempt}); our data is garbage for gc"
            )
    if update_latest:
        _update_latest(storage, m.step, fsync=fsync)


def _update_latest(storage: Storage, step: int, *, fsync: bool) -> None:
    """LATEST is a hint for humans and other tools; ckpt itself always lists ``steps/``."""
    try:
        current = strictjson.loads(storage.read(LATEST), what=LATEST, error=ValueError, max_bytes=4096)
        if isinstance(current, dict) and type(current.get("step")) is int and current["step"] >= step:
            return
    except (ValueError, OSError):
        pass  # missing or damaged hint: rewrite it
    storage.put(LATEST, strictjson.dumps({"step": step}), fsync=fsync)
