"""The manifest parser: strict validation of manifest bytes before anything is allocated or read.

:func:`parse` (called through ``ckpt.format.manifest.parse``) checks the seal, the version, the
top-level fields, the files and every tensor's columnar shard table, then the tree
(``ckpt.format.skeleton``). The shard tables of all tensors are checked together with
whole-column numpy operations (:class:`_Shards` and the ``_check_*`` functions): the Python
work is per tensor, not per shard. Every error names the manifest and the entry. Pure (no I/O).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from ckpt.errors import (
    IntegrityMetadataError,
    InvalidByteRangeError,
    ManifestError,
    ManifestLocationError,
    ManifestParseError,
    ManifestSchemaError,
    ManifestTooLargeError,
    OverlappingRangesError,
    ShardCoverageError,
    TensorSizeError,
    UnsafePathError,
    UnsupportedDtypeError,
    UnsupportedFormatError,
)
from ckpt.format import _manifest_pages as _pages
from ckpt.format import dtypes, strictjson
from ckpt.format.manifest import (
    _U63,
    CHECKSUM_ALGORITHM,
    CONTENT_HASH,
    FORMAT_VERSION,
    HASH_HEX_DIGITS,
    I64,
    MANIFEST_CRC_FIELD,
    MAX_NDIM,
    MAX_NESTING,
    MAX_TENSOR_BYTES,
    SHARD_COLUMNS,
    FileEntry,
    Head,
    Manifest,
    ShardTable,
    TensorEntry,
    _check_seal,
    block_counts,
    check_path,
)
from ckpt.format.skeleton import check_tree
from ckpt.format.skeleton import fields as _fields
from ckpt.geometry.coverage import coverage_problem
from ckpt.state import tree

_show = strictjson.show
_EMPTY = np.zeros(0, dtype=np.int64)
_TOP_FIELDS = {
    "format_version", "step", "attempt", "created", "world_size", "user_metadata",
    "checksum_algorithm", "block_bytes", "files", "tensors", "objects", "tree", "manifest_crc32c",
}  # fmt: skip
_TOP_FIELDS_V2 = (_TOP_FIELDS - {"tensors", "objects", "tree"}) | {"summary", "sections"}
_TOP_FIELDS_V3 = _TOP_FIELDS_V2 | {"content_hash"}  # v3: v2 with each shard's content hash (4.9)
_HASH_RE = re.compile(f"[0-9a-f]{{{HASH_HEX_DIGITS}}}")
_ATTEMPT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

def parse(data: bytes, *, where: str, expected_step: int | None, max_bytes: int, lazy: bool = False) -> Manifest:
    """Parse and validate manifest bytes read from ``where`` (at most ``max_bytes`` of them).

    A v2 manifest (lines, FORMAT.md 4.8) read ``lazy`` has its head, tree, objects and every
    section's CRC32C checked, and its tensor entries validated when they are asked for
    (``_manifest_pages.LazyTensors``); otherwise everything is validated here."""
    if len(data) > max_bytes:
        raise ManifestTooLargeError(f"{where}: {len(data)} bytes is over the {max_bytes}-byte cap")
    if is_paged(data):
        return _parse_v2(data, where=where, expected_step=expected_step, lazy=lazy)
    obj = strictjson.loads(data, what=where, error=ManifestParseError, max_bytes=max_bytes)
    return validate(obj, data, where=where, expected_step=expected_step)


def parse_head(data: bytes, *, where: str, expected_step: int | None, max_bytes: int) -> Head:
    """What ``ckpt ls`` shows of a manifest: a v2 head alone (sealed and checked; the body is not
    read), or a whole v1 manifest validated."""
    if len(data) > max_bytes:
        raise ManifestTooLargeError(f"{where}: {len(data)} bytes is over the {max_bytes}-byte cap")
    if is_paged(data):
        head_bytes, _ = _pages.split(data)
        obj = strictjson.loads(head_bytes, what=where, error=ManifestParseError, max_bytes=max_bytes)
        h = _head(obj, head_bytes, where, expected_step, _TOP_FIELDS_V2)
        sections = _pages.Sections(obj["sections"], obj["summary"], None, where)
        return Head(h.step, h.attempt, h.created, h.world_size, h.files, sections.num_tensors,
                    sections.num_objects, h.user_metadata, h.format_version)  # fmt: skip
    return Head.of(parse(data, where=where, expected_step=expected_step, max_bytes=max_bytes))


_VERSION_FIRST = re.compile(rb'\{"format_version":([0-9]{1,9}),')


def is_paged(data: bytes | bytearray) -> bool:
    """Whether ``data`` is written as lines (format v2 on: the head first), judged by the version
    a writer puts first; anything else is parsed as one JSON document (v1) and its checks name
    what is wrong."""
    found = _VERSION_FIRST.match(data)
    return found is not None and int(found[1]) >= 2


def validate(obj: object, data: bytes, *, where: str, expected_step: int | None) -> Manifest:
    """Validate ``obj``, the JSON value of the v1 manifest bytes ``data`` (decoded from them, or
    the very value they were serialized from), into a :class:`Manifest` that keeps ``data``."""
    h = _head(obj, data, where, expected_step, _TOP_FIELDS)
    assert isinstance(obj, dict)
    if h.format_version != 1:
        raise ManifestSchemaError(
            f"{where}: format_version {h.format_version} manifests are written as lines, the head first (FORMAT.md 4.8)"
        )
    objects, tree_ = _objects_and_tree(obj["objects"], obj["tree"], where)
    tensors = _tensors(obj["tensors"], h.files, h.block_bytes, where, hashed=False)
    _decode_objects(objects, where)
    check_tree(tree_, tensors, objects, where)
    return _filled(h, tensors, objects, tree_, data)


def validate_v2(head: dict[str, Any], tensors: dict[str, Any], objects: object, tree_: object, data: bytes, *,
                where: str, built: Mapping[str, TensorEntry]) -> Manifest:  # fmt: skip
    """A writer's v2 manifest checked on the values its bytes ``data`` were made from: the head
    (sealed value), the tensors map, the objects and the (v1-form) tree. Every check a reader
    makes runs on ``tensors``; the entries of the result are ``built``, the writer's own, which
    ``tensors`` was serialized from (a reader's tables would hold the same values)."""
    head_bytes, body = _pages.split(data)
    h = _head(head, head_bytes, where, None, _TOP_FIELDS_V2)
    sections = _pages.Sections(head["sections"], head["summary"], len(body), where)
    objs, tree_ = _objects_and_tree(objects, tree_, where)
    _tensors(tensors, h.files, h.block_bytes, where, hashed=h.content_hash is not None, tables=False)
    entries = built
    _decode_objects(objs, where)
    _check_counts(sections, entries, objs, where)
    check_tree(tree_, entries, objs, where)
    return _filled(h, entries, objs, tree_, data)


def _parse_v2(data: bytes, *, where: str, expected_step: int | None, lazy: bool) -> Manifest:
    head_bytes, body = _pages.split(data)
    obj = strictjson.loads(head_bytes, what=where, error=ManifestParseError, max_bytes=len(head_bytes))
    h = _head(obj, head_bytes, where, expected_step, _TOP_FIELDS_V2)
    sections = _pages.Sections(obj["sections"], obj["summary"], len(body), where)
    tree_raw = sections.decode(body, 0, "tree")
    objects = sections.decode(body, 1, "objects")
    if lazy:  # the walk checks the nodes it visits (skeleton.check_node); restore decodes the objects it uses
        if not isinstance(objects, dict):
            raise ManifestSchemaError(f"{where}: objects must be a JSON object, found {_show(objects)}")
        for k, v in objects.items():
            if strictjson.deeper_than(v, MAX_NESTING):
                raise ManifestParseError(f"{where}: object {k[:200]!r} is nested more than {MAX_NESTING} levels deep")
        sections.check_pages(body)
        _check_objects_count(sections, objects, where)

        def check(raw: dict[str, Any], full: bool) -> dict[str, TensorEntry]:
            entries = _tensors(raw, h.files, h.block_bytes, where, hashed=h.content_hash is not None)
            if full:  # every key used: every check of a whole manifest
                objs, whole = _objects_and_tree(objects, _pages.expand_tree(tree_raw, "", where), where)
                _decode_objects(objs, where)
                _check_counts(sections, entries, objs, where)
                check_tree(whole, entries, objs, where)
            return entries

        return _filled(h, _pages.LazyTensors(sections, body, check), objects, tree_raw, data)
    objects, tree_ = _objects_and_tree(objects, _pages.expand_tree(tree_raw, "", where), where)
    _check_objects_count(sections, objects, where)
    merged: dict[str, Any] = {}
    for i in range(len(sections.first)):
        merged.update(sections.page(body, i))
    tensors = _tensors(merged, h.files, h.block_bytes, where, hashed=h.content_hash is not None)
    _decode_objects(objects, where)
    _check_counts(sections, tensors, objects, where)
    check_tree(tree_, tensors, objects, where)
    return _filled(h, tensors, objects, tree_, data)


def _check_objects_count(sections: _pages.Sections, objects: Mapping[str, object], where: str) -> None:
    if len(objects) != sections.num_objects:
        raise ManifestSchemaError(f"{where}: the head counts {sections.num_objects} objects, the body holds {len(objects)}")


def _check_counts(sections: _pages.Sections, tensors: Mapping[str, object], objects: Mapping[str, object],
                  where: str) -> None:  # fmt: skip
    if len(tensors) != sections.num_tensors or len(objects) != sections.num_objects:
        raise ManifestSchemaError(
            f"{where}: the head counts {sections.num_tensors} tensors and {sections.num_objects} objects, "
            f"the body holds {len(tensors)} and {len(objects)}"
        )


def _filled(shell: Manifest, tensors: Mapping[str, TensorEntry], objects: dict[str, Any], tree_: Any, data: bytes) -> Manifest:
    """The manifest whose head ``shell`` is, with its body; it keeps the bytes it was read from."""
    m = dataclasses.replace(shell, tensors=tensors, objects=objects, tree=tree_)
    object.__setattr__(m, "_json", data)
    return m


def _head(obj: object, sealed_bytes: bytes, where: str, expected_step: int | None, top: set[str]) -> Manifest:
    """The version, the seal (over ``sealed_bytes``), the set of top-level fields (``top``), the
    scalars and the files, as a manifest with an empty body (:func:`_filled` adds it)."""
    if not isinstance(obj, dict):
        raise ManifestSchemaError(f"{where}: the manifest must be a JSON object, found {_show(obj)}")
    version = obj.get("format_version")
    if type(version) is not int:
        found = f"{_show(version)}, not an integer" if "format_version" in obj else "missing"
        raise UnsupportedFormatError(
            f"{where}: format_version is {found}; this ckpt reads integer versions 1..{FORMAT_VERSION}"
        )
    if not 1 <= version <= FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{where}: format_version {_show(version, 40)} is not supported by this ckpt, which reads "
            f"versions 1..{FORMAT_VERSION}" + ("; upgrade ckpt to read it" if version > FORMAT_VERSION else "")
        )
    _check_seal(sealed_bytes, obj.get(MANIFEST_CRC_FIELD), where)
    if top is _TOP_FIELDS_V2 and version >= 3:
        top = _TOP_FIELDS_V3
    missing = sorted(top - obj.keys())
    unknown = sorted(obj.keys() - top)
    if missing or unknown:
        unknown_shown = [_show(k, 40) for k in unknown[:8]]
        raise ManifestSchemaError(f"{where}: missing fields {missing}, unknown fields {unknown_shown}")
    step = _int(obj["step"], f"{where}: step")
    if expected_step is not None and step != expected_step:
        raise ManifestLocationError(
            f"{where}: the manifest says step {step} but was found at step {expected_step} "
            "(copied or replayed from another step?)"
        )
    attempt = obj["attempt"]
    if not isinstance(attempt, str) or not _ATTEMPT_RE.fullmatch(attempt):
        raise ManifestSchemaError(f"{where}: attempt {_show(attempt)} is not a [A-Za-z0-9_-] id of 1 to 64 characters")
    if not isinstance(obj["created"], str):
        raise ManifestSchemaError(f"{where}: created must be a string, found {_show(obj['created'])}")
    world_size = _int(obj["world_size"], f"{where}: world_size", lo=1)
    meta = obj["user_metadata"]
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ManifestSchemaError(f"{where}: user_metadata must map strings to strings, found {_show(meta)}")
    algorithm = obj["checksum_algorithm"]
    if algorithm != CHECKSUM_ALGORITHM:
        raise IntegrityMetadataError(
            f"{where}: checksum_algorithm {_show(algorithm)} is unknown; expected {CHECKSUM_ALGORITHM!r}"
        )
    block_bytes = _int(obj["block_bytes"], f"{where}: block_bytes", lo=1)
    files = _files(obj["files"], where)
    content_hash = obj.get("content_hash")
    if "content_hash" in top and content_hash != CONTENT_HASH:
        raise IntegrityMetadataError(f"{where}: content_hash {_show(content_hash)} is unknown; expected {CONTENT_HASH!r}")
    return Manifest(step=step, attempt=attempt, created=obj["created"], world_size=world_size, block_bytes=block_bytes,
                    files=files, tensors={}, objects={}, tree=None, user_metadata=meta, format_version=version,
                    content_hash=content_hash)  # fmt: skip


