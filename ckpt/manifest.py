"""The manifest: the single commit record of a checkpoint, and its strict parser.

``steps/<step:012d>/manifest.json`` is versioned JSON (see docs/FORMAT.md). :func:`parse`
validates everything before anything is allocated or read: types, caps, path grammar, byte
ranges, shard coverage and checksum metadata. Unknown fields are rejected; a newer
``format_version`` is refused.

Pure (no I/O).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

import crc32c

from ckpt import dtypes, regions, strictjson, tree
from ckpt.errors import (
    IntegrityMetadataError,
    InvalidByteRangeError,
    ManifestChecksumError,
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
from ckpt.ranges import ByteRange, find_overlaps

FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 30  # 1 GiB: a million shard entries fit; a hostile file does not
MAX_NDIM = 64
MAX_TENSOR_BYTES = 1 << 50  # 1 PiB: no real tensor, no wrapped arithmetic
MAX_PATH_BYTES = 1024
MAX_NESTING = tree.MAX_NESTING  # JSON levels inside ``tree`` and each object: real states nest ~10
MAX_CORNERS = 1 << 22  # shard coverage: corners the corner test may visit per tensor
MAX_PAIR_CHECKS = 1_000_000  # shard coverage: steps the overlap search may take per tensor
CHECKSUM_ALGORITHM = "crc32c"
_U63 = 2**63
_PATH_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
_TOP_FIELDS = {
    "format_version", "step", "attempt", "created", "world_size", "user_metadata",
    "checksum_algorithm", "block_bytes", "files", "tensors", "objects", "tree", "manifest_crc32c",
}  # fmt: skip
_ATTEMPT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


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


@dataclass(frozen=True, slots=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    shards: tuple[ShardEntry, ...]

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

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> bytes:
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
                "files": {p: {"size": f.size, "crc32c": f.crc32c} for p, f in self.files.items()},
                "tensors": {k: _tensor_json(t) for k, t in self.tensors.items()},
                "objects": self.objects,
                "tree": self.tree,
            }
        )


def _tensor_json(t: TensorEntry) -> dict[str, Any]:
    return {
        "dtype": t.dtype,
        "shape": list(t.shape),
        "shards": [
            {
                "file": s.file,
                "offsets": list(s.offsets),
                "sizes": list(s.sizes),
                "byte_range": [s.byte_range.start, s.byte_range.end],
                "crc32c": list(s.crc32c),
            }
            for s in t.shards
        ],
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
        raise IntegrityMetadataError(f"{where}: {MANIFEST_CRC_FIELD} is not written as its last member")
    actual = crc32c.crc32c(data[:at] + b"00000000" + data[at + 8 :])
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
    return Manifest(
        step=step, attempt=attempt, created=obj["created"], world_size=world_size,
        block_bytes=block_bytes, files=files, tensors=tensors, objects=objects,
        tree=obj["tree"], user_metadata=meta, format_version=version,
    )  # fmt: skip


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


def _files(raw: object, where: str) -> dict[str, FileEntry]:
    if not isinstance(raw, dict):
        raise ManifestSchemaError(f"{where}: files must be a JSON object, found {_show(raw)}")
    out: dict[str, FileEntry] = {}
    folded: dict[str, str] = {}
    for path, info in raw.items():
        check_path(path, where=f"{where}: files")
        other = folded.setdefault(path.lower(), path)  # the grammar is ASCII: lower() is case folding
        if other != path:
            raise UnsafePathError(
                f"{where}: file paths {other!r} and {path!r} differ only in case; they would be "
                "one file on a case-insensitive store"
            )
        at = f"{where}: file {path!r}"
        if not isinstance(info, dict) or "size" not in info or not set(info) <= {"size", "crc32c"}:
            raise ManifestSchemaError(f"{at}: expected exactly the fields crc32c, size; found {_fields(info)}")
        if "crc32c" not in info:
            raise IntegrityMetadataError(f"{at}: no crc32c checksum; verification needs one (fail closed)")
        size = _int(info["size"], f"{at}: size")
        crc = info["crc32c"]
        if type(crc) is not int or not 0 <= crc < 2**32:
            raise IntegrityMetadataError(f"{at}: crc32c {_show(crc, 40)} is not a 32-bit unsigned integer")
        out[path] = FileEntry(size, crc)
    return out


def _tensors(raw: object, files: dict[str, FileEntry], block_bytes: int, where: str) -> dict[str, TensorEntry]:
    if not isinstance(raw, dict):
        raise ManifestSchemaError(f"{where}: tensors must be a JSON object, found {_show(raw)}")
    out: dict[str, TensorEntry] = {}
    by_file: dict[str, list[tuple[ByteRange, str]]] = {}
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
        if not isinstance(info["shards"], list) or not info["shards"]:
            raise ManifestSchemaError(f"{at}: shards must be a non-empty list, found {_show(info['shards'])}")
        shards = tuple(_shard(s, shape, dt, files, block_bytes, at) for s in info["shards"])
        _check_coverage(shape, shards, at)
        for s in shards:
            by_file.setdefault(s.file, []).append((s.byte_range, key))
        out[key] = TensorEntry(dt.code, shape, shards)
    for path, items in by_file.items():
        pairs = find_overlaps([r for r, _ in items])
        if pairs:
            (r1, k1), (r2, k2) = items[pairs[0][0]], items[pairs[0][1]]
            raise OverlappingRangesError(
                f"{where}: file {path!r}: byte ranges of {k1[:200]!r} [{r1.start}, {r1.end}) and "
                f"{k2[:200]!r} [{r2.start}, {r2.end}) overlap (two entries alias the same bytes)"
            )
    return out


_SHARD_FIELDS = frozenset({"file", "offsets", "sizes", "byte_range", "crc32c"})


def _shard(s: object, shape: tuple[int, ...], dt: dtypes.DType, files: dict[str, FileEntry],
           block_bytes: int, at: str) -> ShardEntry:  # fmt: skip
    if not isinstance(s, dict) or set(s) | {"crc32c"} != _SHARD_FIELDS:
        raise ManifestSchemaError(f"{at}: each shard needs exactly the fields {sorted(_SHARD_FIELDS)}; found {_fields(s)}")
    path = check_path(s["file"], where=f"{at}: shard")
    if path not in files:
        raise ManifestSchemaError(f"{at}: shard file {path!r} is not listed in files")
    if "crc32c" not in s:
        raise IntegrityMetadataError(f"{at}: the shard in {path!r} has no crc32c checksums; verification needs them (fail closed)")
    offsets = _int_list(s["offsets"], f"{at}: offsets", len(shape))
    sizes = _int_list(s["sizes"], f"{at}: sizes", len(shape))
    if not regions.Box(offsets, sizes).within(shape):
        raise ShardCoverageError(
            f"{at}: a shard at offsets {list(offsets)} with sizes {list(sizes)} exceeds the shape {list(shape)}"
        )
    br = s["byte_range"]
    if not (isinstance(br, list) and len(br) == 2 and all(type(v) is int for v in br)):
        raise InvalidByteRangeError(f"{at}: byte_range {_show(br)} is not two integers [start, end)")
    start, end = br
    size = files[path].size
    if not 0 <= start <= end <= size:
        raise InvalidByteRangeError(
            f"{at}: byte_range [{_show(start, 30)}, {_show(end, 30)}) in {path!r} is invalid; expected "
            f"0 <= start <= end <= {size}, the file's size"
        )
    need = math.prod(sizes) * dt.itemsize
    if end - start != need:
        raise TensorSizeError(
            f"{at}: byte_range [{start}, {end}) in {path!r} holds {end - start} bytes; "
            f"sizes {list(sizes)} of {dt.code} need {need}"
        )
    crcs = s["crc32c"]
    n_blocks = -(-need // block_bytes)
    if not isinstance(crcs, list) or len(crcs) != n_blocks or not all(
        type(c) is int and 0 <= c < 2**32 for c in crcs
    ):
        raise IntegrityMetadataError(
            f"{at}: the shard in {path!r} needs {n_blocks} crc32c values (one per {block_bytes}-byte "
            f"block, each a 32-bit unsigned integer), found {_show(crcs)}"
        )
    return ShardEntry(path, offsets, sizes, ByteRange(start, end), tuple(crcs))


def _check_coverage(shape: tuple[int, ...], shards: tuple[ShardEntry, ...], at: str) -> None:
    """The shards must tile the shape exactly: no overlap, no gap (they are within it already).

    Linear or n log n on every layout people use: only the dimensions that some shard splits
    matter; with one such dimension the shards are intervals; with more, the corner test below.
    """
    total = math.prod(shape)
    live = [s for s in shards if math.prod(s.sizes)]  # a zero-size shard covers nothing
    covered = sum(math.prod(s.sizes) for s in live)
    split = [d for d in range(len(shape)) if any(s.sizes[d] != shape[d] for s in live)]
    if not split:  # every shard that holds data is the whole tensor
        if len(live) > 1:
            raise _overlap(live[0], live[1], at)
    elif len(split) == 1:
        d = split[0]
        pos, prev = 0, live[0]
        for s in sorted(live, key=lambda s: s.offsets[d]):
            if s.offsets[d] < pos:
                raise _overlap(prev, s, at)
            if s.offsets[d] > pos:
                break  # a gap: reported below
            pos, prev = pos + s.sizes[d], s
    elif covered != total or len(live) << len(split) > MAX_CORNERS or not _corners_tile(shape, live, split):
        pair, complete = _find_overlap(live, split)
        if pair is not None:
            raise _overlap(*pair, at)
        if covered == total and not complete:  # no proof either way: fail closed
            raise ShardCoverageError(
                f"{at}: {len(live)} shards split along {len(split)} dimensions do not tile the shape "
                f"{list(shape)} exactly, or are too irregular to check within {MAX_PAIR_CHECKS} steps"
            )
    if covered != total:
        raise ShardCoverageError(f"{at}: the shards cover {covered} of {total} elements (gaps); each element must be stored once")


def _corners_tile(shape: tuple[int, ...], live: list[ShardEntry], dims: list[int]) -> bool:
    """Whether boxes inside ``shape`` whose volumes sum to its volume tile it exactly.

    Mod 2, the discrete mixed difference of a box's indicator is its set of corners, and the
    difference operator is invertible. So if the corners of all boxes, XOR-ed, are exactly the
    corners of the whole shape, every element is covered an odd number of times; with the
    volumes adding up, exactly once. Only the split dimensions ``dims`` need to be looked at.
    """
    odd: set[tuple[int, ...]] = set()
    for s in live:
        odd.symmetric_difference_update(
            itertools.product(*((s.offsets[d], s.offsets[d] + s.sizes[d]) for d in dims))
        )
    return odd == set(itertools.product(*((0, shape[d]) for d in dims)))


def _find_overlap(live: list[ShardEntry], dims: list[int]) -> tuple[tuple[ShardEntry, ShardEntry] | None, bool]:
    """Two overlapping shards, or None; and whether the search was complete (within budget).

    Slab sweep: along ``dims[0]``, between consecutive cut points the same shards are present,
    and two of them overlap only if their projections on the other dimensions overlap in some
    slab (recursively; one dimension left is a sort). Linear-ish on grids; budgeted otherwise.
    """
    budget = [MAX_PAIR_CHECKS]
    pair = _overlap_in(live, dims, budget)
    return pair, budget[0] >= 0


def _overlap_in(
    boxes: list[ShardEntry], dims: list[int], budget: list[int]
) -> tuple[ShardEntry, ShardEntry] | None:
    budget[0] -= len(boxes)
    if budget[0] < 0:
        return None
    d, rest = dims[0], dims[1:]
    order = sorted(boxes, key=lambda s: s.offsets[d])
    if not rest:
        holder, reach = order[0], -1
        for s in order:
            if s.offsets[d] < reach:
                return holder, s
            if s.offsets[d] + s.sizes[d] > reach:
                holder, reach = s, s.offsets[d] + s.sizes[d]
        return None
    cuts = sorted({s.offsets[d] for s in boxes} | {s.offsets[d] + s.sizes[d] for s in boxes})
    active: list[ShardEntry] = []
    i = 0
    for cut in cuts[:-1]:
        active = [s for s in active if s.offsets[d] + s.sizes[d] > cut]
        while i < len(order) and order[i].offsets[d] == cut:
            active.append(order[i])
            i += 1
        if len(active) > 1:
            pair = _overlap_in(active, rest, budget)
            if pair is not None or budget[0] < 0:
                return pair
    return None


def _overlap(a: ShardEntry, b: ShardEntry, at: str) -> ShardCoverageError:
    return ShardCoverageError(
        f"{at}: the shard at offsets {list(a.offsets)} with sizes {list(a.sizes)} and the shard at "
        f"offsets {list(b.offsets)} with sizes {list(b.sizes)} overlap; each element must be stored once"
    )


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
