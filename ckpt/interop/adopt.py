"""Adopt existing safetensors files as a checkpoint: :func:`adopt`.

Writes a ckpt manifest over a directory (or URL) of safetensors files, e.g. a Hugging Face
export (``model.safetensors.index.json`` + shards) or a single ``model.safetensors``, without
copying or changing them, so the model can be restored (whole or sharded, with ranged reads)
and verified like any checkpoint.

- The files: those the index's ``weight_map`` names if ``model.safetensors.index.json`` is
  there (every tensor must be in the file the index says), else every ``*.safetensors`` file
  directly under the root. Paths must satisfy the manifest path grammar and must not be under
  ``data/`` or ``steps/`` (ckpt's own namespaces).
- Each file's header is read with two ranged reads (the 8-byte length, then the header) and
  fully validated (typed ``HeaderError``/``NotSafetensorsError`` naming the file).
- CRC-32C values are mandatory in a manifest (docs/FORMAT.md 6), so each file is then read
  once, sequentially (streamed in ``read_bytes`` pieces, never copied or held), to compute its
  whole-file CRC and the per-block CRCs of every tensor.
- Every tensor becomes one whole-tensor shard named by its safetensors name; the tree is a
  flat dict ``{name: tensor}`` (restore gives ``{name: tensor}``). ``user_metadata`` gets
  ``ckpt.adopted = "1"``.
- The manifest is committed create-only at ``steps/<step>/manifest.json``, like any save.

Adopted files are not ckpt's: retirement (``ckpt rm``, retention) and garbage collection only
ever delete files under ``data/``, so they never delete adopted files.
"""

from __future__ import annotations

import datetime
import posixpath
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import crc32c

from ckpt import _concurrency
from ckpt.errors import CheckpointExistsError, HeaderError, PlanError, StorageError
from ckpt.format import layout, strictjson
from ckpt.format import manifest as manifest_mod
from ckpt.format import safetensors as safetensors_format
from ckpt.format.manifest import FileEntry, Manifest, ShardEntry, TensorEntry
from ckpt.geometry.byte_ranges import ByteRange
from ckpt.lifecycle import commit as commit_protocol
from ckpt.lifecycle import steps
from ckpt.storage import Root, Storage, open_storage, root_url

INDEX_NAME = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20
MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class _Scanned:
    path: str
    size: int
    crc32c: int
    header: safetensors_format.Header
    block_crcs: dict[str, tuple[int, ...]]


def adopt(
    root: Root,
    *,
    step: int = 0,
    storage_options: dict[str, Any] | None = None,
    user_metadata: dict[str, str] | None = None,
    block_bytes: int = 1 * MiB,
    read_bytes: int = 8 * MiB,
    num_threads: int = 8,
    fsync: bool = True,
    update_latest: bool = True,
) -> Manifest:
    """Commit checkpoint ``step`` under ``root`` over the safetensors files already there (see
    the module docstring). Returns the committed manifest. Raises CheckpointExistsError if the
    step is committed already, PlanError if there is nothing to adopt."""
    root = root_url(root)
    if not 0 <= step <= 999_999_999_999:
        raise PlanError(f"step {step} is outside [0, 999999999999]")
    if block_bytes < 1 or read_bytes < 1:
        raise ValueError("block_bytes and read_bytes must be positive")
    storage = open_storage(root, storage_options)
    steps.ensure_committable(storage, allow_non_atomic=False, switch=None)
    rel = layout.manifest_path(step)
    if storage.exists(rel):
        raise CheckpointExistsError(f"{storage.url}: step {step} is already committed")
    index = _read_index(storage)
    paths = sorted(set(index.values())) if index is not None else _listed(storage)
    if not paths:
        raise PlanError(f"{storage.url}: no *.safetensors file to adopt")
    for p in paths:
        manifest_mod.check_path(p, where=f"{storage.url}: adopted file")
        if p.split("/")[0] in ("data", "steps"):
            raise PlanError(f"{storage.where(p)}: adopted files must not be under data/ or steps/ (ckpt's own)")
    scanned: dict[str, _Scanned] = {}
    lock = threading.Lock()

    def scan(p: str) -> None:
        s = _scan(storage, p, block_bytes, read_bytes)
        with lock:
            scanned[p] = s

    _concurrency.run_all(scan, paths, num_threads=num_threads)
    tensors: dict[str, TensorEntry] = {}
    where_is: dict[str, str] = {}
    for p in paths:
        s = scanned[p]
        for e in sorted(s.header.entries, key=lambda e: e.begin):
            if e.name in where_is:
                raise HeaderError(f"{storage.where(p)}: tensor {e.name!r} is also in {storage.where(where_is[e.name])}")
            if index is not None and index.get(e.name) != p:
                raise HeaderError(
                    f"{storage.where(p)}: holds tensor {e.name!r}, which {INDEX_NAME} places in {index.get(e.name)!r}"
                )
            where_is[e.name] = p
            br = ByteRange(s.header.data_start + e.begin, s.header.data_start + e.end)
            shard = ShardEntry(p, (0,) * len(e.shape), e.shape, br, s.block_crcs[e.name])
            tensors[e.name] = TensorEntry.of(e.dtype, e.shape, [shard])
    if index is not None:
        absent = sorted(set(index) - set(where_is))
        if absent:
            raise HeaderError(f"{storage.where(INDEX_NAME)}: names tensors no file holds: {absent[:5]}")
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    m = Manifest(
        step=step,
        attempt=uuid.uuid4().hex[:16],
        created=created,
        world_size=1,
        block_bytes=block_bytes,
        files={p: FileEntry(scanned[p].size, scanned[p].crc32c) for p in paths},
        tensors=tensors,
        objects={},
        tree={"dict": [[name, {"tensor": name}] for name in tensors]},
        user_metadata=dict(sorted({**(user_metadata or {}), "ckpt.adopted": "1"}.items())),
    )
    m = manifest_mod.parse(m.to_json(), where=storage.where(rel), expected_step=step)
    commit_protocol.publish(storage, m, fsync=fsync, update_latest=update_latest)
    return m