def _objects_and_tree(objects: object, tree_: object, where: str) -> tuple[dict[str, Any], Any]:
    """The objects and the tree, checked for nesting (the code that walks them recurses)."""
    if not isinstance(objects, dict):
        raise ManifestSchemaError(f"{where}: objects must be a JSON object, found {_show(objects)}")
    for k, v in objects.items():
        if strictjson.deeper_than(v, MAX_NESTING):
            raise ManifestParseError(f"{where}: object {k[:200]!r} is nested more than {MAX_NESTING} levels deep")
    if strictjson.deeper_than(tree_, MAX_NESTING):
        raise ManifestParseError(f"{where}: tree is nested more than {MAX_NESTING} levels deep")
    return objects, tree_


def _decode_objects(objects: dict[str, Any], where: str) -> None:
    """Every object decodes as a tagged value (FORMAT.md 8.2)."""
    for k, v in objects.items():
        tree.decode_value(v, f"{where}: object {k[:200]!r}")


def _int(x: object, where: str, *, lo: int = 0, hi: int = _U63) -> int:
    if type(x) is not int or not lo <= x < hi:
        bound = "2**63" if hi == _U63 else str(hi)
        raise ManifestSchemaError(f"{where}: expected an integer in [{lo}, {bound}), found {_show(x, 40)}")
    return x


