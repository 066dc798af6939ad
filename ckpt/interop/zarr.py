"""Zarr v3 archives of checkpoints: :func:`export_zarr` and :func:`import_zarr`.

The only module that imports ``zarr`` (lazily, inside the functions: ``import ckpt`` works
without it). Zarr is for archives and interop, not the hot path (docs/CLI.md, "ckpt export").

Layout (docs/FORMAT.md, "Archives and interop"): one checkpoint is one Zarr v3 group at DST
itself. Each tensor is one chunked, zstd-compressed array, at ``tensors/<key>`` when the ckpt
key is a plain path (segments of ``[A-Za-z0-9_.-]``, not ``.``/``..``, not starting ``__``),
else at ``tensors_by_index/<i>``. The group attribute ``ckpt`` holds everything else as JSON:
the step, the user metadata, the non-tensor state (``objects``, tagged JSON values as in the
manifest), the container skeleton (``tree``) and, per tensor key, its array path, dtype code
and shape. Dtypes zarr lacks (BF16, F8_E4M3, F8_E5M2) are stored losslessly as the unsigned
integers of the same width holding their bit patterns; the array attribute ``ckpt`` records the
original dtype code and the stored type. A plain ``zarr.open_group`` reads everything.

Export reads each tensor through ckpt's verified restore path in slabs of whole chunk rows
(``slab_bytes``), so memory stays about one slab. Import writes through ckpt's normal save
path (``begin`` / ``write_shards`` / ``commit``): tensors are read in batches of at most
``batch_bytes``, each batch written as one writer rank of one save attempt (the manifest's
``world_size`` is the number of batches), so memory stays about one batch; the commit is the
normal create-only manifest write.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ckpt.errors import ManifestSchemaError, PlanError
from ckpt.format import dtypes
from ckpt.format.manifest import Manifest
from ckpt.geometry import boxes as regions
from ckpt.interop import _read as interop
from ckpt.lifecycle import save as saver
from ckpt.lifecycle.steps import resolve_step
from ckpt.options import RestoreOptions, SaveOptions
from ckpt.state import tree
from ckpt.storage import Root, open_storage, root_url

if TYPE_CHECKING:
    import zarr

ARCHIVE_FORMAT = "ckpt.zarr"
ARCHIVE_VERSION = 1
ATTR = "ckpt"  # the group's and each array's attribute holding ckpt's information
MiB = 1 << 20

# dtype code -> (numpy dtype zarr stores, whether these are the raw bits of another dtype)
STORED: dict[str, tuple[str, bool]] = {
    "BOOL": ("bool", False),
    "U8": ("uint8", False),
    "I8": ("int8", False),
    "F8_E5M2": ("uint8", True),
    "F8_E4M3": ("uint8", True),
    "I16": ("int16", False),
    "U16": ("uint16", False),
    "F16": ("float16", False),
    "BF16": ("uint16", True),
    "I32": ("int32", False),
    "U32": ("uint32", False),
    "F32": ("float32", False),
    "C64": ("complex64", False),
    "F64": ("float64", False),
    "I64": ("int64", False),
    "U64": ("uint64", False),
}
_BITS_TORCH = {1: torch.uint8, 2: torch.uint16}
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True, slots=True)
class ZarrExport:
    """What :func:`export_zarr` wrote."""

    step: int
    dst: str
    num_tensors: int
    tensor_bytes: int  # uncompressed bytes of all tensors
    seconds: float


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as err:  # pragma: no cover - zarr is an optional dependency
        raise ImportError("Zarr archives need the zarr package (>= 3): pip install 'zarr>=3'") from err
    return zarr


def _array_paths(keys: list[str]) -> dict[str, str]:
    """Each tensor key's array path in the group (see the module docstring)."""
    plain = {
        k for k in keys
        if k and all(_SEGMENT.fullmatch(s) and s not in (".", "..") and not s.startswith("__") for s in k.split("/"))
    }  # fmt: skip
    # a key that is a group of another key's path (``a`` and ``a/b``) cannot be an array
    prefixes = {"/".join(k.split("/")[:i]) for k in plain for i in range(1, k.count("/") + 1)}
    out = {}
    for i, k in enumerate(keys):
        out[k] = f"tensors/{k}" if k in plain and k not in prefixes else f"tensors_by_index/{i}"
    return out


