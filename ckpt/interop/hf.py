"""Export a checkpoint in the Hugging Face layout: :func:`export_hf`.

Writes ``model-0000i-of-0000n.safetensors`` files and ``model.safetensors.index.json``
(``{"metadata": {"total_size": N}, "weight_map": {name: file}}``, ``total_size`` being the
tensors' bytes) to a destination directory or URL. Sharded tensors are consolidated into
whole ones (each read through ckpt's verified restore path); tensors are grouped into files
in state order, a new file starting when the next tensor would take the file past
``max_shard_bytes`` (counting the header; a tensor bigger than the limit gets a file of its
own). One tensor is in memory at a time. Files are written create-only through
:class:`~ckpt.storage.Storage`, the index last (a directory without it is an unfinished export).

Only tensors are exported: non-tensor state (``objects``: counters, schedulers' plain data,
RNG states that are not tensors) is skipped, and listed in the result's ``skipped_objects``.

Names: the ckpt key (``model/layers.0.weight`` for ``state["model"]["layers.0.weight"]``).
``prefix`` keeps only keys starting with it, ``strip_prefix`` removes it, ``rename=(old, new)``
then replaces a leading ``old`` with ``new``, and ``separator`` (e.g. ``"."``) finally replaces
the ``/`` between key segments (unescaping ``~1`` and ``~0``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ckpt.engine import executor
from ckpt.errors import PlanError, StorageError
from ckpt.format import dtypes, strictjson
from ckpt.format import safetensors as safetensors_format
from ckpt.interop import _read as interop
from ckpt.lifecycle.steps import resolve_step
from ckpt.options import RestoreOptions
from ckpt.state import tree
from ckpt.storage import Root, open_storage, root_url
from ckpt.units import parse_size

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB", as transformers' save_pretrained
_METADATA = {"format": "pt"}
_MAX_OFFSET = 10**20  # wider than any data_offsets value: header estimates are upper bounds


@dataclass(frozen=True, slots=True)
class HfExport:
    """What :func:`export_hf` wrote."""

    step: int
    files: tuple[str, ...]  # file names under dst, in order
    weight_map: dict[str, str]  # tensor name -> file name
    total_size: int  # bytes of tensor data
    skipped_objects: tuple[str, ...]  # keys of non-tensor state not exported
    seconds: float


def export_hf(
    root: Root,
    dst: Root,
    step: int | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    prefix: str | None = None,
    strip_prefix: bool = False,
    rename: tuple[str, str] | None = None,
    separator: str | None = None,
    options: RestoreOptions | None = None,
    fsync: bool = True,
) -> HfExport:
    """Write checkpoint ``step`` (default: the latest) under ``root`` to ``dst`` in the Hugging
    Face sharded safetensors layout (see the module docstring for names and limits).

    ``max_shard_bytes`` takes bytes or a size string read by :func:`ckpt.units.parse_size`
    (``"5GB"`` = 5*10**9, ``"2GiB"`` = 2*2**30).
    Raises StorageError if ``dst`` already holds an index or one of the files (nothing is
    overwritten) and PlanError if no tensor is selected or two keys map to one name.
    """
    root = root_url(root)
    dst = root_url(dst, "dst")
    start = time.perf_counter()
    limit = parse_size(max_shard_bytes)
    if strip_prefix and not prefix:
        raise PlanError("strip_prefix needs a prefix")
    opts = options or RestoreOptions()
    storage = open_storage(root, storage_options)
    m = resolve_step(storage, step)
    out = open_storage(dst, dst_storage_options)
    if out.exists(INDEX_NAME):
        raise StorageError(f"{out.where(INDEX_NAME)}: already exists; an export never overwrites")
    keys = [k for k in interop.tensor_keys_in_order(m.tree) if prefix is None or k.startswith(prefix)]
    if not keys:
        raise PlanError(f"{storage.url}: step {m.step} has no tensor" + (f" whose key starts with {prefix!r}" if prefix else ""))
    names: dict[str, str] = {}  # name -> key
    for k in keys:
        name = _name(k, prefix if strip_prefix else None, rename, separator)
        if not name or name == "__metadata__":
            raise PlanError(f"key {k!r} would be exported as the tensor name {name!r}, which safetensors cannot hold")
        if name in names:
            raise PlanError(f"keys {names[name]!r} and {k!r} would both be exported as {name!r}")
        names[name] = k
    interop.check_sizes(storage, m, keys, opts)
    groups = _group([(n, m.tensors[k].dtype, m.tensors[k].shape) for n, k in names.items()], limit)
    files = tuple(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups)))
    weight_map: dict[str, str] = {}
    for fname, items in zip(files, groups, strict=True):
        header = safetensors_format.encode(items, _METADATA)
        head = safetensors_format.header_bytes(header)

        def chunks(head: bytes = head, header: safetensors_format.Header = header) -> Iterator[memoryview | bytes]:
            yield head
            for e in header.entries:
                t = interop.read_box(storage, m, names[e.name], None, opts)
                if t.numel():
                    yield executor.byte_view(t)
                del t

        out.write_file(fname, chunks(), size=header.file_size, fsync=fsync)
        weight_map.update(dict.fromkeys((n for n, _, _ in items), fname))
    total = sum(m.tensors[k].nbytes for k in keys)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    if fsync:
        out.sync_dirs([""])
    if not out.put_if_absent(INDEX_NAME, (json.dumps(index, indent=2, ensure_ascii=False) + "\n").encode(), fsync=fsync):
        raise StorageError(f"{out.where(INDEX_NAME)}: created by someone else during the export")
    skipped = tuple(k for kind, k in _leaves(m.tree) if kind == "object")
    return HfExport(m.step, files, weight_map, total, skipped, time.perf_counter() - start)


def _name(key: str, strip: str | None, rename: tuple[str, str] | None, separator: str | None) -> str:
    name = key[len(strip) :] if strip else key
    if rename is not None and name.startswith(rename[0]):
        name = rename[1] + name[len(rename[0]) :]
    if separator is not None:
        name = separator.join(s.replace("~1", "/").replace("~0", "~") for s in name.split("/"))
    return name


def _entry_bytes(name: str, dtype: str, shape: tuple[int, ...]) -> int:
    """An upper bound on the bytes one tensor adds to a header."""
    e = {name: {"dtype": dtype, "shape": list(shape), "data_offsets": [_MAX_OFFSET, _MAX_OFFSET]}}
    return len(strictjson.dumps(e))  # includes the braces: covers the separating comma


def _group(items: list[tuple[str, str, tuple[int, ...]]], limit: int) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    """Consecutive groups of tensors whose files (prefix, header, padding, data) fit ``limit``;
    a tensor that does not fit alone gets a group of its own."""
    base = 8 + len(strictjson.dumps({"__metadata__": _METADATA})) + 7
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = base
    for name, dtype, shape in items:
        n = _entry_bytes(name, dtype, shape) + math.prod(shape) * dtypes.BY_CODE[dtype].itemsize
        if groups[-1] and size + n > limit:
            groups.append([])
            size = base
        groups[-1].append((name, dtype, shape))
        size += n
    return groups


def _leaves(node: Any) -> Iterator[tuple[str, str]]:
    kind, body = next(iter(node.items()))
    if kind in tree.LEAF_KINDS:
        yield kind, body
    for child in tree.child_nodes(node):
        yield from _leaves(child)


__all__ = ["DEFAULT_MAX_SHARD_BYTES", "INDEX_NAME", "HfExport", "export_hf"]