def _int_list(x: object, where: str, n: int | None = None) -> tuple[int, ...]:
    if not isinstance(x, list) or (n is not None and len(x) != n) or len(x) > MAX_NDIM:
        want = str(n) if n is not None else f"at most {MAX_NDIM}"
        raise ManifestSchemaError(f"{where}: expected a list of {want} integers, found {_show(x)}")
    return tuple(_int(v, where) for v in x)


_FILE_FIELDS = frozenset({"path", "size", "crc32c"})


def _files(raw: object, where: str) -> dict[str, FileEntry]:
    """``files``: a list of ``{"path", "size", "crc32c"}``; shards refer to files by position."""
    if not isinstance(raw, list):
        raise ManifestSchemaError(f"{where}: files must be a JSON list of file entries, found {_show(raw)}")
    out: dict[str, FileEntry] = {}
    folded: dict[str, str] = {}
    for i, info in enumerate(raw):
        if not isinstance(info, dict) or not {"path", "size"} <= info.keys() or not info.keys() <= _FILE_FIELDS:
            raise ManifestSchemaError(f"{where}: files[{i}]: expected exactly the fields crc32c, path, size; found {_fields(info)}")
        path = check_path(info["path"], where=f"{where}: files[{i}]")
        other = folded.setdefault(path.lower(), path)  # the grammar is ASCII: lower() is case folding
        if path in out:
            raise ManifestSchemaError(f"{where}: files[{i}]: the path {path!r} is listed twice")
        if other != path:
            raise UnsafePathError(
                f"{where}: file paths {other!r} and {path!r} differ only in case; they would be "
                "one file on a case-insensitive store"
            )
        at = f"{where}: file {path!r}"
        if "crc32c" not in info:
            raise IntegrityMetadataError(f"{at}: no crc32c checksum; verification needs one (fail closed)")
        size = _int(info["size"], f"{at}: size")
        crc = info["crc32c"]
        if type(crc) is not int or not 0 <= crc < 2**32:
            raise IntegrityMetadataError(f"{at}: crc32c {_show(crc, 40)} is not a 32-bit unsigned integer")
        out[path] = FileEntry(size, crc)
    return out


