"""The manifest: the single commit record of a checkpoint.

``steps/<step:012d>/manifest.json`` is versioned JSON (see docs/FORMAT.md). This module holds
its in-memory model, its constants and caps, the stored-path grammar (:func:`check_path`) and
the seal (:func:`seal`: the manifest's own crc32c as its last member). :func:`parse` validates
everything before anything is allocated or read: types, caps, path grammar, byte ranges, shard
coverage and checksum metadata (the parser is ``ckpt.format._manifest_parse``; the tree checks
are ``ckpt.format.skeleton``; the coverage geometry is ``ckpt.geometry.coverage``). Unknown
fields are rejected; a newer ``format_version`` is refused.

A tensor's shards are stored as a columnar table (parallel integer lists, FORMAT.md 4.4) so
that a million shard entries parse at C speed; they are validated with vectorized numpy checks
and kept in memory as a :class:`ShardTable`, whose items are :class:`ShardEntry` values made on
demand.

Pure (no I/O).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import crc32c
import numpy as np
from numpy.typing import NDArray

from ckpt.errors import (
    IntegrityMetadataError,
    ManifestChecksumError,
    ManifestTooLargeError,
    UnsafePathError,
)
from ckpt.format import dtypes, strictjson
from ckpt.geometry import boxes as regions
from ckpt.geometry.byte_ranges import ByteRange
from ckpt.geometry.coverage import (  # re-exported: the coverage check was defined here
    MAX_CORNERS,
    MAX_PAIR_CHECKS,
    SMALL_TILING,
    CoverageProblem,
    coverage_problem,
)
from ckpt.state import tree

FORMAT_VERSION = 3  # the newest version this ckpt reads and writes (a small manifest is written as v1)
# Incremental saves (format v3) record each shard's content hash: BLAKE3 cut to 128 bits, as 32
# lowercase hex digits, or null for a shard written without one (FORMAT.md 4.9).
CONTENT_HASH = "blake3-128"
HASH_HEX_DIGITS = 32
SHARD_FORMAT_VERSION = 1  # shard files' ``ckpt.format_version``: their conventions (FORMAT.md 7) are v1's
MAX_MANIFEST_BYTES = 1 << 30  # 1 GiB: a million shard entries fit; a hostile file does not
MAX_NDIM = 64
MAX_TENSOR_BYTES = 1 << 50  # 1 PiB: no real tensor, no wrapped arithmetic
MAX_PATH_BYTES = 1024
MAX_NESTING = tree.MAX_NESTING  # JSON levels inside ``tree`` and each object: real states nest ~10
CHECKSUM_ALGORITHM = "crc32c"
_U63 = 2**63
_PATH_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
SHARD_COLUMNS = ("file", "offsets", "sizes", "byte_range", "crc32c")

I64 = NDArray[np.int64]


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
    # each shard's content hash (32 hex digits, or None: written without one); None for the whole
    # table where the manifest records no hashes (format v1, v2)
    hashes: tuple[str | None, ...] | None = None

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
        if len(self.file) == 1:
            return [self.paths[int(self.file[0])]]
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
class Head:
    """What a listing shows of a step: a v2 manifest's head alone, or a summary of a v1 one."""

    step: int
    attempt: str
    created: str
    world_size: int
    files: dict[str, FileEntry]
    num_tensors: int
    num_objects: int
    user_metadata: dict[str, str]
    format_version: int

    @classmethod
    def of(cls, m: Manifest) -> Head:
        return cls(m.step, m.attempt, m.created, m.world_size, m.files, len(m.tensors), len(m.objects),
                   m.user_metadata, m.format_version)  # fmt: skip

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


