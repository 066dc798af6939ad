"""The manifest: the single commit record of a checkpoint, and its strict parser.

``steps/<step:012d>/manifest.json`` is versioned JSON (see docs/FORMAT.md). :func:`parse`
validates everything before anything is allocated or read: types, caps, path grammar, byte
ranges, shard coverage and checksum metadata. Unknown fields are rejected; a newer
``format_version`` is refused.

A tensor's shards are stored as a columnar table (parallel integer lists, FORMAT.md 4.4) so
that a million shard entries parse at C speed; they are validated with vectorized numpy checks
and kept in memory as a :class:`ShardTable`, whose items are :class:`ShardEntry` values made on
demand.

Pure (no I/O).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import crc32c
import numpy as np
from numpy.typing import NDArray

from ckpt.errors import (
    IntegrityMetadataError,
    InvalidByteRangeError,
    ManifestChecksumError,
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
from ckpt.format import dtypes, strictjson
from ckpt.geometry import boxes as regions
from ckpt.geometry.byte_ranges import ByteRange
from ckpt.state import tree

FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 30  # 1 GiB: a million shard entries fit; a hostile file does not
MAX_NDIM = 64
MAX_TENSOR_BYTES = 1 << 50  # 1 PiB: no real tensor, no wrapped arithmetic
MAX_PATH_BYTES = 1024
MAX_NESTING = tree.MAX_NESTING  # JSON levels inside ``tree`` and each object: real states nest ~10
MAX_CORNERS = 1 << 22  # shard coverage: corners the corner test may visit per tensor
MAX_PAIR_CHECKS = 1_000_000  # shard coverage: steps the overlap search may take per tensor
SMALL_TILING = 8  # shard coverage: up to this many non-empty shards, compare every pair
CHECKSUM_ALGORITHM = "crc32c"
_U63 = 2**63
_PATH_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
_TOP_FIELDS = {
    "format_version", "step", "attempt", "created", "world_size", "user_metadata",
    "checksum_algorithm", "block_bytes", "files", "tensors", "objects", "tree", "manifest_crc32c",
}  # fmt: skip
_ATTEMPT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
SHARD_COLUMNS = ("file", "offsets", "sizes", "byte_range", "crc32c")

I64 = NDArray[np.int64]
_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class FileEntry:
    size: int
    crc32c: int  # of the whole file


@dataclass(frozen=True, slots=True)
class ShardEntry:
    file: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    byte_range: ByteRange  # absolute within the file
    crc32c: tuple[int, ...]  # one per block of ``block_bytes`` from byte_range.start

    @property
    def box(self) -> regions.Box:
        return regions.Box(self.offsets, self.sizes)


def block_counts(byte_range: I64, block_bytes: int) -> I64:
    """Checksum blocks of each shard of an ``(n, 2)`` byte-range array (6.2), capped at 2**31."""
    length = byte_range[:, 1] - byte_range[:, 0]
    n = length // block_bytes + (length % block_bytes != 0)
    out: I64 = np.minimum(n, 1 << 31).astype(np.int64)  # no real list is that long; sums cannot wrap
    return out


@dataclass(frozen=True, eq=False)
class ShardTable(Sequence[ShardEntry]):
    """The shards of one tensor as parallel int64 arrays; indexing gives :class:`ShardEntry`.

    ``paths`` maps file indices to paths (parsed manifests share one tuple among all tensors);
    shard ``i``'s crc32c values are ``crc32c[crc_start[i]:crc_start[i + 1]]``.
    """

    paths: tuple[str, ...]
    file: I64  # (n,) index into ``paths``
    offsets: I64  # (n, ndim)
    sizes: I64  # (n, ndim)
    byte_range: I64  # (n, 2): [start, end) absolute in the file
    crc32c: I64  # flat, in shard order
    crc_start: I64  # (n + 1,)

    @classmethod
    def from_entries(cls, entries: Sequence[ShardEntry], ndim: int) -> ShardTable:
        """A table of ``entries`` (each of ``ndim`` dimensions), in their order."""
        paths = tuple(dict.fromkeys(e.file for e in entries))
        index = {p: i for i, p in enumerate(paths)}
        n = len(entries)
        counts = [len(e.crc32c) for e in entries]
        return cls(
            paths=paths,
            file=np.array([index[e.file] for e in entries], dtype=np.int64),
            offsets=np.array([e.offsets for e in entries], dtype=np.int64).reshape(n, ndim),
            sizes=np.array([e.sizes for e in entries], dtype=np.int64).reshape(n, ndim),
            byte_range=np.array([(e.byte_range.start, e.byte_range.end) for e in entries], dtype=np.int64).reshape(n, 2),
            crc32c=np.array([c for e in entries for c in e.crc32c], dtype=np.int64),
            crc_start=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
        )

    def __len__(self) -> int:
        return len(self.file)

    @overload
    def __getitem__(self, i: int) -> ShardEntry: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[ShardEntry, ...]: ...
    def __getitem__(self, i: int | slice) -> ShardEntry | tuple[ShardEntry, ...]:
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"shard index {i} out of range for {n} shards")
        i %= n
        start, end = self.byte_range[i].tolist()
        return ShardEntry(
            self.paths[int(self.file[i])],
            tuple(self.offsets[i].tolist()),
            tuple(self.sizes[i].tolist()),
            ByteRange(start, end),
            tuple(self.crc32c[self.crc_start[i] : self.crc_start[i + 1]].tolist()),
        )

    def __iter__(self) -> Iterator[ShardEntry]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardTable):
            return NotImplemented
        return list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ShardTable({len(self)} shards)"

    def used_paths(self) -> list[str]:
        """The paths of the files these shards are in, each once (no ShardEntry is made)."""
        return [self.paths[i] for i in np.unique(self.file).tolist()]

    def global_file_index(self, index: dict[str, int], paths: tuple[str, ...]) -> I64:
        """Each shard's file as an index into ``paths`` (``index`` maps path -> position)."""
        if self.paths is paths or self.paths == paths:
            return self.file
        remap = np.array([index[p] for p in self.paths], dtype=np.int64)
        out: I64 = remap[self.file] if len(self.paths) else self.file
        return out