_COLUMN_SET = frozenset(SHARD_COLUMNS)
_COLUMN_ERROR: dict[str, type[ManifestError]] = {
    "file": ManifestSchemaError,
    "offsets": ManifestSchemaError,
    "sizes": ManifestSchemaError,
    "byte_range": InvalidByteRangeError,
    "crc32c": IntegrityMetadataError,
}


def _column(lists: list[list[Any]], name: str, ats: Sequence[str], *, lo: int = 0, hi: int = _U63,
            expected: str = "") -> I64:  # fmt: skip
    """One shard column of every tensor as one int64 array: every element a JSON integer in
    ``[lo, hi)`` (booleans and floats are not integers), else the column's typed error naming
    the tensor and the position."""
    flat = itertools.chain.from_iterable
    bad = -1
    if not set(map(type, flat(lists))) <= {int}:
        bad = next(i for i, v in enumerate(flat(lists)) if type(v) is not int)
    else:
        try:
            arr = np.fromiter(flat(lists), dtype=np.int64, count=sum(map(len, lists)))
        except OverflowError:
            bad = next(i for i, v in enumerate(flat(lists)) if not lo <= v < hi)
        else:
            viol = np.flatnonzero((arr < lo) | (arr >= hi)) if hi < _U63 or lo > -_U63 else _EMPTY
            if not viol.size:
                return arr
            bad = int(viol[0])
    t, j = _locate(lists, bad)
    want = expected or f"an integer in [{lo}, {'2**63' if hi == _U63 else hi})"
    raise _COLUMN_ERROR[name](f"{ats[t]}: shards.{name}[{j}]: expected {want}, found {_show(lists[t][j], 40)}")


def _locate(lists: list[list[Any]], pos: int) -> tuple[int, int]:
    """(list index, index inside it) of position ``pos`` of the lists concatenated."""
    for t, x in enumerate(lists):
        if pos < len(x):
            return t, pos
        pos -= len(x)
    raise IndexError(pos)




# --- tensors: the columnar shard tables of every tensor, checked column by column --------------


