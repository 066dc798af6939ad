"""ckpt's safetensors container against the reference implementation (``safetensors`` 0.8).

- The writer: for random tensors over every dtype, with awkward names and with or without
  metadata, ``encode``/``header_bytes`` give the reference writer's exact bytes (the reference
  writes ``__metadata__`` members in hash-map order, so with two or more metadata keys the
  comparison is up to that order).
- ``parse`` round-trips ``encode``.
- Differential: a corpus of crafted valid and invalid files goes to both parsers; they agree on
  accept/reject except for the disagreements listed, each with its reason.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt.errors import HeaderError
from ckpt.format import dtypes
from ckpt.format import safetensors as safetensors_format

DTYPE_CODES = sorted(dtypes.BY_CODE)
AWKWARD = ['"', "\\", "/", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "😀", "\u2028", " ", ".", "~", "{", "}"]

names = st.text(
    alphabet=st.one_of(st.characters(blacklist_categories=("Cs",)), st.sampled_from(AWKWARD)), max_size=10
).filter(lambda s: s != "__metadata__")
shapes = st.lists(st.integers(0, 3), max_size=3)
metadata = st.one_of(
    st.none(),
    st.dictionaries(st.text(st.sampled_from(["a", "b", '"', "é", "\n", "_"]), max_size=4), st.text(max_size=6), max_size=4),
)
tensor_specs = st.dictionaries(names, st.tuples(st.sampled_from(DTYPE_CODES), shapes), max_size=6)


def make_tensor(code: str, shape: list[int], seed: int) -> torch.Tensor:
    dt = dtypes.BY_CODE[code]
    n = math.prod(shape) * dt.itemsize
    raw = (torch.arange(n, dtype=torch.int64) * 37 + seed) % 251
    if code == "BOOL":
        raw = raw % 2
    return raw.to(torch.uint8).view(dt.torch_dtype).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def our_file(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None) -> tuple[safetensors_format.Header, bytes]:
    items = [(k, dtypes.BY_TORCH[t.dtype].code, tuple(t.shape)) for k, t in tensors.items()]
    h = safetensors_format.encode(items, meta)
    return h, safetensors_format.header_bytes(h) + b"".join(tensor_bytes(tensors[e.name]) for e in h.entries)


def split_metadata(header_json: bytes) -> tuple[dict[str, str] | None, list[tuple[str, str]], str]:
    """(metadata as written, its members in written order, the rest of the header text)."""
    text = header_json.decode()
    prefix = '{"__metadata__":'
    if not text.startswith(prefix):
        return None, [], text
    members, end = json.JSONDecoder(object_pairs_hook=list).raw_decode(text, len(prefix))
    return dict(members), members, text[end:]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=tensor_specs, meta=metadata)
def test_writer_is_byte_identical_to_the_reference(specs: dict[str, tuple[str, list[int]]], meta: dict[str, str] | None) -> None:
    tensors = {name: make_tensor(code, shape, i) for i, (name, (code, shape)) in enumerate(specs.items())}
    ref = safetensors.torch.save(tensors, metadata=meta)
    h, ours = our_file(tensors, meta)
    if not tensors and meta == {}:
        # The reference writer's one bug here: it writes '{},"__metadata__":{}}' (not JSON).
        assert ref[8:].rstrip() == b'{},"__metadata__":{}}'
        assert ours[8:].rstrip() == b'{"__metadata__":{}}'
        return
    (n,) = struct.unpack("<Q", ref[:8])
    assert h.data_start == 8 + n
    assert len(ours) == len(ref) == h.file_size
    if meta is None or len(meta) <= 1:
        assert ours == ref
        return
    # The reference writes metadata members in hash-map order (it varies from run to run); ours
    # sorts them. Everything else, and every length, is identical.
    assert ours[:8] == ref[:8]
    assert ours[8 + n :] == ref[8 + n :]
    ref_meta, ref_members, ref_rest = split_metadata(ref[8 : 8 + n])
    our_meta, our_members, our_rest = split_metadata(ours[8 : 8 + n])
    assert our_meta == ref_meta == meta
    assert our_members == sorted(ref_members)
    assert our_rest == ref_rest


@settings(max_examples=200, deadline=None)
@given(specs=tensor_specs, meta=metadata)
def test_parse_round_trips_encode(specs: dict[str, tuple[str, list[int]]], meta: dict[str, str] | None) -> None:
    items = [(name, code, tuple(shape)) for name, (code, shape) in specs.items()]
    h = safetensors_format.encode(items, meta)
    data = safetensors_format.header_bytes(h)
    buf = data + b"\0" * (h.file_size - len(data))
    back = safetensors_format.parse(buf, file_size=len(buf), where="f")
    assert back.data_start == h.data_start
    assert back.metadata == h.metadata
    assert sorted(back.entries, key=lambda e: e.name) == sorted(h.entries, key=lambda e: e.name)
    assert [e.begin for e in back.entries] == sorted(e.begin for e in h.entries)


def test_empty_metadata_is_written_as_the_reference_does() -> None:
    """``metadata={}`` and ``None`` differ in the reference's bytes; ours follow."""
    t = {"a": torch.zeros(2)}
    for meta in (None, {}):
        assert our_file(t, meta)[1] == safetensors.torch.save(t, metadata=meta)
    assert our_file(t, None)[1] != our_file(t, {})[1]


