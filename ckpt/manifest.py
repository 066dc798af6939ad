"""The manifest: the single commit record of a checkpoint, and its strict parser.

``steps/<step:012d>/manifest.json`` is versioned JSON (see docs/FORMAT.md). :func:`parse`
validates everything before anything is allocated or read: types, caps, path grammar, byte
ranges, shard coverage and checksum metadata. Unknown fields are rejected; a newer
``format_version`` is refused.

Pure (no I/O).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ckpt import dtypes, regions, strictjson, tree
from ckpt.errors import (
    IntegrityMetadataError,
    InvalidByteRangeError,
    ManifestLocationError,
    ManifestParseError,
    ManifestSchemaError,
    ManifestTooLargeError,
    OverlappingRangesError,
    ShardCoverageError,
    TensorSizeError,
    UnsafePathError,
    UnsupportedFormatError,
)
from ckpt.ranges import ByteRange, find_overlaps

FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 30  # 1 GiB: a million shard entries fit; a hostile file does not
MAX_NDIM = 64
MAX_TENSOR_BYTES = 1 << 50  # 1 PiB: no real tensor, no wrapped arithmetic
MAX_PATH_BYTES = 1024
CHECKSUM_ALGORITHM = "crc32c"
_U63 = 2**63
_PATH_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
_TOP_FIELDS = {
    "format_version", "step", "attempt", "created", "world_size", "user_metadata",
    "checksum_algorithm", "block_bytes", "files", "tensors", "objects", "tree",
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
        return strictjson.dumps(
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


def check_path(path: object, *, where: str) -> str:
    """A stored path must be relative, plain ASCII segments, with no way out of the root."""
    if not isinstance(path, str) or len(path.encode()) > MAX_PATH_BYTES or not _PATH_RE.fullmatch(path):
        raise UnsafePathError(
            f"{where}: unsafe file path {str(path)[:120]!r}; expected a relative path of "
            "[A-Za-z0-9._-] segments, none starting with '.', at most 1024 bytes"
        )
    return path


def parse(data: bytes, *, where: str, expected_step: int | None = None) -> Manifest:
    """Parse and validate manifest bytes read from ``where``."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestTooLargeError(f"{where}: {len(data)} bytes is over the {MAX_MANIFEST_BYTES}-byte cap")
    obj = strictjson.loads(data, what=where, error=ManifestParseError, max_bytes=MAX_MANIFEST_BYTES)
    if not isinstance(obj, dict):
        raise ManifestSchemaError(f"{where}: the manifest must be a JSON object")
    version = obj.get("format_version")
    if type(version) is not int:
        raise UnsupportedFormatError(f"{where}: format_version is missing or not an integer: {version!r}")
    if version > FORMAT_VERSION or version < 1:
        raise UnsupportedFormatError(
            f"{where}: format_version {version} is not supported by this ckpt, which reads "
            f"versions 1..{FORMAT_VERSION}; upgrade ckpt to read it"
        )
    missing = sorted(_TOP_FIELDS - obj.keys())
    unknown = sorted(obj.keys() - _TOP_FIELDS)
    if missing or unknown:
        raise ManifestSchemaError(f"{where}: missing fields {missing}, unknown fields {unknown}")
    step = _int(obj["step"], f"{where}: step")
    if expected_step is not None and step != expected_step:
        raise ManifestLocationError(f"{where}: manifest says step {step} but was found at step {expected_step}")
    attempt = obj["attempt"]
    if not isinstance(attempt, str) or not _ATTEMPT_RE.fullmatch(attempt):
        raise ManifestSchemaError(f"{where}: attempt {attempt!r} is not a short [A-Za-z0-9_-] id")
    if not isinstance(obj["created"], str):
        raise ManifestSchemaError(f"{where}: created must be a string")
    world_size = _int(obj["world_size"], f"{where}: world_size", lo=1)
    meta = obj["user_metadata"]
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ManifestSchemaError(f"{where}: user_metadata must map strings to strings")
    if obj["checksum_algorithm"] != CHECKSUM_ALGORITHM:
        raise IntegrityMetadataError(
            f"{where}: checksum_algorithm {obj['checksum_algorithm']!r} is unknown; expected 'crc32c'"
        )
    block_bytes = _int(obj["block_bytes"], f"{where}: block_bytes", lo=1)
    files = _files(obj["files"], where)
    tensors = _tensors(obj["tensors"], files, block_bytes, where)
    objects = obj["objects"]
    if not isinstance(objects, dict):
        raise ManifestSchemaError(f"{where}: objects must be a JSON object")
    for k, v in objects.items():
        tree.decode_value(v, f"{where}: object {k!r}")
    _check_tree(obj["tree"], tensors, objects, where)
    return Manifest(
        step=step, attempt=attempt, created=obj["created"], world_size=world_size,
        block_bytes=block_bytes, files=files, tensors=tensors, objects=objects,
        tree=obj["tree"], user_metadata=meta, format_version=version,
    )  # fmt: skip