def _tensors(raw: object, files: dict[str, FileEntry], block_bytes: int, where: str, *, hashed: bool,
             tables: bool = True) -> dict[str, TensorEntry]:  # fmt: skip
    """Every tensor entry and its columnar shard table, checked with whole-column numpy
    operations: the Python work is per tensor, not per shard. The checks run in this order
    (the first failing one names the error). ``hashed``: each shard table has a ``hash``
    column (format v3). ``tables=False``: the checks only (an empty result)."""
    heads = _tensor_heads(raw, where, hashed)
    if not heads.keys:
        return {}
    s = _Shards.of(heads, tuple(files))
    _check_within_shape(s)
    numel = _elements(s)
    _check_byte_ranges(s, files)
    _check_byte_counts(s, numel)
    nblk = _check_block_counts(s, block_bytes)
    _check_coverage(s, numel)
    _check_no_aliasing(s, files, where)
    return _tables(s, nblk) if tables else {}


class _Ats(Sequence[str]):
    """Each tensor's message prefix (``<where>: tensor '<key>'``), made only when a message
    needs it."""

    def __init__(self, where: str, keys: list[str]) -> None:
        self._where, self._keys = where, keys

    def __len__(self) -> int:
        return len(self._keys)

    @overload
    def __getitem__(self, t: int) -> str: ...
    @overload
    def __getitem__(self, t: slice) -> list[str]: ...
    def __getitem__(self, t: int | slice) -> str | list[str]:
        if isinstance(t, slice):
            return [self[i] for i in range(*t.indices(len(self)))]
        return _at(self._where, self._keys[t])


def _at(where: str, key: str) -> str:
    return f"{where}: tensor {key[:200]!r}"


@dataclass(frozen=True, slots=True)
class _Heads:
    """Each tensor's key, message prefix, dtype and shape, and its raw shard columns."""

    keys: list[str]
    ats: _Ats
    dts: list[dtypes.DType]
    shapes: list[tuple[int, ...]]
    cols: dict[str, list[list[Any]]]


_TENSOR_FIELDS = frozenset({"dtype", "shape", "shards"})
_HASHED_COLUMNS = (*SHARD_COLUMNS, "hash")
_HASHED_SET = frozenset(_HASHED_COLUMNS)


def _tensor_heads(raw: object, where: str, hashed: bool) -> _Heads:
    """The per-tensor checks (fields, dtype, shape cap, column presence and lengths). The common
    case (every field well formed) costs a few cheap tests per tensor; anything else goes through
    :func:`_tensor_head`, which names what is wrong."""
    if not isinstance(raw, dict):
        raise ManifestSchemaError(f"{where}: tensors must be a JSON object, found {_show(raw)}")
    keys = list(raw)
    names = _HASHED_COLUMNS if hashed else SHARD_COLUMNS
    colset = _HASHED_SET if hashed else _COLUMN_SET
    heads = _Heads(keys, _Ats(where, keys), [], [], {c: [] for c in names})
    cols, dts, shapes, by_code = heads.cols, heads.dts, heads.shapes, dtypes.BY_CODE
    c_file, c_offs, c_sizes, c_br, c_crc = (cols[c] for c in SHARD_COLUMNS)
    c_hash = cols.get("hash")
    for key, info in raw.items():
        try:  # the fast path: exactly the expected shapes and types, else the checks below
            if type(info) is not dict or info.keys() != _TENSOR_FIELDS:
                raise _Slow
            dt, shape, sh = by_code[info["dtype"]], info["shape"], info["shards"]
            if type(shape) is not list or len(shape) > MAX_NDIM or type(sh) is not dict or sh.keys() != colset:
                raise _Slow
            for d in shape:
                if type(d) is not int or not 0 <= d < _U63:
                    raise _Slow
            f, o, z, b, c = sh["file"], sh["offsets"], sh["sizes"], sh["byte_range"], sh["crc32c"]
            n, nd = len(f), len(shape)
            if (
                type(f) is not list or type(o) is not list or type(z) is not list or type(b) is not list
                or type(c) is not list or n == 0 or len(o) != n * nd or len(z) != n * nd or len(b) != 2 * n
            ):  # fmt: skip
                raise _Slow
            if math.prod(shape) * dt.itemsize > MAX_TENSOR_BYTES or 0 in shape:
                raise _Slow  # the cap counts zero-size dimensions as 1
            hh: Any = sh["hash"] if hashed else None
            if hashed and (type(hh) is not list or len(hh) != n):
                raise _Slow
        except (_Slow, KeyError, TypeError):
            dt, shape_t, (f, o, z, b, c, *rest) = _tensor_head(info, _at(where, key), hashed)
            shape = list(shape_t)
            hh = rest[0] if rest else None
        if c_hash is not None:
            c_hash.append(hh)  # a list: checked by either path
        c_file.append(f)
        c_offs.append(o)
        c_sizes.append(z)
        c_br.append(b)
        c_crc.append(c)
        dts.append(dt)
        shapes.append(tuple(shape))
    return heads