@dataclass(frozen=True, slots=True)
class Manifest:
    step: int
    attempt: str
    created: str
    world_size: int
    block_bytes: int
    files: dict[str, FileEntry]
    tensors: Mapping[str, TensorEntry]  # a v2 manifest read in part: validated when asked for
    objects: dict[str, Any]
    tree: Any
    user_metadata: dict[str, str] = field(default_factory=dict)
    format_version: int = 1  # 2: written as lines, read in part (FORMAT.md 4.8); 3: v2 with content hashes
    content_hash: str | None = None  # CONTENT_HASH where the shards record their hashes (format v3)
    _json: bytes | None = field(default=None, init=False, repr=False, compare=False)  # as parsed

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    @property
    def partial(self) -> bool:
        """A v2 manifest read in part: its tree and tensor entries are checked as they are used."""
        from ckpt.format._manifest_pages import LazyTensors

        return isinstance(self.tensors, LazyTensors) and not self.tensors.loaded

    def entries(self, keys: Iterable[str]) -> dict[str, TensorEntry]:
        """The entries of ``keys``, validated (a v2 manifest read in part reads just their pages;
        all its keys: every check of a whole manifest)."""
        from ckpt.format._manifest_pages import LazyTensors

        if isinstance(self.tensors, LazyTensors):
            return self.tensors.load(keys)
        return {k: self.tensors[k] for k in keys}

    def to_json(self) -> bytes:
        """The sealed manifest file (for a parsed manifest, the exact bytes it was parsed from)."""
        if self._json is not None:
            return self._json
        if self.format_version >= 2:
            from ckpt.format._manifest_pages import encode

            return encode(self.fields())[0]
        return seal(self.fields())

    def fields(self) -> dict[str, Any]:
        """The manifest as the JSON value it is written as (unsealed)."""
        paths = tuple(self.files)
        index = {p: i for i, p in enumerate(paths)}
        out = {
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
        if self.content_hash is not None:
            out["content_hash"] = self.content_hash
        return out


def _tensor_json(t: TensorEntry, index: dict[str, int], paths: tuple[str, ...]) -> dict[str, Any]:
    s = t.shards
    shards: dict[str, Any] = {
        "file": s.global_file_index(index, paths).tolist(),
        "offsets": s.offsets.ravel().tolist(),
        "sizes": s.sizes.ravel().tolist(),
        "byte_range": s.byte_range.ravel().tolist(),
        "crc32c": s.crc32c.tolist(),
    }
    if s.hashes is not None:
        shards["hash"] = list(s.hashes)
    return {"dtype": t.dtype, "shape": list(t.shape), "shards": shards}

# --- paths and the seal ------------------------------------------------------------------------------------

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
    return sealed(fields)[0]


def sealed(fields: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """:func:`seal`'s bytes, and the JSON value they hold (``fields`` with the seal)."""
    body = {k: v for k, v in fields.items() if k != MANIFEST_CRC_FIELD}
    body[MANIFEST_CRC_FIELD] = "00000000"
    raw = strictjson.dumps(body)
    at = raw.rindex(_CRC_MARK) + len(_CRC_MARK)
    body[MANIFEST_CRC_FIELD] = f"{crc32c.crc32c(raw):08x}"
    return raw[:at] + body[MANIFEST_CRC_FIELD].encode() + raw[at + 8 :], body


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



def validated(m: Manifest, *, where: str) -> Manifest:
    """``m`` sealed and validated exactly as :func:`parse` validates what it reads (every check,
    on the very value the bytes were serialized from, so no JSON decode): a writer's manifest
    before it is committed. The result keeps the bytes to write (:meth:`Manifest.to_json`)."""
    from ckpt.format import _manifest_parse

    fields = m.fields()
    if m.format_version >= 2:
        from ckpt.format._manifest_pages import encode

        data, head, tensors = encode(fields)
    else:
        data, obj = sealed(fields)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestTooLargeError(f"{where}: {len(data)} bytes is over the {MAX_MANIFEST_BYTES}-byte cap")
    if m.format_version >= 2:
        return _manifest_parse.validate_v2(head, tensors, fields["objects"], fields["tree"], data, where=where,
                                           built=m.tensors)  # fmt: skip
    return _manifest_parse.validate(obj, data, where=where, expected_step=None)


def parse(data: bytes, *, where: str, expected_step: int | None = None, lazy: bool = False) -> Manifest:
    """Parse and validate manifest bytes read from ``where`` (see ``ckpt.format._manifest_parse``);
    ``lazy``: a v2 manifest's tensor entries are validated when asked for (:meth:`Manifest.entries`)."""
    from ckpt.format import _manifest_parse  # the parser builds this module's model

    return _manifest_parse.parse(
        data, where=where, expected_step=expected_step, max_bytes=MAX_MANIFEST_BYTES, lazy=lazy
    )


def is_paged(data: bytes | bytearray) -> bool:
    """Whether manifest bytes (or their start) are written in lines, format v2 on (4.8)."""
    from ckpt.format import _manifest_parse

    return _manifest_parse.is_paged(data)


def parse_head(data: bytes, *, where: str, expected_step: int | None = None) -> Head:
    """The head of manifest bytes: a v2 manifest's head alone (its body is not decoded)."""
    from ckpt.format import _manifest_parse

    return _manifest_parse.parse_head(data, where=where, expected_step=expected_step, max_bytes=MAX_MANIFEST_BYTES)


__all__ = [
    "CHECKSUM_ALGORITHM",
    "CONTENT_HASH",
    "FORMAT_VERSION",
    "HASH_HEX_DIGITS",
    "I64",
    "MANIFEST_CRC_FIELD",
    "MAX_CORNERS",
    "MAX_MANIFEST_BYTES",
    "MAX_NDIM",
    "MAX_NESTING",
    "MAX_PAIR_CHECKS",
    "MAX_PATH_BYTES",
    "MAX_TENSOR_BYTES",
    "SHARD_COLUMNS",
    "SHARD_FORMAT_VERSION",
    "SMALL_TILING",
    "CoverageProblem",
    "FileEntry",
    "Head",
    "Manifest",
    "ShardEntry",
    "ShardTable",
    "TensorEntry",
    "block_counts",
    "check_path",
    "coverage_problem",
    "parse",
    "parse_head",
    "seal",
    "sealed",
    "validated",
]  # fmt: skip