def _read_index(storage: Storage) -> dict[str, str] | None:
    if not storage.exists(INDEX_NAME):
        return None
    where = storage.where(INDEX_NAME)
    size = storage.size(INDEX_NAME)
    if size > MAX_INDEX_BYTES:
        raise PlanError(f"{where}: {size} bytes is over the {MAX_INDEX_BYTES}-byte cap for an index")
    doc = strictjson.loads(storage.read(INDEX_NAME), what=where, error=PlanError, max_bytes=MAX_INDEX_BYTES)
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise PlanError(f"{where}: expected an object with a weight_map of tensor name -> file name")
    return {k: posixpath.normpath(v) if v.startswith("./") else v for k, v in wm.items()}


def _listed(storage: Storage) -> list[str]:
    return sorted(
        f.path for f in storage.list_files()
        if "/" not in f.path and f.path.endswith(".safetensors") and not f.path.startswith(".")
    )  # fmt: skip


def _scan(storage: Storage, path: str, block_bytes: int, read_bytes: int) -> _Scanned:
    """Validate ``path``'s header (two ranged reads), then stream the file once for its CRCs."""
    where = storage.where(path)
    size = storage.size(path)
    prefix = bytearray(min(8, size))
    storage.read_into(path, 0, [memoryview(prefix)])
    n = safetensors_format.header_length(bytes(prefix), file_size=size, where=where)
    head = bytearray(8 + n)
    storage.read_into(path, 0, [memoryview(head)])
    header = safetensors_format.parse(bytes(head), file_size=size, where=where)
    blocks: list[tuple[int, int, str]] = []  # absolute [start, end) of every block, in file order
    for e in sorted(header.entries, key=lambda e: e.begin):
        s, end = header.data_start + e.begin, header.data_start + e.end
        blocks.extend((b, min(b + block_bytes, end), e.name) for b in range(s, end, block_bytes))
    crcs: dict[str, list[int]] = {e.name: [] for e in header.entries}
    buf = memoryview(bytearray(min(read_bytes, max(size, 1))))
    file_crc, acc, bi, pos = 0, 0, 0, 0
    while pos < size:
        n_read = min(len(buf), size - pos)
        view = buf[:n_read]
        storage.read_into(path, pos, [view])
        file_crc = crc32c.crc32c(view, value=file_crc)
        end = pos + n_read
        while bi < len(blocks) and blocks[bi][0] < end:
            b0, b1, name = blocks[bi]
            acc = crc32c.crc32c(view[max(b0, pos) - pos : min(b1, end) - pos], value=acc)
            if b1 > end:
                break
            crcs[name].append(acc)
            acc, bi = 0, bi + 1
        pos = end
    if bi != len(blocks):  # pragma: no cover - the header parser ties the tensors to the size
        raise StorageError(f"{where}: the file ended before its tensors")
    return _Scanned(path, size, file_crc, header, {k: tuple(v) for k, v in crcs.items()})


__all__ = ["adopt"]