class _Slow(Exception):
    """A tensor entry the fast path of :func:`_tensor_heads` does not take."""


def _tensor_head(info: object, at: str, hashed: bool) -> tuple[dtypes.DType, tuple[int, ...], list[Any]]:
    """One tensor entry checked field by field: its dtype, shape and shard columns, or the typed
    error that names what is wrong."""
    if not isinstance(info, dict) or set(info) != _TENSOR_FIELDS:
        raise ManifestSchemaError(f"{at}: expected exactly the fields dtype, shape, shards; found {_fields(info)}")
    code = info["dtype"]
    if not isinstance(code, str) or code not in dtypes.BY_CODE:
        raise UnsupportedDtypeError(f"{at}: unknown dtype {_show(code)}; expected one of {sorted(dtypes.BY_CODE)}")
    dt = dtypes.BY_CODE[code]
    shape = _int_list(info["shape"], f"{at}: shape")
    # Zero-size dimensions count as 1: torch cannot even describe [0, 2**62, 2**62].
    if math.prod(max(d, 1) for d in shape) * dt.itemsize > MAX_TENSOR_BYTES:
        raise TensorSizeError(
            f"{at}: shape {list(shape)} of {dt.code} is over the {MAX_TENSOR_BYTES}-byte cap "
            "(each dimension counted as at least 1)"
        )
    sh = info["shards"]
    names = _HASHED_COLUMNS if hashed else SHARD_COLUMNS
    if not isinstance(sh, dict) or set(sh) | {"crc32c"} != set(names):
        raise ManifestSchemaError(
            f"{at}: shards must be an object of the parallel lists {list(names)}; found {_fields(sh)}"
        )
    if "crc32c" not in sh:
        raise IntegrityMetadataError(f"{at}: the shards have no crc32c checksums; verification needs them (fail closed)")
    for c in SHARD_COLUMNS:
        if not isinstance(sh[c], list):
            raise _COLUMN_ERROR[c](f"{at}: shards.{c} must be a list of integers, found {_show(sh[c])}")
    n, nd = len(sh["file"]), len(shape)
    if n == 0:
        raise ManifestSchemaError(f"{at}: shards must hold at least one shard, found none")
    for c, per in (("offsets", nd), ("sizes", nd), ("byte_range", 2)):
        if len(sh[c]) != n * per:
            raise _COLUMN_ERROR[c](
                f"{at}: shards.{c} must hold {n * per} integers ({per} for each of {n} shards), found {len(sh[c])}"
            )
    if hashed and (not isinstance(sh["hash"], list) or len(sh["hash"]) != n):
        raise IntegrityMetadataError(
            f"{at}: shards.hash must be a list of {n} content hashes (one per shard), found {_show(sh['hash'])}"
        )
    return dt, shape, [sh[c] for c in names]


@dataclass(frozen=True, slots=True)
class _Shards:
    """Every shard of every tensor as whole columns (shard ``s`` of the concatenation belongs
    to tensor ``tensor_of[s]``; its dimensions are ``offs[flat_at[s]:flat_at[s + 1]]``)."""

    heads: _Heads
    paths: tuple[str, ...]
    counts: I64  # shards per tensor
    ndims: I64  # dimensions per tensor
    first: I64  # tensor -> first shard, (T + 1,)
    tensor_of: I64  # shard -> tensor
    nd_shard: I64  # shard -> dimensions
    flat_at: I64  # shard -> first dimension, (S + 1,)
    file_idx: I64
    offs: I64  # flat
    sizes: I64  # flat
    br: I64  # (S, 2)
    crcs: I64  # flat
    hashes: list[str | None] | None  # flat, one per shard (format v3)

    @classmethod
    def of(cls, heads: _Heads, paths: tuple[str, ...]) -> _Shards:
        """The columns as int64 arrays (each element checked by :func:`_column`) and their indices."""
        cols, ats, shapes = heads.cols, heads.ats, heads.shapes
        counts = np.array([len(x) for x in cols["file"]], dtype=np.int64)
        ndims = np.array([len(s) for s in shapes], dtype=np.int64)
        first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        tensor_of = np.repeat(np.arange(len(heads.keys), dtype=np.int64), counts)
        nd_shard = np.repeat(ndims, counts)
        flat_at = np.concatenate([[0], np.cumsum(nd_shard)]).astype(np.int64)
        return cls(
            heads, paths, counts, ndims, first, tensor_of, nd_shard, flat_at,
            _column(cols["file"], "file", ats, hi=len(paths), expected=f"a file index in [0, {len(paths)})"),
            _column(cols["offsets"], "offsets", ats),
            _column(cols["sizes"], "sizes", ats),
            _column(cols["byte_range"], "byte_range", ats, lo=-_U63, expected="an integer").reshape(-1, 2),
            _column(cols["crc32c"], "crc32c", ats, hi=2**32, expected="a 32-bit unsigned integer"),
            _hash_column(cols["hash"], ats) if "hash" in cols else None,
        )  # fmt: skip

    def shard_at(self, s: int) -> tuple[str, int, str]:
        """Shard ``s``'s tensor (as a message prefix), its index in that tensor, and its file."""
        t = int(self.tensor_of[s])
        return self.heads.ats[t], s - int(self.first[t]), self.paths[int(self.file_idx[s])]

    def box(self, s: int) -> str:
        """Shard ``s``'s region, for a message."""
        a, b = int(self.flat_at[s]), int(self.flat_at[s + 1])
        return f"offsets {self.offs[a:b].tolist()} with sizes {self.sizes[a:b].tolist()}"