def _int(x: object, where: str, *, lo: int = 0, hi: int = _U63) -> int:
    if type(x) is not int or not lo <= x < hi:
        raise ManifestSchemaError(f"{where}: expected an integer in [{lo}, {hi}), found {str(x)[:40]!r}")
    return x


def _int_list(x: object, where: str, n: int | None = None) -> tuple[int, ...]:
    if not isinstance(x, list) or (n is not None and len(x) != n) or len(x) > MAX_NDIM:
        raise ManifestSchemaError(f"{where}: expected a list of {n if n is not None else '<=64'} integers")
    return tuple(_int(v, where) for v in x)


def _files(raw: object, where: str) -> dict[str, FileEntry]:
    if not isinstance(raw, dict):
        raise ManifestSchemaError(f"{where}: files must be a JSON object")
    out: dict[str, FileEntry] = {}
    folded: set[str] = set()
    for path, info in raw.items():
        check_path(path, where=where)
        if path.lower() in folded:
            raise UnsafePathError(f"{where}: file path {path!r} collides with another one case-insensitively")
        folded.add(path.lower())
        if not isinstance(info, dict) or set(info) != {"size", "crc32c"}:
            raise ManifestSchemaError(f"{where}: file {path!r}: expected fields size, crc32c")
        size = _int(info["size"], f"{where}: file {path!r} size")
        crc = info["crc32c"]
        if type(crc) is not int or not 0 <= crc < 2**32:
            raise IntegrityMetadataError(f"{where}: file {path!r}: crc32c {crc!r} is not a 32-bit unsigned int")
        out[path] = FileEntry(size, crc)
    return out


def _tensors(raw: object, files: dict[str, FileEntry], block_bytes: int, where: str) -> dict[str, TensorEntry]:
    if not isinstance(raw, dict):
        raise ManifestSchemaError(f"{where}: tensors must be a JSON object")
    out: dict[str, TensorEntry] = {}
    by_file: dict[str, list[tuple[ByteRange, str]]] = {}
    for key, info in raw.items():
        at = f"{where}: tensor {key!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "shards"}:
            raise ManifestSchemaError(f"{at}: expected fields dtype, shape, shards")
        dt = dtypes.from_code(info["dtype"], where=at)
        shape = _int_list(info["shape"], f"{at} shape")
        if math.prod(shape) * dt.itemsize > MAX_TENSOR_BYTES:
            raise TensorSizeError(f"{at}: shape {list(shape)} of {dt.code} is over the {MAX_TENSOR_BYTES}-byte cap")
        if not isinstance(info["shards"], list) or not info["shards"]:
            raise ManifestSchemaError(f"{at}: shards must be a non-empty list")
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
                f"{where}: file {path!r}: byte ranges of {k1!r} [{r1.start}, {r1.end}) and "
                f"{k2!r} [{r2.start}, {r2.end}) overlap"
            )
    return out