def chunk_shape(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> tuple[int, ...]:
    """Chunks of about ``chunk_bytes``: whole trailing dimensions, a run of the first one that
    does not fit whole (row-major, so a chunk is contiguous in the tensor)."""
    target = max(1, chunk_bytes // itemsize)
    out = [max(1, n) for n in shape]
    for d in range(len(shape)):
        inner = math.prod(max(1, n) for n in shape[d + 1 :])
        if inner <= target:
            out[d] = max(1, min(max(1, shape[d]), target // inner))
            break
        out[d] = 1
    return tuple(out)


def _to_numpy(t: torch.Tensor, code: str) -> np.ndarray:
    if STORED[code][1]:
        t = t.view(_BITS_TORCH[dtypes.BY_CODE[code].itemsize])
    return t.numpy()


def export_zarr(
    root: Root,
    dst: Root,
    step: int | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    level: int = 3,
    chunk_bytes: int = 4 * MiB,
    slab_bytes: int = 64 * MiB,
    options: RestoreOptions | None = None,
) -> ZarrExport:
    """Write checkpoint ``step`` (default: the latest) under ``root`` as a Zarr v3 group at
    ``dst`` (a path or fsspec URL; it must not hold a Zarr node yet).

    Args:
        level: zstd compression level.
        chunk_bytes: the target size of one (uncompressed) chunk.
        slab_bytes: tensors are read and written in slabs of whole chunk rows of about this size.
    """
    root = root_url(root)
    dst = root_url(dst, "dst")
    zarr = _zarr()
    from zarr.codecs import ZstdCodec

    start = time.perf_counter()
    opts = options or RestoreOptions()
    storage = open_storage(root, storage_options)
    m = resolve_step(storage, step)
    keys = list(interop.tensor_keys_in_order(m.tree))
    interop.check_sizes(storage, m, keys, opts)
    paths = _array_paths(keys)
    group = zarr.open_group(dst, mode="w-", zarr_format=3, **_store_kw(dst, dst_storage_options))
    total = 0
    for key in keys:
        entry = m.tensors[key]
        dt = dtypes.BY_CODE[entry.dtype]
        stored, bits = STORED[entry.dtype]
        chunks = chunk_shape(entry.shape, dt.itemsize, chunk_bytes)
        arr = group.create_array(
            paths[key],
            shape=entry.shape,
            chunks=chunks,
            dtype=stored,
            compressors=ZstdCodec(level=level, checksum=True),
            fill_value=False if stored == "bool" else 0,
            attributes={ATTR: {"key": key, "dtype": entry.dtype, "stored_as": stored, "bits": bits}},
            # a float chunk "equal to the fill value" could be -0.0s: always write float chunks
            config={"write_empty_chunks": stored.startswith(("float", "complex"))},
        )
        for box in _slabs(entry.shape, chunks, dt.itemsize, slab_bytes):
            data = _to_numpy(interop.read_box(storage, m, key, box, opts), entry.dtype)
            if box.ndim == 0:
                arr[()] = data
            else:
                arr[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes, strict=True))] = data
        total += entry.nbytes
    # the attributes last: a group without them is visibly an unfinished export
    group.attrs[ATTR] = {
        "format": ARCHIVE_FORMAT,
        "version": ARCHIVE_VERSION,
        "step": m.step,
        "created": m.created,
        "user_metadata": dict(m.user_metadata),
        "tensors": {k: {"array": paths[k], "dtype": m.tensors[k].dtype, "shape": list(m.tensors[k].shape)} for k in keys},
        "objects": m.objects,
        "tree": m.tree,
    }
    return ZarrExport(m.step, dst, len(keys), total, time.perf_counter() - start)


def _store_kw(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """zarr's keyword for fsspec options: only for URLs (zarr refuses them for local paths)."""
    remote = "://" in url and not url.startswith("file://")
    return {"storage_options": storage_options} if storage_options and remote else {}


def _slabs(shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int, slab_bytes: int) -> list[regions.Box]:
    """Boxes of whole chunk rows along the first dimension, about ``slab_bytes`` each."""
    if not shape or math.prod(shape) == 0:
        return [regions.Box.whole(shape)]
    row = math.prod(shape[1:]) * itemsize
    rows = max(chunks[0], slab_bytes // max(1, row) // chunks[0] * chunks[0])
    return [
        regions.Box((o,) + (0,) * (len(shape) - 1), (min(rows, shape[0] - o), *shape[1:]))
        for o in range(0, shape[0], rows)
    ]


def import_zarr(
    src: Root,
    root: Root,
    step: int | None = None,
    *,
    src_storage_options: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    options: SaveOptions | None = None,
    batch_bytes: int = 1 << 30,
) -> Manifest:
    """Commit the Zarr group at ``src`` (written by :func:`export_zarr`) as checkpoint ``step``
    (default: the step it was exported from) under ``root``, through the normal save path.
    Tensors come back bitwise identical, with the same structure, plain data and user metadata.
    Raises CheckpointExistsError if the step is committed already."""
    src = root_url(src, "src")
    root = root_url(root)
    zarr = _zarr()
    group = zarr.open_group(src, mode="r", **_store_kw(src, src_storage_options))
    where = f"{src}: zarr attribute {ATTR!r}"
    info = _archive_info(dict(group.attrs), where)
    step = info["step"] if step is None else step
    tensors: dict[str, dict[str, Any]] = info["tensors"]
    keys = list(interop.tensor_keys_in_order(info["tree"]))
    if sorted(keys) != sorted(tensors):
        raise ManifestSchemaError(f"{where}: the tree's tensors and the listed tensors differ")
    batches: list[list[str]] = [[]]
    size = 0
    for k in keys:
        n = math.prod(tensors[k]["shape"]) * dtypes.BY_CODE[tensors[k]["dtype"]].itemsize
        if batches[-1] and size + n > batch_bytes:
            batches.append([])
            size = 0
        batches[-1].append(k)
        size += n
    a = saver.begin(root, step=step, world_size=len(batches), options=options,
                    user_metadata=info["user_metadata"], storage_options=storage_options)  # fmt: skip
    reports = []
    for rank, batch in enumerate(batches):
        local: dict[str, Any] = {k: _read_array(group, k, tensors[k], src) for k in batch}
        flat = tree.Flat(local, frozenset(), info["objects"], info["tree"])
        reports.append(saver.write_shards(a, flat, rank=rank, storage_options=storage_options))
        del local, flat
    return saver.commit(a, reports, storage_options=storage_options)


def _archive_info(attrs: dict[str, Any], where: str) -> dict[str, Any]:
    info = attrs.get(ATTR)
    if not isinstance(info, dict) or info.get("format") != ARCHIVE_FORMAT:
        raise ManifestSchemaError(f"{where}: missing; not a ckpt Zarr archive (or an unfinished export)")
    if info.get("version") != ARCHIVE_VERSION:
        raise ManifestSchemaError(f"{where}: archive version {info.get('version')!r}; this ckpt reads {ARCHIVE_VERSION}")
    for field, kind in (("step", int), ("user_metadata", dict), ("tensors", dict), ("objects", dict), ("tree", dict)):
        if not isinstance(info.get(field), kind):
            raise ManifestSchemaError(f"{where}: {field!r} is missing or not a {kind.__name__}")
    for k, t in info["tensors"].items():
        if not (isinstance(t, dict) and isinstance(t.get("array"), str) and t.get("dtype") in STORED
                and isinstance(t.get("shape"), list) and all(type(d) is int and d >= 0 for d in t["shape"])):  # fmt: skip
            raise ManifestSchemaError(f"{where}: tensor {k!r}: malformed entry {str(t)[:120]}")
    return info


def _read_array(group: zarr.Group, key: str, t: dict[str, Any], src: str) -> torch.Tensor:
    zarr = _zarr()
    code, shape = t["dtype"], tuple(t["shape"])
    stored, bits = STORED[code]
    arr = group[t["array"]]
    if not isinstance(arr, zarr.Array) or np.dtype(arr.dtype) != np.dtype(stored) or tuple(arr.shape) != shape:
        found = f"{arr.dtype} {list(arr.shape)}" if isinstance(arr, zarr.Array) else "a group"
        raise PlanError(f"{src}/{t['array']}: tensor {key!r} should be {stored} {list(shape)}, the array is {found}")
    data = torch.from_numpy(np.ascontiguousarray(np.asarray(arr[...] if shape else arr[()])).reshape(shape))
    return data.view(dtypes.BY_CODE[code].torch_dtype) if bits else data


__all__ = ["ZarrExport", "export_zarr", "import_zarr"]