def _hash_column(lists: list[list[Any]], ats: Sequence[str]) -> list[str | None]:
    """Every shard's content hash: 32 lowercase hex digits, or null (written without one)."""
    flat: list[str | None] = list(itertools.chain.from_iterable(lists))
    match = _HASH_RE.fullmatch
    for i, h in enumerate(flat):
        if h is not None and not (type(h) is str and match(h)):
            t, j = _locate(lists, i)
            raise IntegrityMetadataError(
                f"{ats[t]}: shards.hash[{j}]: expected {HASH_HEX_DIGITS} lowercase hex digits or null, found {_show(h, 40)}"
            )
    return flat


def _check_within_shape(s: _Shards) -> None:
    """Every box within its tensor's shape (written so that nothing can overflow)."""
    shapes, offs, sizes, flat_at = s.heads.shapes, s.offs, s.sizes, s.flat_at
    shape_at = np.concatenate([[0], np.cumsum(s.ndims)]).astype(np.int64)
    dims = np.array(list(itertools.chain.from_iterable(shapes)), dtype=np.int64)
    elem_shard = np.repeat(np.arange(len(s.nd_shard), dtype=np.int64), s.nd_shard)
    shape_flat = dims[shape_at[s.tensor_of[elem_shard]] + np.arange(len(offs), dtype=np.int64) - flat_at[elem_shard]]
    bad = np.flatnonzero((sizes > shape_flat) | (offs > shape_flat - sizes))
    if bad.size:
        sh = int(np.searchsorted(flat_at, bad[0], side="right")) - 1
        at, i, _ = s.shard_at(sh)
        raise ShardCoverageError(f"{at}: shard {i} at {s.box(sh)} exceeds the shape {list(shapes[int(s.tensor_of[sh])])}")


def _elements(s: _Shards) -> I64:
    """Elements of each shard: at most 2**50 (the boxes are within capped shapes)."""
    numel = np.ones(len(s.tensor_of), dtype=np.int64)
    has_dims = s.nd_shard > 0
    if has_dims.any():
        numel[has_dims] = np.multiply.reduceat(s.sizes, s.flat_at[:-1][has_dims])
    return numel


def _check_byte_ranges(s: _Shards, files: dict[str, FileEntry]) -> None:
    """Every byte range ``[start, end)`` inside its file: ``0 <= start <= end <= size``."""
    start, end = s.br[:, 0], s.br[:, 1]
    fsize = np.array([f.size for f in files.values()], dtype=np.int64)[s.file_idx]
    bad = np.flatnonzero((start < 0) | (end < start) | (end > fsize))
    if bad.size:
        sh = int(bad[0])
        at, i, path = s.shard_at(sh)
        raise InvalidByteRangeError(
            f"{at}: shard {i}: byte_range [{start[sh]}, {end[sh]}) in {path!r} is invalid; expected "
            f"0 <= start <= end <= {fsize[sh]}, the file's size"
        )


def _check_byte_counts(s: _Shards, numel: I64) -> None:
    """Every byte range exactly as long as its box's elements of the tensor's dtype."""
    start, end, sizes, flat_at = s.br[:, 0], s.br[:, 1], s.sizes, s.flat_at
    dts = s.heads.dts
    itemsize = np.repeat(np.array([d.itemsize for d in dts], dtype=np.int64), s.counts)
    need = numel * itemsize
    bad = np.flatnonzero(end - start != need)
    if bad.size:
        sh = int(bad[0])
        at, i, path = s.shard_at(sh)
        a, b = int(flat_at[sh]), int(flat_at[sh + 1])
        raise TensorSizeError(
            f"{at}: shard {i}: byte_range [{start[sh]}, {end[sh]}) in {path!r} holds {end[sh] - start[sh]} bytes; "
            f"sizes {sizes[a:b].tolist()} of {dts[int(s.tensor_of[sh])].code} need {need[sh]}"
        )


