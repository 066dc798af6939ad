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
from dataclasses import dataclass, field

from ckpt.errors import HeaderError, NotSafetensorsError
from ckpt.format import dtypes, strictjson

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
    metadata: dict[str, str] | None  # None: no ``__metadata__`` (or ``null``); ``{}`` is written
    data_start: int  # absolute offset of the data section (8 + N)
    raw: bytes | None = field(default=None, compare=False, repr=False)  # the JSON, as encode() made it

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
    ``metadata=None`` writes no ``__metadata__``; ``{}`` writes an empty one, as the reference does.
    """
    order = layout_order([(n, d) for n, d, _ in items])
    entries: list[Entry] = []
    pos = 0
    for i in order:
        name, code, shape = items[i]
        nbytes = math.prod(shape) * dtypes.BY_CODE[code].itemsize
        entries.append(Entry(name, code, tuple(shape), pos, pos + nbytes))
        pos += nbytes
    meta = None if metadata is None else dict(sorted(metadata.items()))
    raw = _json_bytes(entries, meta)
    return Header(tuple(entries), meta, _PREFIX + len(raw), raw)


def header_bytes(h: Header) -> bytes:
    raw = h.raw if h.raw is not None else _json_bytes(list(h.entries), h.metadata)
    return struct.pack("<Q", len(raw)) + raw


def _json_bytes(entries: list[Entry], meta: dict[str, str] | None) -> bytes:
    obj: dict[str, object] = {}
    if meta is not None:
        obj["__metadata__"] = meta
    for e in entries:
        obj[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = strictjson.dumps(obj)
    return raw + b" " * (-len(raw) % 8)


_MAGIC = (  # formats people put where weights go; named in the message, never loaded
    (b"PK\x03\x04", "a zip archive (torch.save writes these)"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"\x93NUMPY", "a NumPy .npy file"),
    (b"\x1f\x8b", "a gzip stream"),
)


def _looks_like(prefix: bytes) -> str:
    for magic, name in _MAGIC:
        if prefix.startswith(magic):
            return f"; it looks like {name}"
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return f"; it looks like pickled Python data (protocol {prefix[1]})"
    return ""


def header_length(prefix: bytes, *, file_size: int, where: str) -> int:
    """Validate the 8-byte prefix; return N, the JSON header length."""
    if file_size < _PREFIX or len(prefix) < _PREFIX:
        raise NotSafetensorsError(
            f"{where}: {file_size} bytes is too small for a safetensors file (at least 8 needed)"
            + _looks_like(prefix)
        )
    (n,) = struct.unpack("<Q", prefix[:_PREFIX])
    if n > MAX_HEADER_BYTES or n > file_size - _PREFIX:
        raise NotSafetensorsError(
            f"{where}: header length {n} exceeds the file ({file_size} bytes) or the "
            f"{MAX_HEADER_BYTES}-byte cap; not a safetensors file, or truncated" + _looks_like(prefix)
        )
    return int(n)


def parse(buf: bytes, *, file_size: int, where: str) -> Header:
    """Parse and fully validate a header from the first ``8 + N`` bytes of a file."""
    n = header_length(buf, file_size=file_size, where=where)
    raw = buf[_PREFIX : _PREFIX + n]
    if len(raw) != n:
        raise HeaderError(f"{where}: header truncated ({len(raw)} of {n} bytes)")
    if not raw.lstrip(b" \t\r\n").startswith(b"{"):
        raise NotSafetensorsError(
            f"{where}: the header does not start with '{{' (found {strictjson.show(raw[:16].decode('latin-1'))}); "
            "not a safetensors file" + _looks_like(buf[:_PREFIX])
        )
    obj = strictjson.loads(raw, what=f"{where}: header", error=HeaderError, max_bytes=MAX_HEADER_BYTES)
    if not isinstance(obj, dict):
        raise HeaderError(f"{where}: header is not a JSON object")
    meta = obj.pop("__metadata__", None)  # the reference reads a missing or null one as "none"
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise HeaderError(f"{where}: __metadata__ must map strings to strings, found {strictjson.show(meta)}")
    entries: list[Entry] = []
    for name, info in obj.items():
        entries.append(_entry(name, info, where))
    entries.sort(key=lambda e: (e.begin, e.end))
    pos, prev = 0, None
    for e in entries:  # the buffer must be tiled exactly: no gap, no overlap (aliasing)
        if e.begin != pos:
            what = "overlaps" if e.begin < pos else "leaves a gap after"
            raise HeaderError(
                f"{where}: tensor {e.name[:200]!r} at data_offsets [{e.begin}, {e.end}) {what} "
                f"{'the start of the buffer' if prev is None else repr(prev.name[:200])}; expected it to start at {pos}"
            )
        pos, prev = e.end, e
    data_start = _PREFIX + n
    if data_start + pos != file_size:
        raise HeaderError(
            f"{where}: the tensors end at byte {data_start + pos} but the file has {file_size} bytes "
            "(unindexed bytes after the last tensor, or a truncated file)"
        )
    return Header(tuple(entries), meta, data_start)


def _entry(name: str, info: object, where: str) -> Entry:
    at = f"{where}: tensor {name[:200]!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        found = sorted(info)[:8] if isinstance(info, dict) else strictjson.show(info)
        raise HeaderError(f"{at}: expected exactly the keys dtype, shape, data_offsets; found {found}")
    code = info["dtype"]
    if not isinstance(code, str) or code not in dtypes.BY_CODE:
        raise HeaderError(f"{at}: unknown dtype {strictjson.show(code)}; expected one of {sorted(dtypes.BY_CODE)}")
    dt = dtypes.BY_CODE[code]
    shape, offs = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**64 for d in shape):
        raise HeaderError(f"{at}: shape {strictjson.show(shape)} is not a list of non-negative integers")
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int and 0 <= o < 2**64 for o in offs)):
        raise HeaderError(f"{at}: data_offsets {strictjson.show(offs)} are not two non-negative integers")
    begin, end = offs
    # The reference's checked u64 arithmetic: numel = prod(shape), then numel * bits, each
    # refused once it passes 2**64 - 1 (in order, so [2**40, 2**40, 0] is refused too). Stopping
    # there also keeps the product small: a long list of huge dimensions is not multiplied out.
    numel = 1
    for d in shape:
        numel *= d
        if numel >= 2**64:
            raise HeaderError(
                f"{at}: shape {strictjson.show(shape)} has more than 2**64 - 1 elements (the product overflows)"
            )
    if numel * dt.itemsize * 8 >= 2**64:
        raise HeaderError(f"{at}: shape {strictjson.show(shape)} of {dt.code} holds more than 2**64 - 1 bits")
    need = numel * dt.itemsize
    if end < begin or end - begin != need:
        raise HeaderError(
            f"{at}: data_offsets [{begin}, {end}) hold {end - begin} bytes, "
            f"shape {strictjson.show(shape)} of {dt.code} needs {need}"
        )
    return Entry(name, dt.code, tuple(shape), begin, end)