# --- the differential corpus ----------------------------------------------------------------


def st_file(header: bytes | dict[str, Any], data: bytes = b"", *, n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


A = json.dumps(entry("F32", [2], 0, 8)).encode()

CORPUS: dict[str, bytes] = {
    # valid
    "empty-header": st_file(b"{}"),
    "one-tensor": st_file({"a": entry("F32", [2], 0, 8)}, b"\0" * 8),
    "with-metadata": st_file({"__metadata__": {"format": "pt"}, "a": entry("F32", [2], 0, 8)}, b"\0" * 8),
    "metadata-null": st_file(b'{"__metadata__":null,"a":' + A + b"}", b"\0" * 8),
    "metadata-empty": st_file({"__metadata__": {}}),
    "zero-size": st_file({"z": entry("F32", [0, 3], 0, 0)}),
    "zero-d": st_file({"s": entry("I64", [], 0, 8)}, b"\0" * 8),
    "out-of-order-keys": st_file({"b": entry("U8", [1], 1, 2), "a": entry("U8", [1], 0, 1)}, b"xy"),
    "zero-size-between": st_file({"a": entry("U8", [1], 0, 1), "z": entry("U8", [0], 1, 1), "b": entry("U8", [1], 1, 2)}, b"xy"),
    "leading-whitespace": st_file(b"  \n{}"),
    "trailing-whitespace": st_file(b"{}\t\n  \r"),
    "escaped-name": st_file(b'{"a\\"b\\u00e9\\ud83d\\ude00":' + A + b"}", b"\0" * 8),
    "empty-name": st_file({"": entry("F32", [2], 0, 8)}, b"\0" * 8),
    "unpadded-header": st_file(b'{"a":' + A + b"}", b"\0" * 8),
    "bf16-and-f8": st_file({"a": entry("BF16", [2], 0, 4), "b": entry("F8_E4M3", [4], 4, 8)}, b"\0" * 8),
    # invalid
    "too-short": b"\0\0\0",
    "length-past-end": st_file(b"{}", n=100),
    "length-huge": st_file(b"{}", n=2**63),
    "not-utf8": st_file(b'{"\xff":' + A + b"}", b"\0" * 8),
    "not-json": st_file(b"{ nope }"),
    "json-array": st_file(b"[]"),
    "bom": st_file(b"\xef\xbb\xbf{}"),
    "nul-padding": st_file(b"{}\0\0"),
    "nan": st_file(b'{"__metadata__":{"k":NaN}}'),
    "lone-surrogate-name": st_file(b'{"\\ud800":' + A + b"}", b"\0" * 8),
    "metadata-int-value": st_file({"__metadata__": {"k": 1}}),
    "metadata-string": st_file({"__metadata__": "x"}),
    "duplicate-metadata": st_file(b'{"__metadata__":{},"__metadata__":{}}'),
    "duplicate-field": st_file(b'{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8),
    "missing-shape": st_file({"a": {"dtype": "U8", "data_offsets": [0, 1]}}, b"x"),
    "entry-not-object": st_file({"a": 3}),
    "unknown-dtype": st_file({"a": entry("F128", [1], 0, 16)}, b"\0" * 16),
    "lowercase-dtype": st_file({"a": entry("f32", [2], 0, 8)}, b"\0" * 8),
    "shape-float": st_file(b'{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', b"\0" * 8),
    "shape-bool": st_file({"a": entry("U8", [True], 0, 1)}, b"x"),
    "shape-negative": st_file({"a": entry("U8", [-1], 0, 1)}, b"x"),
    "offset-exponent": st_file(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8e0]}}', b"\0" * 8),
    "offset-5000-digits": st_file(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,' + b"0" * 4999 + b"8]}}", b"\0" * 8),
    "offsets-reversed": st_file({"a": entry("U8", [0], 1, 0)}, b"x"),
    "gap": st_file({"a": entry("U8", [1], 0, 1), "b": entry("U8", [1], 2, 3)}, b"xyz"),
    "overlap": st_file({"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 1, 3)}, b"xyz"),
    "aliased": st_file({"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 0, 2)}, b"xy"),
    "size-mismatch": st_file({"a": entry("F32", [2], 0, 4)}, b"\0" * 4),
    "shape-overflow": st_file({"a": entry("F32", [2, 2**64 - 2], 0, 8)}, b"\0" * 8),
    "past-buffer": st_file({"a": entry("F32", [2], 0, 8)}, b"\0" * 4),
    "polyglot-tail": st_file({"a": entry("U8", [1], 0, 1)}, b"x" + b"PK\x05\x06" + b"\0" * 18),
    "pickle": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s.",
    "zip": b"PK\x03\x04" + b"\0" * 60,
    # intended disagreements (see INTENDED)
    "duplicate-tensor-name": st_file(b'{"a":' + A + b',"a":' + A + b"}", b"\0" * 8),
    "extra-entry-field": st_file({"a": {**entry("U8", [1], 0, 1), "quant": "q4"}}, b"x"),
    "sub-byte-dtype": st_file({"a": entry("F4", [2], 0, 1)}, b"x"),
    "e8m0-dtype": st_file({"a": entry("F8_E8M0", [1], 0, 1)}, b"x"),
    "negative-zero-offset": st_file(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}', b"\0" * 8),
}  # fmt: skip

# Where ckpt deliberately disagrees with the reference, and why. The test also checks that each
# disagreement is real (so this list cannot go stale).
INTENDED: dict[str, str] = {
    "duplicate-tensor-name": (
        "the reference reads the header into a serde HashMap, which keeps the last of two equal "
        "keys; its README says duplicates are disallowed. ckpt refuses them: a duplicate hides a "
        "tensor, and two parsers could pick different ones."
    ),
    "extra-entry-field": (
        "serde ignores unknown fields in a tensor entry; ckpt refuses them, since a field it does "
        "not understand could change what the bytes mean."
    ),
    "sub-byte-dtype": (
        "F4 (and F6_*) pack several values per byte; ckpt's dtype table is a closed list of "
        "byte-aligned dtypes torch can hold, and any other code is refused."
    ),
    "e8m0-dtype": "F8_E8M0 is not in ckpt's dtype table (closed list; refused, never guessed).",
    "negative-zero-offset": (
        "JSON's -0 is the integer 0 to Python; serde reads it as a float and refuses it. Both "
        "readings give the same offsets, so accepting it is harmless."
    ),
}


def reference_accepts(buf: bytes, tmp_path: Path) -> bool:
    """The reference verdict: safe_open parses the file and every tensor can be read."""
    f = tmp_path / "ref.safetensors"
    f.write_bytes(buf)
    try:
        with safetensors.safe_open(str(f), "pt") as g:
            for k in g.keys():  # noqa: SIM118  (safe_open handles are not mappings)
                g.get_tensor(k)
    except Exception:
        return False
    return True


def ours_accepts(buf: bytes) -> bool:
    try:
        safetensors_format.parse(buf, file_size=len(buf), where="corpus")
    except HeaderError:  # anything else is a bug, and fails the test
        return False
    return True


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_differential_against_the_reference(name: str, tmp_path: Path) -> None:
    buf = CORPUS[name]
    ref, ours = reference_accepts(buf, tmp_path), ours_accepts(buf)
    if name in INTENDED:
        assert ref != ours, f"{name}: documented as a disagreement, but both say {ours}"
    else:
        assert ours == ref, f"{name}: ckpt accepts={ours}, reference accepts={ref}"
    if ours and ref:  # both accept: they read the same tensors and metadata
        h = safetensors_format.parse(buf, file_size=len(buf), where="corpus")
        (tmp_path / "ref.safetensors").write_bytes(buf)
        with safetensors.safe_open(str(tmp_path / "ref.safetensors"), "pt") as g:
            assert g.metadata() == h.metadata
            assert sorted(g.keys()) == sorted(e.name for e in h.entries)
            for e in h.entries:
                assert list(g.get_slice(e.name).get_shape()) == list(e.shape)
                assert g.get_slice(e.name).get_dtype() == e.dtype


def test_the_corpus_has_both_verdicts() -> None:
    verdicts = [ours_accepts(b) for b in CORPUS.values()]
    assert 10 <= sum(verdicts) <= len(verdicts) - 25