def _shard(s: object, shape: tuple[int, ...], dt: dtypes.DType, files: dict[str, FileEntry],
           block_bytes: int, at: str) -> ShardEntry:  # fmt: skip
    fields = {"file", "offsets", "sizes", "byte_range", "crc32c"}
    if not isinstance(s, dict) or set(s) != fields:
        raise ManifestSchemaError(f"{at}: each shard needs exactly the fields {sorted(fields)}")
    path = check_path(s["file"], where=at)
    if path not in files:
        raise ManifestSchemaError(f"{at}: shard file {path!r} is not listed in files")
    offsets = _int_list(s["offsets"], f"{at} offsets", len(shape))
    sizes = _int_list(s["sizes"], f"{at} sizes", len(shape))
    if not regions.Box(offsets, sizes).within(shape):
        raise ShardCoverageError(f"{at}: shard at {list(offsets)} of size {list(sizes)} exceeds shape {list(shape)}")
    br = s["byte_range"]
    if not (isinstance(br, list) and len(br) == 2 and all(type(v) is int for v in br)):
        raise InvalidByteRangeError(f"{at}: byte_range {str(br)[:60]} is not two integers")
    start, end = br
    if not 0 <= start <= end <= files[path].size:
        raise InvalidByteRangeError(
            f"{at}: byte_range [{start}, {end}) is invalid or beyond file {path!r} of {files[path].size} bytes"
        )
    need = math.prod(sizes) * dt.itemsize
    if end - start != need:
        raise TensorSizeError(f"{at}: byte_range holds {end - start} bytes, sizes {list(sizes)} of {dt.code} need {need}")
    crcs = s["crc32c"]
    n_blocks = -(-need // block_bytes)
    if not isinstance(crcs, list) or len(crcs) != n_blocks or not all(
        type(c) is int and 0 <= c < 2**32 for c in crcs
    ):
        raise IntegrityMetadataError(
            f"{at}: shard in {path!r} needs {n_blocks} crc32c values (32-bit unsigned ints), found {str(crcs)[:60]}"
        )
    return ShardEntry(path, offsets, sizes, ByteRange(start, end), tuple(crcs))


def _check_coverage(shape: tuple[int, ...], shards: tuple[ShardEntry, ...], at: str) -> None:
    total = math.prod(shape)
    covered = sum(math.prod(s.sizes) for s in shards)
    if len(shards) > 1:
        order = sorted(range(len(shards)), key=lambda i: shards[i].offsets)
        for a_pos, i in enumerate(order):
            a = shards[i]
            for j in order[a_pos + 1 :]:
                b = shards[j]
                if shape and b.offsets[0] >= a.offsets[0] + a.sizes[0]:
                    break  # sorted by first offset: no later shard reaches back into a
                if math.prod(a.sizes) and math.prod(b.sizes) and regions.intersect(a.box, b.box):
                    raise ShardCoverageError(f"{at}: shards at {list(a.offsets)} and {list(b.offsets)} overlap")
    if covered != total:
        raise ShardCoverageError(f"{at}: shards cover {covered} of {total} elements (gaps)")


def _check_tree(node: object, tensors: dict[str, TensorEntry], objects: dict[str, Any], where: str) -> None:
    seen: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, dict) or not n:
            raise ManifestSchemaError(f"{where}: malformed tree node {str(n)[:80]!r}")
        kind, body = next(iter(n.items()))
        extra = set(n) - {kind}
        if extra - ({"metadata"} if kind == "odict" else set()):
            raise ManifestSchemaError(f"{where}: unknown fields {sorted(extra)} in a {kind!r} tree node")
        if "metadata" in n:
            tree.decode_value(n["metadata"], f"{where}: tree metadata")
        if kind in ("tensor", "ndarray", "object"):
            pool: dict[str, Any] = objects if kind == "object" else tensors
            if not isinstance(body, str) or body not in pool or body in seen:
                raise ManifestSchemaError(f"{where}: tree references {kind} {body!r} that is missing or repeated")
            seen.add(body)
        elif kind in ("list", "tuple") and isinstance(body, list):
            stack.extend(body)
        elif kind in ("dict", "odict") and isinstance(body, list):
            for pair in body:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise ManifestSchemaError(f"{where}: malformed dict entry in tree")
                stack.append(pair[1])
        else:
            raise ManifestSchemaError(f"{where}: unknown tree node kind {kind!r}")
    unreferenced = (tensors.keys() | objects.keys()) - seen
    if unreferenced:
        raise ManifestSchemaError(f"{where}: keys {sorted(unreferenced)[:5]} are not referenced by the tree")
