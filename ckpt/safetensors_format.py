"""The safetensors container: header encoding (byte-identical to the reference writer) and a
strict header parser.

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON padded with spaces to a
multiple of 8, then the tensor data. The reference writer orders tensors by dtype (see
``dtypes.DType.rank``, larger first) then by name, and puts ``__metadata__`` first.

Pure (no I/O).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ckpt import dtypes, strictjson
from ckpt.errors import HeaderError

MAX_HEADER_BYTES = 16 << 20  # 16 MiB: far above any real header, far below an allocation risk
_PREFIX = 8  # the u64 header length


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    begin: int  # data_offsets, relative to the end of the header
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True, slots=True)
class Header:
    entries: tuple[Entry, ...]  # in file order
    metadata: dict[str, str]
    data_start: int  # absolute offset of the data section (8 + N)

    @property
    def file_size(self) -> int:
        return self.data_start + (self.entries[-1].end if self.entries else 0)


def layout_order(items: Sequence[tuple[str, str]]) -> list[int]:
    """Indices of ``(name, dtype_code)`` items in the reference writer's file order."""
    return sorted(range(len(items)), key=lambda i: (-dtypes.BY_CODE[items[i][1]].rank, items[i][0]))


def encode(
    items: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None
) -> Header:
    """Lay out ``(name, dtype_code, shape)`` items as the reference writer does.

    Returns the header with entries in file order; :func:`header_bytes` gives the bytes.
    """
    order = layout_order([(n, d) for n, d, _ in items])
    entries: list[Entry] = []
    pos = 0
    for i in order:
        name, code, shape = items[i]
        nbytes = math.prod(shape) * dtypes.BY_CODE[code].itemsize
        entries.append(Entry(name, code, tuple(shape), pos, pos + nbytes))
        pos += nbytes
    meta = dict(sorted((metadata or {}).items()))
    raw = _json_bytes(entries, meta)
    return Header(tuple(entries), meta, _PREFIX + len(raw))


def header_bytes(h: Header) -> bytes:
    raw = _json_bytes(list(h.entries), h.metadata)
    return struct.pack("<Q", len(raw)) + raw


def _json_bytes(entries: list[Entry], meta: dict[str, str]) -> bytes:
    obj: dict[str, object] = {}
    if meta:
        obj["__metadata__"] = meta
    for e in entries:
        obj[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = strictjson.dumps(obj)
    return raw + b" " * (-len(raw) % 8)


def header_length(prefix: bytes, *, file_size: int, where: str) -> int:
    """Validate the 8-byte prefix; return N, the JSON header length."""
    if file_size < _PREFIX or len(prefix) < _PREFIX:
        raise HeaderError(f"{where}: {file_size} bytes is too small for a safetensors file")
    (n,) = struct.unpack("<Q", prefix[:_PREFIX])
    if n > MAX_HEADER_BYTES or n > file_size - _PREFIX:
        raise HeaderError(
            f"{where}: header length {n} exceeds the file ({file_size} bytes) "
            f"or the {MAX_HEADER_BYTES}-byte cap; not a safetensors file?"
        )
    return int(n)


def parse(buf: bytes, *, file_size: int, where: str) -> Header:
    """Parse and fully validate a header from the first ``8 + N`` bytes of a file."""
    n = header_length(buf, file_size=file_size, where=where)
    raw = buf[_PREFIX : _PREFIX + n]
    if len(raw) != n:
        raise HeaderError(f"{where}: header truncated ({len(raw)} of {n} bytes)")
    if not raw.lstrip(b" \t\r\n").startswith(b"{"):
        raise HeaderError(f"{where}: header is not a JSON object; not a safetensors file")
    obj = strictjson.loads(raw, what=f"{where} header", error=HeaderError, max_bytes=MAX_HEADER_BYTES)
    if not isinstance(obj, dict):
        raise HeaderError(f"{where}: header is not a JSON object")
    meta = obj.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise HeaderError(f"{where}: __metadata__ must map strings to strings")
    entries: list[Entry] = []
    for name, info in obj.items():
        entries.append(_entry(name, info, where))
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = 0
    for e in entries:
        if e.begin != pos:
            raise HeaderError(
                f"{where}: tensor {e.name!r} data_offsets start at {e.begin}, expected {pos} "
                "(gap or overlap)"
            )
        pos = e.end
    data_start = _PREFIX + n
    if data_start + pos != file_size:
        raise HeaderError(
            f"{where}: data section ends at {data_start + pos} but the file has {file_size} bytes"
        )
    return Header(tuple(entries), meta, data_start)


def _entry(name: str, info: object, where: str) -> Entry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise HeaderError(f"{where}: tensor {name!r}: expected keys dtype, shape, data_offsets")
    try:
        dt = dtypes.from_code(info["dtype"], where=f"{where}: tensor {name!r}")
    except Exception as err:
        raise HeaderError(str(err)) from None
    shape, offs = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**63 for d in shape):
        raise HeaderError(f"{where}: tensor {name!r}: shape {shape!r} is not a list of non-negative ints")
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int and 0 <= o < 2**63 for o in offs)):
        raise HeaderError(f"{where}: tensor {name!r}: data_offsets {offs!r} are not two non-negative ints")
    begin, end = offs
    if end < begin or end - begin != math.prod(shape) * dt.itemsize:
        raise HeaderError(
            f"{where}: tensor {name!r}: data_offsets {offs} hold {end - begin} bytes, "
            f"shape {shape} of {dt.code} needs {math.prod(shape) * dt.itemsize}"
        )
    return Entry(name, dt.code, tuple(shape), begin, end)