def _check_block_counts(s: _Shards, block_bytes: int) -> I64:
    """Each tensor's crc32c list holds one value per checksum block of each shard; returns the
    blocks of each shard."""
    nblk = block_counts(s.br, block_bytes)
    crc_need = np.add.reduceat(nblk, s.first[:-1])
    crc_have = np.array([len(x) for x in s.heads.cols["crc32c"]], dtype=np.int64)
    bad = np.flatnonzero(crc_need != crc_have)
    if bad.size:
        t = int(bad[0])
        raise IntegrityMetadataError(
            f"{s.heads.ats[t]}: its {int(s.counts[t])} shards need {int(crc_need[t])} crc32c values in all (one per "
            f"{block_bytes}-byte block of each shard, in shard order), found {int(crc_have[t])}"
        )
    return nblk


def _check_coverage(s: _Shards, numel: I64) -> None:
    """Each tensor's shards tile its shape exactly; only tensors with two shards holding data,
    or the wrong element count, need a look."""
    first, shapes = s.first, s.heads.shapes
    live = np.add.reduceat((numel > 0).astype(np.int64), first[:-1])
    covered = np.add.reduceat(numel, first[:-1])
    covered_f = np.add.reduceat(numel.astype(np.float64), first[:-1])
    totals = np.array([math.prod(sh) for sh in shapes], dtype=np.int64)
    for t in np.flatnonzero((live >= 2) | (covered != totals) | (covered_f > 2.0**53)).tolist():
        a, b = int(first[t]), int(first[t + 1])
        nd = int(s.ndims[t])
        fa = int(s.flat_at[a])
        problem = coverage_problem(
            shapes[t], s.offs[fa : fa + (b - a) * nd].reshape(b - a, nd), s.sizes[fa : fa + (b - a) * nd].reshape(b - a, nd)
        )
        if problem is not None:
            raise ShardCoverageError(f"{s.heads.ats[t]}: {problem.describe(lambda i, a=a: s.box(a + i))}")


def _check_no_aliasing(s: _Shards, files: dict[str, FileEntry], where: str) -> None:
    """No two non-empty byte ranges of one file share a byte, across all tensors."""
    start, end, file_idx, keys = s.br[:, 0], s.br[:, 1], s.file_idx, s.heads.keys
    nonempty = np.flatnonzero(end > start)
    sizes_all = [f.size for f in files.values()]
    if sum(sizes_all) < _U63:  # one sort: the files laid end to end (a range stays in its file)
        base = np.concatenate([[0], np.cumsum(sizes_all[:-1], dtype=np.int64)]).astype(np.int64)
        order = nonempty[np.argsort(start[nonempty] + base[file_idx[nonempty]])]
    else:
        order = nonempty[np.lexsort((start[nonempty], file_idx[nonempty]))]
    f, s0, e0 = file_idx[order], start[order], end[order]
    bad = np.flatnonzero((f[1:] == f[:-1]) & (s0[1:] < e0[:-1]))
    if bad.size:
        x, y = int(order[bad[0]]), int(order[bad[0] + 1])
        k1, k2 = keys[int(s.tensor_of[x])], keys[int(s.tensor_of[y])]
        raise OverlappingRangesError(
            f"{where}: file {s.paths[int(file_idx[x])]!r}: byte ranges of {k1[:200]!r} [{start[x]}, {end[x]}) and "
            f"{k2[:200]!r} [{start[y]}, {end[y]}) overlap (two entries alias the same bytes)"
        )


def _tables(s: _Shards, nblk: I64) -> dict[str, TensorEntry]:
    """Each tensor's entry, its :class:`ShardTable` made of views into the whole columns."""
    first, flat_at, ndims, paths = s.first, s.flat_at, s.ndims, s.paths
    crc_at = np.concatenate([[0], np.cumsum(nblk)]).astype(np.int64)
    out: dict[str, TensorEntry] = {}
    for t, key in enumerate(s.heads.keys):
        a, b = int(first[t]), int(first[t + 1])
        fa, fb = int(flat_at[a]), int(flat_at[b])
        nd = int(ndims[t])
        ca, cb = int(crc_at[a]), int(crc_at[b])
        table = ShardTable(
            paths, s.file_idx[a:b], s.offs[fa:fb].reshape(b - a, nd), s.sizes[fa:fb].reshape(b - a, nd),
            s.br[a:b], s.crcs[ca:cb], crc_at[a : b + 1] - ca, None if s.hashes is None else tuple(s.hashes[a:b]),
        )  # fmt: skip
        out[key] = TensorEntry(s.heads.dts[t].code, s.heads.shapes[t], table)
    return out