@dataclass(frozen=True, slots=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    shards: ShardTable  # a sequence of ShardEntry given here is made into a table

    def __post_init__(self) -> None:
        if not isinstance(self.shards, ShardTable):
            object.__setattr__(self, "shards", ShardTable.from_entries(self.shards, len(self.shape)))

    @classmethod
    def of(cls, dtype: str, shape: tuple[int, ...], shards: Sequence[ShardEntry]) -> TensorEntry:
        return cls(dtype, shape, ShardTable.from_entries(shards, len(shape)))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.BY_CODE[self.dtype].itemsize


@dataclass(frozen=True, slots=True)
class Manifest:
    step: int
    attempt: str
    created: str
    world_size: int
    block_bytes: int
    files: dict[str, FileEntry]
    tensors: dict[str, TensorEntry]
    objects: dict[str, Any]
    tree: Any
    user_metadata: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    _json: bytes | None = field(default=None, init=False, repr=False, compare=False)  # as parsed

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> bytes:
        """The sealed manifest file (for a parsed manifest, the exact bytes it was parsed from)."""
        if self._json is not None:
            return self._json
        paths = tuple(self.files)
        index = {p: i for i, p in enumerate(paths)}
        return seal(
            {
                "format_version": self.format_version,
                "step": self.step,
                "attempt": self.attempt,
                "created": self.created,
                "world_size": self.world_size,
                "user_metadata": self.user_metadata,
                "checksum_algorithm": CHECKSUM_ALGORITHM,
                "block_bytes": self.block_bytes,
                "files": [{"path": p, "size": f.size, "crc32c": f.crc32c} for p, f in self.files.items()],
                "tensors": {k: _tensor_json(t, index, paths) for k, t in self.tensors.items()},
                "objects": self.objects,
                "tree": self.tree,
            }
        )


def _tensor_json(t: TensorEntry, index: dict[str, int], paths: tuple[str, ...]) -> dict[str, Any]:
    s = t.shards
    return {
        "dtype": t.dtype,
        "shape": list(t.shape),
        "shards": {
            "file": s.global_file_index(index, paths).tolist(),
            "offsets": s.offsets.ravel().tolist(),
            "sizes": s.sizes.ravel().tolist(),
            "byte_range": s.byte_range.ravel().tolist(),
            "crc32c": s.crc32c.tolist(),
        },
    }


# --- parsing ------------------------------------------------------------------------------------

_show = strictjson.show


def check_path(path: object, *, where: str) -> str:
    """A stored path must be relative, plain ASCII segments, with no way out of the root."""
    # The grammar is ASCII-only, so a matching path has as many bytes as characters. It is
    # tested before anything encodes the string (a lone surrogate cannot be encoded).
    if not isinstance(path, str) or len(path) > MAX_PATH_BYTES or not _PATH_RE.fullmatch(path):
        raise UnsafePathError(
            f"{where}: unsafe file path {_show(path, 120)}; expected a relative path of [A-Za-z0-9._-] "
            f"segments joined by '/', none empty or starting with '.' or '-', at most {MAX_PATH_BYTES} bytes"
        )
    return path


MANIFEST_CRC_FIELD = "manifest_crc32c"
_CRC_MARK = b'"manifest_crc32c":"'


def seal(fields: dict[str, Any]) -> bytes:
    """Serialize manifest ``fields`` with its own checksum as the last member.

    ``manifest_crc32c`` is 8 lowercase hex digits: the crc32c of the file's exact bytes with
    those 8 digits replaced by ``00000000``. Pure (no I/O).
    """
    body = {k: v for k, v in fields.items() if k != MANIFEST_CRC_FIELD}
    body[MANIFEST_CRC_FIELD] = "00000000"
    raw = strictjson.dumps(body)
    at = raw.rindex(_CRC_MARK) + len(_CRC_MARK)
    return raw[:at] + f"{crc32c.crc32c(raw):08x}".encode() + raw[at + 8 :]


def _check_seal(data: bytes, value: object, where: str) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{8}", value):
        raise IntegrityMetadataError(
            f"{where}: {MANIFEST_CRC_FIELD} must be 8 lowercase hex digits, found {_show(value)}"
        )
    at = data.rfind(_CRC_MARK) + len(_CRC_MARK)
    if at < len(_CRC_MARK) or data[at : at + 8] != value.encode():
        if re.search(rb'"manifest_crc32c"\s*:\s*"[0-9a-f]{8}"\s*}\s*$', data):
            raise IntegrityMetadataError(
                f"{where}: the manifest is not byte for byte as ckpt wrote it: it was re-serialized "
                f"(reformatted, e.g. by a JSON pretty-printer), and its {MANIFEST_CRC_FIELD} seals the "
                "exact compact bytes ckpt wrote, so it cannot be checked. Put back the file ckpt wrote "
                "(to move checkpoints, use `ckpt cp`, never a tool that rewrites JSON)"
            )
        raise IntegrityMetadataError(f"{where}: {MANIFEST_CRC_FIELD} is not written as its last member")
    crc = crc32c.crc32c(data[:at])
    crc = crc32c.crc32c(b"00000000", value=crc)
    actual = crc32c.crc32c(memoryview(data)[at + 8 :], value=crc)
    if actual != int(value, 16):
        raise ManifestChecksumError(
            f"{where}: the manifest's crc32c is {actual:08x} but it records {value}; the manifest "
            "was damaged after it was written"
        )


def parse(data: bytes, *, where: str, expected_step: int | None = None) -> Manifest:
    """Parse and validate manifest bytes read from ``where``."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestTooLargeError(f"{where}: {len(data)} bytes is over the {MAX_MANIFEST_BYTES}-byte cap")
    obj = strictjson.loads(data, what=where, error=ManifestParseError, max_bytes=MAX_MANIFEST_BYTES)
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
    _check_seal(data, obj.get(MANIFEST_CRC_FIELD), where)
    missing = sorted(_TOP_FIELDS - obj.keys())
    unknown = sorted(obj.keys() - _TOP_FIELDS)
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
    # tree and objects are the only free-form parts; the code that walks them recurses
    objects = obj["objects"]
    if not isinstance(objects, dict):
        raise ManifestSchemaError(f"{where}: objects must be a JSON object, found {_show(objects)}")
    for k, v in objects.items():
        if strictjson.deeper_than(v, MAX_NESTING):
            raise ManifestParseError(f"{where}: object {k[:200]!r} is nested more than {MAX_NESTING} levels deep")
    if strictjson.deeper_than(obj["tree"], MAX_NESTING):
        raise ManifestParseError(f"{where}: tree is nested more than {MAX_NESTING} levels deep")
    files = _files(obj["files"], where)
    tensors = _tensors(obj["tensors"], files, block_bytes, where)
    for k, v in objects.items():
        tree.decode_value(v, f"{where}: object {k[:200]!r}")
    _check_tree(obj["tree"], tensors, objects, where)
    m = Manifest(
        step=step, attempt=attempt, created=obj["created"], world_size=world_size,
        block_bytes=block_bytes, files=files, tensors=tensors, objects=objects,
        tree=obj["tree"], user_metadata=meta, format_version=version,
    )  # fmt: skip
    object.__setattr__(m, "_json", data)
    return m


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


def _fields(x: object) -> str:
    """The fields a hostile entry has, for a message (bounded)."""
    if not isinstance(x, dict):
        return _show(x)
    return str([k[:40] for k in sorted(x)[:8]])


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


def _column(lists: list[list[Any]], name: str, ats: list[str], *, lo: int = 0, hi: int = _U63,
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


def _tensors(raw: object, files: dict[str, FileEntry], block_bytes: int, where: str) -> dict[str, TensorEntry]:
    """Every tensor entry and its columnar shard table, checked with whole-column numpy
    operations: the Python work is per tensor, not per shard."""
    if not isinstance(raw, dict):
        raise ManifestSchemaError(f"{where}: tensors must be a JSON object, found {_show(raw)}")
    keys: list[str] = []
    ats: list[str] = []
    dts: list[dtypes.DType] = []
    shapes: list[tuple[int, ...]] = []
    cols: dict[str, list[list[Any]]] = {c: [] for c in SHARD_COLUMNS}
    for key, info in raw.items():
        at = f"{where}: tensor {key[:200]!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "shards"}:
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
        if not isinstance(sh, dict) or set(sh) | {"crc32c"} != _COLUMN_SET:
            raise ManifestSchemaError(
                f"{at}: shards must be an object of the parallel lists {list(SHARD_COLUMNS)}; found {_fields(sh)}"
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
        for c in SHARD_COLUMNS:
            cols[c].append(sh[c])
        keys.append(key)
        ats.append(at)
        dts.append(dt)
        shapes.append(shape)
    if not keys:
        return {}
    paths = tuple(files)
    counts = np.array([len(x) for x in cols["file"]], dtype=np.int64)  # shards per tensor
    ndims = np.array([len(s) for s in shapes], dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # tensor -> first shard
    tensor_of = np.repeat(np.arange(len(keys), dtype=np.int64), counts)
    nd_shard = np.repeat(ndims, counts)
    flat_at = np.concatenate([[0], np.cumsum(nd_shard)]).astype(np.int64)  # shard -> first dim

    file_idx = _column(cols["file"], "file", ats, hi=len(paths), expected=f"a file index in [0, {len(paths)})")
    offs = _column(cols["offsets"], "offsets", ats)
    sizes = _column(cols["sizes"], "sizes", ats)
    br = _column(cols["byte_range"], "byte_range", ats, lo=-_U63, expected="an integer").reshape(-1, 2)
    crcs = _column(cols["crc32c"], "crc32c", ats, hi=2**32, expected="a 32-bit unsigned integer")

    def shard_at(s: int) -> tuple[str, int, str]:
        t = int(tensor_of[s])
        return ats[t], s - int(first[t]), paths[int(file_idx[s])]

    def box(s: int) -> str:
        a, b = int(flat_at[s]), int(flat_at[s + 1])
        return f"offsets {offs[a:b].tolist()} with sizes {sizes[a:b].tolist()}"

    # every box within the shape (written so that nothing can overflow)
    shape_at = np.concatenate([[0], np.cumsum(ndims)]).astype(np.int64)
    dims = np.array(list(itertools.chain.from_iterable(shapes)), dtype=np.int64)
    elem_shard = np.repeat(np.arange(len(nd_shard), dtype=np.int64), nd_shard)
    shape_flat = dims[shape_at[tensor_of[elem_shard]] + np.arange(len(offs), dtype=np.int64) - flat_at[elem_shard]]
    bad = np.flatnonzero((sizes > shape_flat) | (offs > shape_flat - sizes))
    if bad.size:
        s = int(np.searchsorted(flat_at, bad[0], side="right")) - 1
        at, i, _ = shard_at(s)
        raise ShardCoverageError(f"{at}: shard {i} at {box(s)} exceeds the shape {list(shapes[int(tensor_of[s])])}")
    # elements of each shard: at most 2**50 (the boxes are within capped shapes)
    numel = np.ones(len(tensor_of), dtype=np.int64)
    has_dims = nd_shard > 0
    if has_dims.any():
        numel[has_dims] = np.multiply.reduceat(sizes, flat_at[:-1][has_dims])
    start, end = br[:, 0], br[:, 1]
    fsize = np.array([f.size for f in files.values()], dtype=np.int64)[file_idx]
    bad = np.flatnonzero((start < 0) | (end < start) | (end > fsize))
    if bad.size:
        s = int(bad[0])
        at, i, path = shard_at(s)
        raise InvalidByteRangeError(
            f"{at}: shard {i}: byte_range [{start[s]}, {end[s]}) in {path!r} is invalid; expected "
            f"0 <= start <= end <= {fsize[s]}, the file's size"
        )
    itemsize = np.repeat(np.array([d.itemsize for d in dts], dtype=np.int64), counts)
    need = numel * itemsize
    bad = np.flatnonzero(end - start != need)
    if bad.size:
        s = int(bad[0])
        at, i, path = shard_at(s)
        a, b = int(flat_at[s]), int(flat_at[s + 1])
        raise TensorSizeError(
            f"{at}: shard {i}: byte_range [{start[s]}, {end[s]}) in {path!r} holds {end[s] - start[s]} bytes; "
            f"sizes {sizes[a:b].tolist()} of {dts[int(tensor_of[s])].code} need {need[s]}"
        )
    nblk = block_counts(br, block_bytes)
    crc_need = np.add.reduceat(nblk, first[:-1])
    crc_have = np.array([len(x) for x in cols["crc32c"]], dtype=np.int64)
    bad = np.flatnonzero(crc_need != crc_have)
    if bad.size:
        t = int(bad[0])
        raise IntegrityMetadataError(
            f"{ats[t]}: its {int(counts[t])} shards need {int(crc_need[t])} crc32c values in all (one per "
            f"{block_bytes}-byte block of each shard, in shard order), found {int(crc_have[t])}"
        )
    # coverage: only tensors with two shards holding data, or the wrong element count, need a look
    live = np.add.reduceat((numel > 0).astype(np.int64), first[:-1])
    covered = np.add.reduceat(numel, first[:-1])
    covered_f = np.add.reduceat(numel.astype(np.float64), first[:-1])
    totals = np.array([math.prod(s) for s in shapes], dtype=np.int64)
    for t in np.flatnonzero((live >= 2) | (covered != totals) | (covered_f > 2.0**53)).tolist():
        a, b = int(first[t]), int(first[t + 1])
        nd = int(ndims[t])
        fa = int(flat_at[a])
        problem = coverage_problem(
            shapes[t], offs[fa : fa + (b - a) * nd].reshape(b - a, nd), sizes[fa : fa + (b - a) * nd].reshape(b - a, nd)
        )
        if problem is not None:
            raise ShardCoverageError(f"{ats[t]}: {problem.describe(lambda i, a=a: box(a + i))}")
    # no two non-empty byte ranges of one file share a byte, across all tensors
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
        k1, k2 = keys[int(tensor_of[x])], keys[int(tensor_of[y])]
        raise OverlappingRangesError(
            f"{where}: file {paths[int(file_idx[x])]!r}: byte ranges of {k1[:200]!r} [{start[x]}, {end[x]}) and "
            f"{k2[:200]!r} [{start[y]}, {end[y]}) overlap (two entries alias the same bytes)"
        )
    crc_at = np.concatenate([[0], np.cumsum(nblk)]).astype(np.int64)
    out: dict[str, TensorEntry] = {}
    for t, key in enumerate(keys):
        a, b = int(first[t]), int(first[t + 1])
        fa, fb = int(flat_at[a]), int(flat_at[b])
        nd = int(ndims[t])
        ca, cb = int(crc_at[a]), int(crc_at[b])
        table = ShardTable(
            paths, file_idx[a:b], offs[fa:fb].reshape(b - a, nd), sizes[fa:fb].reshape(b - a, nd),
            br[a:b], crcs[ca:cb], crc_at[a : b + 1] - ca,
        )  # fmt: skip
        out[key] = TensorEntry(dts[t].code, shapes[t], table)
    return out


# --- shard coverage -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CoverageProblem:
    """Why boxes do not tile a shape: ``overlap`` (boxes ``a`` and ``b``), ``gap`` (``covered``
    of ``total`` elements) or ``irregular`` (too irregular to decide within the budget)."""

    kind: str
    a: int = -1
    b: int = -1
    covered: int = 0
    total: int = 0
    boxes: int = 0
    split: int = 0

    def describe(self, box: Any) -> str:
        """The message; ``box(i)`` describes box ``i`` (e.g. "offsets [0, 0] with sizes [2, 4]")."""
        if self.kind == "overlap":
            return f"shard {self.a} at {box(self.a)} and shard {self.b} at {box(self.b)} overlap; each element must be stored once"
        if self.kind == "irregular":
            return (
                f"{self.boxes} shards split along {self.split} dimensions do not tile the shape exactly, "
                f"or are too irregular to check within {MAX_PAIR_CHECKS} steps"
            )
        return f"the shards cover {self.covered} of {self.total} elements (gaps); each element must be stored once"


def coverage_problem(shape: tuple[int, ...], offsets: I64, sizes: I64) -> CoverageProblem | None:
    """Whether boxes ``(offsets[i], sizes[i])``, each already within ``shape``, tile it exactly:
    None if they do. Boxes with no element cover nothing and may be anywhere.

    Linear or n log n on every layout people use: only the dimensions that some box splits
    matter; with one such dimension the boxes are intervals (a sort); with more, the corner
    test, then a budgeted sweep to name an overlap.
    """
    numel = np.prod(sizes, axis=1, dtype=np.int64) if len(sizes) else _EMPTY
    total = math.prod(shape)
    covered = sum(numel.tolist()) if float(numel.sum(dtype=np.float64)) > 2.0**53 else int(numel.sum())
    live = np.flatnonzero(numel > 0)
    if len(live) >= 2:
        lo, sz = offsets[live], sizes[live]
        pair: tuple[int, int] | None
        if len(live) <= SMALL_TILING:
            pair = _pairwise(lo.tolist(), sz.tolist())
        else:
            pair, split, complete = _tiling_overlap(shape, lo, sz, covered == total)
            if pair is None and covered == total and not complete:
                return CoverageProblem("irregular", boxes=len(live), split=split)
        if pair is not None:
            return CoverageProblem("overlap", int(live[pair[0]]), int(live[pair[1]]))
    if covered != total:
        return CoverageProblem("gap", covered=covered, total=total)
    return None


def _pairwise(lo: list[list[int]], sz: list[list[int]]) -> tuple[int, int] | None:
    for i in range(len(lo)):
        for j in range(i + 1, len(lo)):
            if all(max(a, b) < min(a + x, b + y) for a, x, b, y in zip(lo[i], sz[i], lo[j], sz[j], strict=True)):
                return i, j
    return None


def _tiling_overlap(shape: tuple[int, ...], lo: I64, sz: I64, volume_ok: bool) -> tuple[tuple[int, int] | None, int, bool]:
    """Two overlapping boxes (all non-empty), or None; the number of split dimensions; and
    whether "None" is a proof (with ``volume_ok``, of an exact tiling)."""
    split = np.flatnonzero(np.any(sz != np.array(shape, dtype=np.int64), axis=0)).tolist()
    if not split:  # every box is the whole tensor
        return (0, 1), 0, True
    if len(split) == 1:
        d = split[0]
        order = np.argsort(lo[:, d], kind="stable")
        s = lo[order, d]
        e = s + sz[order, d]
        bad = np.flatnonzero(s[1:] < e[:-1])  # sorted by start: an overlap shows between neighbours
        if bad.size:
            return (int(order[bad[0]]), int(order[bad[0] + 1])), 1, True
        return None, 1, True
    if volume_ok and len(lo) << len(split) <= MAX_CORNERS and _corners_tile(shape, lo, sz, split):
        return None, len(split), True
    budget = [MAX_PAIR_CHECKS]
    boxes = list(zip(range(len(lo)), lo.tolist(), sz.tolist(), strict=True))
    pair = _overlap_in(boxes, split, budget)
    return pair, len(split), budget[0] >= 0


def _corners_tile(shape: tuple[int, ...], lo: I64, sz: I64, dims: list[int]) -> bool:
    """Whether boxes inside ``shape`` whose volumes sum to its volume tile it exactly.

    Mod 2, the discrete mixed difference of a box's indicator is its set of corners, and the
    difference operator is invertible. So if the corners of all boxes, XOR-ed, are exactly the
    corners of the whole shape, every element is covered an odd number of times; with the
    volumes adding up, exactly once. Only the split dimensions ``dims`` need to be looked at.
    """
    k = len(dims)
    low = lo[:, dims]
    high = low + sz[:, dims]
    bits = ((np.arange(1 << k)[:, None] >> np.arange(k)) & 1).astype(bool)  # (2**k, k)
    corners = np.where(bits[None], high[:, None, :], low[:, None, :]).reshape(-1, k)
    uniq, n = np.unique(corners, axis=0, return_counts=True)
    odd = uniq[n % 2 == 1]
    want = np.unique(np.where(bits, np.array([shape[d] for d in dims], dtype=np.int64), 0), axis=0)
    return bool(odd.shape == want.shape and np.array_equal(odd, want))


_Box = tuple[int, list[int], list[int]]  # (index, offsets, sizes)


def _overlap_in(boxes: list[_Box], dims: list[int], budget: list[int]) -> tuple[int, int] | None:
    """Slab sweep: along ``dims[0]``, between consecutive cut points the same boxes are present,
    and two of them overlap only if their projections on the other dimensions overlap in some
    slab (recursively; one dimension left is a sort). Linear-ish on grids; budgeted otherwise."""
    budget[0] -= len(boxes)
    if budget[0] < 0:
        return None
    d, rest = dims[0], dims[1:]
    order = sorted(boxes, key=lambda s: s[1][d])
    if not rest:
        holder, reach = order[0], -1
        for s in order:
            if s[1][d] < reach:
                return holder[0], s[0]
            if s[1][d] + s[2][d] > reach:
                holder, reach = s, s[1][d] + s[2][d]
        return None
    cuts = sorted({s[1][d] for s in boxes} | {s[1][d] + s[2][d] for s in boxes})
    active: list[_Box] = []
    i = 0
    for cut in cuts[:-1]:
        active = [s for s in active if s[1][d] + s[2][d] > cut]
        while i < len(order) and order[i][1][d] == cut:
            active.append(order[i])
            i += 1
        if len(active) > 1:
            pair = _overlap_in(active, rest, budget)
            if pair is not None or budget[0] < 0:
                return pair
    return None


_INT_KEY = re.compile(r"-?[0-9]+")


def _tree_key(k: object, where: str) -> object:
    """A dict key in the tree: a string, an integer, or an ``{"$int": "<digits>"}`` big integer."""
    if type(k) is str or type(k) is int:
        return k
    if isinstance(k, dict) and len(k) == 1 and isinstance(k.get("$int"), str) and _INT_KEY.fullmatch(k["$int"]):
        try:
            return int(k["$int"])
        except ValueError:  # over Python's int digit limit
            pass
    raise ManifestSchemaError(f"{where}: tree: dict key {_show(k)} is not a string or an integer")


def _check_tree(node: object, tensors: dict[str, TensorEntry], objects: dict[str, Any], where: str) -> None:
    seen: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, dict) or not n:
            raise ManifestSchemaError(f"{where}: tree: malformed node {_show(n)}")
        kind, body = next(iter(n.items()))
        extra = set(n) - {kind}
        if extra - ({"metadata"} if kind == "odict" else set()):
            raise ManifestSchemaError(f"{where}: tree: unknown fields {_fields(dict.fromkeys(extra))} in a {kind[:40]!r} node")
        if "metadata" in n:
            tree.decode_value(n["metadata"], f"{where}: tree metadata")
        if kind in ("tensor", "ndarray", "object"):
            pool: dict[str, Any] = objects if kind == "object" else tensors
            if not isinstance(body, str) or body not in pool or body in seen:
                raise ManifestSchemaError(f"{where}: tree references {kind} {_show(body)} that is missing or repeated")
            seen.add(body)
        elif kind in ("list", "tuple") and isinstance(body, list):
            stack.extend(body)
        elif kind in ("dict", "odict") and isinstance(body, list):
            keys: set[tuple[type, object]] = set()
            for pair in body:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise ManifestSchemaError(f"{where}: tree: malformed {kind} entry {_show(pair)}; expected [key, node]")
                k = _tree_key(pair[0], where)
                if (type(k), k) in keys:
                    raise ManifestSchemaError(f"{where}: tree: key {_show(k)} appears twice in one {kind}")
                keys.add((type(k), k))
                stack.append(pair[1])
        else:
            raise ManifestSchemaError(f"{where}: tree: unknown or malformed node {_show(n)}")
    unreferenced = (tensors.keys() | objects.keys()) - seen
    if unreferenced:
        raise ManifestSchemaError(f"{where}: keys {[k[:40] for k in sorted(unreferenced)[:5]]} are not referenced by the tree")
