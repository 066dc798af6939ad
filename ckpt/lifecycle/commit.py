"""The commit: validate what the writers report, then write the manifest create-only.

``build_manifest`` is pure: it checks that every report belongs to the attempt, that every rank
reported once, that writers agree on each tensor's dtype and shape, and that each tensor's
regions are covered exactly once, naming keys and ranks; then it runs the manifest parser over
the result, so a committed manifest always passes the same validation a reader applies.
``publish`` is the commit point (docs/FORMAT.md section 9).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckpt._concurrency import run_all
from ckpt.errors import (
    CheckpointExistsError,
    CkptWarning,
    MissingShardError,
    PlanError,
    ShardSizeMismatchError,
    StorageError,
)
from ckpt.format import manifest as manifest_mod
from ckpt.format import strictjson
from ckpt.format._manifest_pages import PAGED_FROM
from ckpt.format.layout import LATEST, manifest_path
from ckpt.format.manifest import I64, FileEntry, Manifest, ShardTable, TensorEntry
from ckpt.geometry.coverage import coverage_problem
from ckpt.lifecycle.attempt import Attempt, Report
from ckpt.state import tree
from ckpt.storage import Storage


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
    for rank in sorted(by_rank):
        for path, f in by_rank[rank]["files"].items():
            files[path] = FileEntry(f["size"], f["crc32c"])
    paths = tuple(files)
    file_index = {p: i for i, p in enumerate(paths)}
    ranks = sorted(by_rank)
    columns = _uniform_columns(ranks, by_rank, file_index)
    if columns is None:
        columns = _columns(ranks, by_rank, file_index)
    block_bytes = attempt.options.block_bytes
    tensors = {key: c.entry(key) for key, c in columns.items()}
    incremental = attempt.options.incremental
    if incremental:  # each shard's content hash, in the columns' order (rank, then report order)
        hashes: dict[str, list[str | None]] = {}
        for rank in ranks:
            for rec in by_rank[rank]["shards"]:
                hashes.setdefault(rec["key"], []).append(rec.get("hash"))
        tensors = {k: dataclasses.replace(t, shards=dataclasses.replace(t.shards, hashes=tuple(hashes[k])))
                   for k, t in tensors.items()}  # fmt: skip
    skeleton, objects = _merge_trees(by_rank)
    m = Manifest(
        step=attempt.step,
        attempt=attempt.attempt,
        created=created,
        world_size=attempt.world_size,
        block_bytes=block_bytes,
        files=files,
        tensors=tensors,
        objects=objects,
        tree=skeleton,
        user_metadata=dict(attempt.user_metadata),
        format_version=3 if incremental else 2 if _paged(attempt.options.paged_manifest, len(tensors)) else 1,
        content_hash=manifest_mod.CONTENT_HASH if incremental else None,
    )
    return manifest_mod.validated(m, where=f"{attempt.root}: manifest of step {attempt.step}")


def _paged(choice: bool | None, num_tensors: int) -> bool:
    return choice if choice is not None else num_tensors >= PAGED_FROM


_FIELDS = operator.itemgetter("key", "dtype", "shape", "file", "offsets", "sizes", "byte_range", "crc32c")


@dataclass(frozen=True, slots=True)
class _Columns:
    """One tensor's shards as the writers reported them, in rank order: the manifest's shard
    table, and the rank that wrote each shard."""

    dtype: str
    shape: tuple[int, ...]
    ranks: list[int]  # of each shard
    shards: ShardTable
    whole: bool = False  # one shard, known (by a whole-column check) to be the whole tensor

    def entry(self, key: str) -> TensorEntry:
        """The tensor entry, once every region is known to be written exactly once (the
        manifest parser's coverage check, with the writers' ranks in the message)."""
        if self.whole:
            return TensorEntry(self.dtype, self.shape, self.shards)
        shape, offsets, sizes = self.shape, self.shards.offsets, self.shards.sizes
        shp = np.array(shape, dtype=np.int64)
        outside = np.flatnonzero(np.any((offsets < 0) | (sizes < 0) | (sizes > shp) | (offsets > shp - sizes), axis=1))
        if outside.size:
            i = int(outside[0])
            raise PlanError(
                f"key {key!r}: rank {self.ranks[i]} wrote the region at {offsets[i].tolist()} of size "
                f"{sizes[i].tolist()}, outside the shape {list(shape)}"
            )
        problem = coverage_problem(shape, offsets, sizes)
        if problem is not None and problem.kind == "overlap":
            ra, rb = self.ranks[problem.a], self.ranks[problem.b]
            raise PlanError(
                f"key {key!r}: rank {ra} and rank {rb} both wrote the region at {offsets[problem.b].tolist()}; "
                "each region must be written exactly once"
            )
        if problem is not None and problem.kind == "gap":
            raise PlanError(
                f"key {key!r}: ranks {sorted(set(self.ranks))} wrote {problem.covered} of "
                f"{problem.total} elements; some region was written by no rank"
            )
        if problem is not None:
            raise PlanError(f"key {key!r}: {problem.describe(lambda i: f'rank {self.ranks[i]}')}")
        return TensorEntry(self.dtype, shape, self.shards)


def _crc_start(counts: I64) -> I64:
    """``ShardTable.crc_start`` from the number of crc32c values of each shard."""
    out: I64 = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return out


def _ints(values: list[Any], what: str) -> I64:
    """Reported integers as an int64 array (a writer bug must not be truncated into a manifest)."""
    if not set(map(type, values)) <= {int}:
        bad = next(v for v in values if type(v) is not int)
        raise PlanError(f"a writer reported {what} {strictjson.show(bad, 40)}, not an integer")
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        raise PlanError(f"a writer reported {what} outside the 64-bit range") from None


def _columns(ranks: list[int], by_rank: dict[int, Report], file_index: dict[str, int]) -> dict[str, _Columns]:
    """The columns of every tensor from any reports (one Python step per shard)."""
    acc: dict[str, tuple[str, list[int], list[list[Any]]]] = {}
    for rank in ranks:
        for key, dtype, shape, path, offsets, sizes, byte_range, crcs in map(_FIELDS, by_rank[rank]["shards"]):
            a = acc.get(key)
            if a is None:
                a = acc[key] = (dtype, list(shape), [[] for _ in range(7)])
            elif a[0] != dtype or (a[1] != shape and a[1] != list(shape)):
                first = a[2][0][0]
                raise PlanError(f"key {key!r}: rank {first} has {a[0]} {a[1]}, rank {rank} has {dtype} {list(shape)}")
            c = a[2]
            c[0].append(rank)
            c[1].append(file_index[path])
            c[2] += offsets
            c[3] += sizes
            c[4] += byte_range
            c[5] += crcs
            c[6].append(len(crcs))
    paths = tuple(file_index)  # file_index lists the paths in order
    out: dict[str, _Columns] = {}
    for key, (dtype, shape, c) in acc.items():
        n, nd = len(c[0]), len(shape)
        if (len(c[2]), len(c[3]), len(c[4])) != (n * nd, n * nd, 2 * n):
            raise PlanError(f"key {key!r}: the writers reported offsets, sizes or byte ranges of the wrong length for a {nd}-d tensor")
        table = ShardTable(
            paths, np.array(c[1], dtype=np.int64),
            _ints(c[2], f"key {key!r}: an offset").reshape(n, nd), _ints(c[3], f"key {key!r}: a size").reshape(n, nd),
            _ints(c[4], f"key {key!r}: a byte range").reshape(n, 2), _ints(c[5], f"key {key!r}: a crc32c"),
            _crc_start(np.array(c[6], dtype=np.int64)),
        )  # fmt: skip
        out[key] = _Columns(dtype, tuple(shape), c[0], table)
    return out


def _uniform_columns(ranks: list[int], by_rank: dict[int, Report], file_index: dict[str, int]) -> dict[str, _Columns] | None:
    """The columns of every tensor when every rank reported one shard of the same keys in the same
    order with the same dtypes and shapes (SPMD writers, the common case at scale): whole-array
    operations, no Python step per shard. None if the reports are not like that."""
    rows = [tuple(zip(*map(_FIELDS, by_rank[r]["shards"]), strict=True)) for r in ranks]
    if not rows or any(len(row) != 8 for row in rows):
        return None  # some rank reported no shard
    keys, dts, shapes = rows[0][0], rows[0][1], rows[0][2]
    nd = [len(shape) for shape in shapes]
    if len(set(keys)) != len(keys) or any(row[0] != keys or row[1] != dts or row[2] != shapes for row in rows[1:]):
        return None
    if any(list(map(len, row[4])) != nd or list(map(len, row[5])) != nd or set(map(len, row[6])) != {2} for row in rows):
        return None
    n_ranks, n_keys, width = len(ranks), len(keys), sum(nd)
    chain = itertools.chain.from_iterable
    file = np.array([list(map(file_index.__getitem__, row[3])) for row in rows], dtype=np.int64)  # (R, T)
    offsets = _ints(list(chain(chain(row[4]) for row in rows)), "an offset").reshape(n_ranks, width)
    sizes = _ints(list(chain(chain(row[5]) for row in rows)), "a size").reshape(n_ranks, width)
    byte_range = _ints(list(chain(chain(row[6]) for row in rows)), "a byte range").reshape(n_ranks, n_keys, 2)
    crc = _ints(list(chain(chain(row[7]) for row in rows)), "a crc32c")  # rank-major
    counts = np.array([list(map(len, row[7])) for row in rows], dtype=np.int64)  # (R, T)
    # regroup the crc32c values tensor-major (tensor, then rank) with one gather
    starts = (np.cumsum(counts.ravel()) - counts.ravel()).reshape(n_ranks, n_keys).T.ravel()
    lengths = counts.T.ravel()
    tm_at = np.cumsum(lengths) - lengths
    crc = crc[np.repeat(starts - tm_at, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)]
    per_key = np.concatenate([[0], np.cumsum(counts.sum(axis=0))]).astype(np.int64).tolist()
    dim_at_a = np.concatenate([[0], np.cumsum(nd)]).astype(np.int64)
    dim_at = dim_at_a.tolist()
    crc_starts = np.zeros((n_keys, n_ranks + 1), dtype=np.int64)  # row t: tensor t's crc_start
    np.cumsum(counts.T, axis=1, out=crc_starts[:, 1:])
    whole = _whole(offsets, sizes, shapes, dim_at_a) if n_ranks == 1 else [False] * n_keys
    paths = tuple(file_index)  # file_index lists the paths in order
    out: dict[str, _Columns] = {}
    for t, key in enumerate(keys):
        a, b = dim_at[t], dim_at[t + 1]
        table = ShardTable(
            paths, file[:, t], offsets[:, a:b], sizes[:, a:b], byte_range[:, t],
            crc[per_key[t] : per_key[t + 1]], crc_starts[t],
        )  # fmt: skip
        out[key] = _Columns(dts[t], tuple(shapes[t]), ranks, table, whole[t])
    return out


def _whole(offsets: I64, sizes: I64, shapes: Sequence[Sequence[int]], dim_at: I64) -> list[bool]:
    """For one writer's shards (one per tensor; ``offsets``/``sizes`` of shape ``(1, dims)``):
    whether each is its whole tensor (offsets 0, sizes the shape), in whole-column operations."""
    shape = np.fromiter(itertools.chain.from_iterable(shapes), dtype=np.int64, count=int(dim_at[-1]))
    bad = np.concatenate([[0], np.cumsum((offsets[0] != 0) | (sizes[0] != shape))])
    out: list[bool] = (bad[dim_at[1:]] == bad[dim_at[:-1]]).tolist()
    return out


def _merge_trees(by_rank: dict[int, Report]) -> tuple[Any, dict[str, Any]]:
    """One skeleton for the checkpoint: the union of every writer's, lower ranks winning where
    two writers save the same non-tensor value (so per-rank values need per-rank keys)."""
    skeleton = by_rank[0]["tree"]
    seen = strictjson.dumps(skeleton)
    for rank in sorted(by_rank)[1:]:
        other = by_rank[rank]["tree"]
        if other == skeleton and strictjson.dumps(other) == seen:
            continue  # the same skeleton (SPMD writers): merging would change nothing
        try:
            skeleton = tree.merge(skeleton, other)
        except ValueError as err:
            raise PlanError(f"rank {rank}'s state does not fit rank 0's structure: {err}") from None
        seen = strictjson.dumps(skeleton)
    objects: dict[str, Any] = {}
    for kind, key in tree.references(skeleton):
        if kind == "object":
            objects[key] = next(by_rank[r]["objects"][key] for r in sorted(by_rank) if key in by_rank[r]["objects"])
    return skeleton, objects


def check_files(storage: Storage, m: Manifest, *, num_threads: int, paths: Sequence[str] | None = None) -> None:
    """Every file the manifest names (or those of ``paths``) exists with the reported size (one
    stat each)."""

    def check(path: str) -> None:
        try:
            size = storage.size(path)
        except MissingShardError as err:
            raise MissingShardError(f"{storage.where(path)}: reported by a writer but not found") from err
        if size != m.files[path].size:
            raise ShardSizeMismatchError(
                f"{storage.where(path)}: {size} bytes on storage, the writer reported {m.files[path].size}"
            )

    run_all(check, sorted(m.files) if paths is None else paths, num_threads=num_threads, timeout_s=storage.io_timeout_s,
            what=lambda p: f"{storage.where(p)}: stat")  # fmt: skip


def publish(storage: Storage, m: Manifest, *, fsync: bool, update_latest: bool) -> None:
    """THE commit point: create the manifest only if absent. A lost-response retry that finds
    our own attempt there counts as success; anyone else's is CheckpointExistsError.

    A manifest write that does not answer within the storage's deadline raises
    StorageTimeoutError: the outcome is then unknown (the abandoned write may still land and
    commit the step)."""
    rel = manifest_path(m.step)
    data = m.to_json()
    where = storage.where(rel)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-latest") as pool:
        # the hint is read while the manifest is written (one round trip, not two); it is
        # only acted on once the commit has succeeded
        hint = pool.submit(_read_hint, storage) if update_latest else None
        if not storage.put_if_absent(rel, data, fsync=fsync):
            blob = storage.read(rel)
            existing = manifest_mod.parse(blob, where=where, expected_step=m.step)
            if existing.attempt != m.attempt:
                raise CheckpointExistsError(
                    f"{storage.url}: step {m.step} was committed by attempt {existing.attempt} "
                    f"(ours: {m.attempt}); our data is garbage for gc"
                )
        if hint is not None:
            try:
                _update_latest(storage, m.step, hint.result(), fsync=fsync)
            except StorageError as err:  # the step is committed; LATEST is only a hint (FORMAT 9.4)
                warnings.warn(f"step {m.step} is committed, but the LATEST hint was not updated: {err}", CkptWarning, stacklevel=3)


def _read_hint(storage: Storage) -> int | None:
    """The step LATEST names, or None (missing, damaged, unreadable)."""
    try:
        blob = storage.read(LATEST)
        current = strictjson.loads(blob, what=LATEST, error=ValueError, max_bytes=4096)
    except (ValueError, OSError):
        return None
    hinted = current.get("step") if isinstance(current, dict) else None
    return hinted if type(hinted) is int else None


def _update_latest(storage: Storage, step: int, hinted: int | None, *, fsync: bool) -> None:
    """LATEST is a hint for humans and other tools; ckpt itself always lists ``steps/``. It is
    rewritten unless it names ``step`` or a newer committed step already (``hinted``: what it
    named when read)."""
    try:
        if hinted is not None and (hinted == step or (hinted > step and storage.exists(manifest_path(hinted)))):
            return  # a newer committed step is named already
    except OSError:
        pass  # the named step cannot be checked: rewrite it
    hint = strictjson.dumps({"step": step})
    storage.put(LATEST, hint, fsync=fsync)
