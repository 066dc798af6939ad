"""The bad-input catalogue (shared/reference/reliability.md, section 6, items 1-33): every item
gets a specific typed error whose message names the file or key, what was expected and what was
found, quickly, before any large allocation, and never a fallback to another loader.

Hostile manifests are made from a real checkpoint: save, load its manifest as JSON, change one
thing, write it back, read or restore. Header items (21-26, 30) are checked on the safetensors
parser directly (restore reads only the manifest's byte ranges, never a header); restore's part
is the whole-file size check and the block crc32c, tested with hostile files of the same size.

Not applicable, or covered elsewhere:
- 6 "unknown required feature flag": format v1 has no feature flags; any unknown field is
  refused (item 7), so a v1 reader cannot miss a flag it does not know.
- 15 "shards disagree on dtype": the manifest has one dtype per tensor, not per shard.
- 17 attempt_id and root: we check the step only. The attempt names the data prefix, but a
  manifest may reference data of older attempts (incremental checkpoints), and the root is not
  stored so that a checkpoint can be copied between stores (``ckpt cp``).
- 20 ETag/VersionId: not stored. Data objects are immutable and create-only; a replaced object
  is caught by the size check (19) and the block crc32c (29).
- 27 header vs manifest: restore never parses headers (it reads the manifest's byte ranges and
  checks their crc32c); ``ckpt.lifecycle.verify`` compares headers with the manifest (tests/lifecycle/test_verify.py).
- 31 device files: reading one needs a symlink (refused, tested) or root privileges.
- 32 "DanglingPointer": ckpt never follows LATEST or any pointer; it lists ``steps/``. Tested:
  a dangling or hostile LATEST changes nothing.
- 33 (policy) ``check_finite``: not offered yet; NaN/Inf values round-trip bit-exactly (tested).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import math
import os
import pickle
import struct
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

import ckpt
from ckpt import errors
from ckpt.format import manifest, strictjson
from ckpt.format import safetensors as safetensors_format
from ckpt.geometry import coverage
from ckpt.testing import Recorder
from tests.conftest import Store

STEP = 1
MANIFEST = f"steps/{STEP:012d}/manifest.json"
FAST_S = 5.0  # a guard against hangs and quadratic blow-ups, not a benchmark
HUGE = 64 << 20  # no hostile input may make ckpt allocate this much


def small_state() -> dict[str, Any]:
    return {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.arange(4, dtype=torch.int64),
        "s": torch.tensor(7.0),  # 0-d
        "e": torch.zeros(0, 3),  # zero-size
        "step": 3,
    }


@dataclass
class Saved:
    """A committed checkpoint of :func:`small_state` at STEP, with raw access to its files."""

    root: str
    opts: dict[str, Any]

    def _fs(self) -> tuple[Any, str]:
        fs, base = fsspec.core.url_to_fs(self.root, **self.opts)
        return fs, base.rstrip("/")

    def read(self, rel: str) -> bytes:
        fs, base = self._fs()
        return bytes(fs.cat_file(f"{base}/{rel}"))

    def write(self, rel: str, data: bytes) -> None:
        fs, base = self._fs()
        if isinstance(fs, LocalFileSystem):
            os.makedirs(os.path.dirname(f"{base}/{rel}"), exist_ok=True)
        fs.pipe_file(f"{base}/{rel}", data)

    def rm(self, rel: str) -> None:
        fs, base = self._fs()
        fs.rm(f"{base}/{rel}")

    def manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.read(MANIFEST))
        return out

    def put_manifest(self, m: dict[str, Any] | bytes, *, reseal: bool = True) -> None:
        raw = m if isinstance(m, bytes) else dumps(m)
        self.write(MANIFEST, _reseal(raw) if reseal else raw)

    @property
    def data_file(self) -> str:
        (entry,) = self.manifest()["files"]
        return str(entry["path"])

    def read_manifest(self) -> ckpt.Manifest:
        return ckpt.read_manifest(self.root, step=STEP, storage_options=self.opts)

    def restore(self) -> Any:
        return ckpt.restore(self.root, step=STEP, storage_options=self.opts)


def _reseal(raw: bytes) -> bytes:
    """Recompute the manifest's own crc32c over edited bytes, so each case reaches the check it
    targets (the seal itself is tested in test_manifest_seal_*)."""
    mark = b'"manifest_crc32c":"'
    at = raw.rfind(mark) + len(mark)
    if at < len(mark) or len(raw) < at + 8:
        return raw
    zeroed = raw[:at] + b"00000000" + raw[at + 8 :]
    return raw[:at] + f"{crc32c.crc32c(zeroed):08x}".encode() + raw[at + 8 :]


def dumps(m: Any) -> bytes:
    return json.dumps(m, separators=(",", ":"), ensure_ascii=False).encode()


def save_small(root: str, opts: dict[str, Any] | None = None) -> Saved:
    ckpt.save(root, small_state(), step=STEP, storage_options=opts)
    return Saved(root, dict(opts or {}))


@pytest.fixture
def saved(tmp_path: Path) -> Saved:
    return save_small(str(tmp_path / "root"))


@pytest.fixture
def saved_any(store: Store) -> Saved:
    """The same checkpoint on local disk, memory:// and the moto S3 server."""
    return save_small(store.root, store.opts)


@pytest.fixture
def faulty_root() -> Iterator[str]:
    """A recording wrapper over a fresh memory:// root (removed afterwards)."""
    name = f"bad-input-{time.monotonic_ns()}"
    yield f"faulty://{name}/run"
    mem = fsspec.filesystem("memory")
    if mem.exists(name):
        mem.rm(name, recursive=True)


@contextlib.contextmanager
def quickly(limit: float = FAST_S) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    elapsed = time.perf_counter() - t0
    assert elapsed < limit, f"took {elapsed:.2f} s"


@pytest.fixture
def no_huge_alloc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything asks torch for a buffer of HUGE bytes or more."""
    for name in ("empty", "zeros"):
        real = getattr(torch, name)

        def guarded(*size: Any, _real: Callable[..., torch.Tensor] = real, _name: str = name, **kw: Any) -> torch.Tensor:
            dims = size[0] if len(size) == 1 and isinstance(size[0], tuple | list | torch.Size) else size
            dtype = kw.get("dtype") or torch.get_default_dtype()
            nbytes = math.prod(max(int(d), 1) for d in dims) * torch.empty((), dtype=dtype).element_size() if dims else 0
            assert nbytes < HUGE, f"torch.{_name}{tuple(dims)} of {dtype} asked for {nbytes} bytes"
            return _real(*size, **kw)

        monkeypatch.setattr(torch, name, guarded)


def rejects(s: Saved, err: type[Exception], match: str, *, restore: bool = True) -> str:
    """read_manifest (and restore) of STEP raise ``err`` matching ``match``, naming the manifest."""
    with quickly():
        with pytest.raises(err, match=match) as info:
            s.read_manifest()
        if restore:
            with pytest.raises(err, match=match):
                s.restore()
    msg = str(info.value)
    assert MANIFEST in msg, msg
    assert len(msg) < 2000, f"unbounded message ({len(msg)} chars)"
    return msg


def shard_of(m: dict[str, Any], key: str) -> dict[str, Any]:
    """The shard table of a one-shard tensor: its columns are that shard's fields (``offsets``,
    ``sizes``, ``byte_range``, ``crc32c`` as in one shard; ``file`` as ``[index]``)."""
    sh = m["tensors"][key]["shards"]
    assert len(sh["file"]) == 1
    out: dict[str, Any] = sh
    return out


# --- item 1: manifest size cap, checked before reading ---------------------------------------


def test_01_manifest_over_the_cap_is_refused_before_it_is_read(monkeypatch: pytest.MonkeyPatch, faulty_root: str) -> None:
    rec = Recorder()
    s = save_small(faulty_root, {"target_protocol": "memory", "recorder": rec})
    size = len(s.read(MANIFEST))
    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", size - 1)
    rec.clear()
    with quickly(), pytest.raises(errors.ManifestTooLargeError, match=rf"manifest\.json: {size} bytes is over"):
        s.read_manifest()
    assert not [c for c in rec.calls_of("cat_file") if c.path.endswith("manifest.json")], "read before the size check"
    with pytest.raises(errors.ManifestTooLargeError, match=f"{size} bytes is over the {size - 1}-byte cap"):
        manifest.parse(s.read(MANIFEST), where="m.json")


# --- items 2-9: the manifest's JSON and schema -----------------------------------------------


def _deep_tree(m: dict[str, Any]) -> dict[str, Any]:
    node = m["tree"]
    for _ in range(100):  # 2 JSON levels each
        node = {"list": [node]}
    m["tree"] = node
    return m


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A mutation that sets ``m[a][b]...`` (``/``-separated path; ``shard:KEY/field`` for a shard)."""

    def mutate(m: dict[str, Any]) -> dict[str, Any]:
        if path.startswith("shard:"):
            key, field = path[len("shard:") :].split("/")
            shard_of(m, key)[field] = value
            return m
        *parents, last = (int(p) if p.isdigit() else p for p in path.split("/"))
        obj: Any = m
        for p in parents:
            obj = obj[p]
        obj[last] = value
        return m

    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def mutate(m: dict[str, Any]) -> dict[str, Any]:
        if path.startswith("shard:"):
            key, field = path[len("shard:") :].split("/")
            del shard_of(m, key)[field]
            return m
        *parents, last = path.split("/")
        obj: Any = m
        for p in parents:
            obj = obj[p]
        del obj[last]
        return m

    return mutate


def _raw(fn: Callable[[bytes], bytes]) -> Callable[[dict[str, Any]], bytes]:
    return lambda m: fn(dumps(m))


def _file_field(field: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def mutate(m: dict[str, Any]) -> dict[str, Any]:
        (info,) = m["files"]
        info[field] = value
        return m

    return mutate


def _drop_file_field(field: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def mutate(m: dict[str, Any]) -> dict[str, Any]:
        (info,) = m["files"]
        del info[field]
        return m

    return mutate


def _dup_tensor(m: dict[str, Any]) -> bytes:
    w = dumps(m["tensors"]["w"])
    return dumps(m).replace(b'"tensors":{', b'"tensors":{"w":' + w + b",", 1)


def _deep_in_dtype(m: dict[str, Any]) -> bytes:
    depth = 900  # under json's own recursion limit: only ckpt's checks stand in the way
    return dumps(_set("tensors/w/dtype", "@")(m)).replace(b'"@"', b"[" * depth + b"]" * depth)


def _big_digits(n: int) -> Callable[[dict[str, Any]], bytes]:
    return _raw(lambda b: b.replace(b'"step":1,', b'"step":' + b"9" * n + b",", 1))


MANIFEST_CASES: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any] | bytes], type[Exception], str]] = [
    # 2: not UTF-8, not JSON, trailing bytes
    ("02-not-utf8", _raw(lambda b: b.replace(b'"created":"', b'"created":"\xff', 1)), errors.ManifestParseError, r"not UTF-8 \(invalid start byte at byte \d+\)"),
    ("02-not-json", lambda m: b"this is not json", errors.ManifestParseError, "invalid JSON: Expecting value"),
    ("02-empty", lambda m: b"", errors.ManifestParseError, "invalid JSON: Expecting value"),
    ("02-trailing-json", _raw(lambda b: b + b'{"format_version":1}'), errors.ManifestParseError, "invalid JSON: Extra data"),
    ("02-trailing-nul", _raw(lambda b: b + b"\x00"), errors.ManifestParseError, "invalid JSON: Extra data"),
    ("02-bom", _raw(lambda b: b"\xef\xbb\xbf" + b), errors.ManifestParseError, "invalid JSON: Unexpected UTF-8 BOM"),
    ("02-not-an-object", lambda m: b"[1, 2]", errors.ManifestSchemaError, r"must be a JSON object, found \[1, 2\]"),
    ("02-lone-surrogate", _raw(lambda b: b.replace(b'"created":"', b'"created":"\\ud800', 1)), errors.ManifestParseError, "lone UTF-16 surrogate"),
    # 3: nesting
    ("03-deep-100k", lambda m: b"[" * 100_000 + b"]" * 100_000, errors.ManifestParseError, "nested too deeply"),
    ("03-deep-object", _set("objects/step", json.loads("[" * 200 + "]" * 200)), errors.ManifestParseError, "object 'step' is nested more than 128 levels"),
    ("03-deep-tree", _deep_tree, errors.ManifestParseError, "tree is nested more than 128 levels"),
    ("03-deep-dtype", _deep_in_dtype, errors.UnsupportedDtypeError, r"tensor 'w': unknown dtype \[\[\[\[\.\.\.\]\]\]\]; expected one of \['BF16'"),
    # 4: duplicate keys anywhere
    ("04-dup-tensor", _dup_tensor, errors.ManifestParseError, "duplicate key 'w'"),
    ("04-dup-format-version", _raw(lambda b: b.replace(b'{"format_version":1,', b'{"format_version":1,"format_version":1,', 1)), errors.ManifestParseError, "duplicate key 'format_version'"),
    ("04-dup-shard-field", _raw(lambda b: b.replace(b'"offsets":[0,0]', b'"offsets":[0,0],"offsets":[0,0]', 1)), errors.ManifestParseError, "duplicate key 'offsets'"),
    # 5: NaN and infinities
    ("05-nan", _raw(lambda b: b.replace(b'"step":3}', b'"step":NaN}', 1)), errors.ManifestParseError, "NaN is not allowed"),
    ("05-infinity", _raw(lambda b: b.replace(b'"step":3}', b'"step":Infinity}', 1)), errors.ManifestParseError, "Infinity is not allowed"),
    ("05-minus-infinity", _raw(lambda b: b.replace(b'"step":3}', b'"step":-Infinity}', 1)), errors.ManifestParseError, "-Infinity is not allowed"),
    ("05-overflow-to-inf", _raw(lambda b: b.replace(b'"step":3}', b'"step":-1e400}', 1)), errors.ManifestParseError, "number -1e400 overflows to infinity"),
    # 6: format_version
    ("06-version-missing", _drop("format_version"), errors.UnsupportedFormatError, r"format_version is missing; this ckpt reads integer versions 1\.\.3"),
    ("06-version-string", _set("format_version", "1"), errors.UnsupportedFormatError, r'format_version is "1", not an integer'),
    ("06-version-float", _set("format_version", 1.0), errors.UnsupportedFormatError, r"format_version is 1\.0, not an integer"),
    ("06-version-bool", _set("format_version", True), errors.UnsupportedFormatError, "format_version is true, not an integer"),
    ("06-version-future", _set("format_version", 999), errors.UnsupportedFormatError, r"format_version 999 is not supported by this ckpt, which reads versions 1\.\.3; upgrade ckpt"),
    ("06-version-zero", _set("format_version", 0), errors.UnsupportedFormatError, "format_version 0 is not supported"),
    # 7: required fields, unknown fields, wrong types
    ("07-missing-tensors", _drop("tensors"), errors.ManifestSchemaError, r"missing fields \['tensors'\]"),
    ("07-missing-files", _drop("files"), errors.ManifestSchemaError, r"missing fields \['files'\]"),
    ("07-missing-checksum-algorithm", _drop("checksum_algorithm"), errors.ManifestSchemaError, r"missing fields \['checksum_algorithm'\]"),
    ("07-missing-step", _drop("step"), errors.ManifestSchemaError, r"missing fields \['step'\]"),
    ("07-missing-attempt", _drop("attempt"), errors.ManifestSchemaError, r"missing fields \['attempt'\]"),
    ("07-unknown-field", _set("encryption", "rot13"), errors.ManifestSchemaError, r"unknown fields \['\"encryption\"'\]"),
    ("07-tensors-list", _set("tensors", []), errors.ManifestSchemaError, r"tensors must be a JSON object, found \[\]"),
    ("07-files-string", _set("files", "x"), errors.ManifestSchemaError, 'files must be a JSON list of file entries, found "x"'),
    ("07-step-string", _set("step", "1"), errors.ManifestSchemaError, r'step: expected an integer in \[0, 2\*\*63\), found "1"'),
    ("07-attempt-int", _set("attempt", 5), errors.ManifestSchemaError, "attempt 5 is not a"),
    ("07-attempt-traversal", _set("attempt", "../x"), errors.ManifestSchemaError, r'attempt "\.\./x" is not a'),
    ("07-world-size-zero", _set("world_size", 0), errors.ManifestSchemaError, r"world_size: expected an integer in \[1, 2\*\*63\), found 0"),
    ("07-user-metadata-int", _set("user_metadata", {"a": 1}), errors.ManifestSchemaError, r'user_metadata must map strings to strings, found \{"a": 1\}'),
    ("07-created-int", _set("created", 5), errors.ManifestSchemaError, "created must be a string, found 5"),
    ("07-block-bytes-zero", _set("block_bytes", 0), errors.ManifestSchemaError, "block_bytes: expected an integer in"),
    ("07-tensor-extra-field", _set("tensors/w/quant", "int4"), errors.ManifestSchemaError, r"tensor 'w': expected exactly the fields dtype, shape, shards; found \['dtype', 'quant'"),
    ("07-shard-extra-field", _set("shard:w/x", 1), errors.ManifestSchemaError, r"tensor 'w': shards must be an object of the parallel lists \['file', 'offsets', 'sizes', 'byte_range', 'crc32c'\]; found \[.*'x'\]"),
    ("07-shard-missing-field", _drop("shard:w/sizes"), errors.ManifestSchemaError, r"tensor 'w': shards must be an object of the parallel lists .*; found \['byte_range', 'crc32c', 'file', 'offsets'\]"),
    ("07-shards-list", _set("tensors/w/shards", []), errors.ManifestSchemaError, r"tensor 'w': shards must be an object of the parallel lists .*; found \[\]"),
    ("07-shards-empty", _set("tensors/w/shards", {"file": [], "offsets": [], "sizes": [], "byte_range": [], "crc32c": []}), errors.ManifestSchemaError, r"tensor 'w': shards must hold at least one shard, found none"),
    ("07-shards-v0-list-form", lambda m: _set("tensors/w/shards", [{"file": m["files"][0]["path"], "offsets": [0, 0], "sizes": [3, 4], "byte_range": shard_of(m, "w")["byte_range"], "crc32c": shard_of(m, "w")["crc32c"]}])(m), errors.ManifestSchemaError, r"tensor 'w': shards must be an object of the parallel lists"),
    ("07-column-not-a-list", _set("shard:w/sizes", 12), errors.ManifestSchemaError, r"tensor 'w': shards\.sizes must be a list of integers, found 12"),
    ("07-column-offsets-short", _set("shard:w/offsets", [0]), errors.ManifestSchemaError, r"tensor 'w': shards\.offsets must hold 2 integers \(2 for each of 1 shards\), found 1"),
    ("07-column-sizes-long", _set("shard:w/sizes", [3, 4, 1]), errors.ManifestSchemaError, r"tensor 'w': shards\.sizes must hold 2 integers .* found 3"),
    ("07-column-file-two", _set("shard:w/file", [0, 0]), errors.ManifestSchemaError, r"tensor 'w': shards\.offsets must hold 4 integers \(2 for each of 2 shards\), found 2"),
    ("07-files-v0-object-form", lambda m: _set("files", {e["path"]: {"size": e["size"], "crc32c": e["crc32c"]} for e in m["files"]})(m), errors.ManifestSchemaError, r"files must be a JSON list of file entries, found \{"),
    ("07-file-entry-extra-field", _file_field("mode", 644), errors.ManifestSchemaError, r"files\[0\]: expected exactly the fields crc32c, path, size; found \['crc32c', 'mode', 'path', 'size'\]"),
    ("07-file-entry-no-path", _drop_file_field("path"), errors.ManifestSchemaError, r"files\[0\]: expected exactly the fields crc32c, path, size; found \['crc32c', 'size'\]"),
    ("07-file-entry-not-object", _set("files", [5]), errors.ManifestSchemaError, r"files\[0\]: expected exactly the fields crc32c, path, size; found 5"),
    ("07-file-listed-twice", lambda m: _set("files", m["files"] * 2)(m), errors.ManifestSchemaError, r"files\[1\]: the path '.*' is listed twice"),
    ("07-tree-dangling", _set("tree", {"dict": [["w", {"tensor": "nope"}]]}), errors.ManifestSchemaError, 'tree references tensor "nope" that is missing'),
    ("07-tree-unreferenced", _set("tree", {"dict": [["w", {"tensor": "w"}]]}), errors.ManifestSchemaError, r"keys \['b', 'e', 's', 'step'\] are not referenced"),
    ("07-tree-list-key", _set("tree/dict/0/0", ["x"]), errors.ManifestSchemaError, r'tree: dict key \["x"\] is not a string or an integer'),
    ("07-tree-duplicate-key", lambda m: _set("tree/dict/1/0", m["tree"]["dict"][0][0])(m), errors.ManifestSchemaError, "tree: key .* appears twice in one dict"),
    ("07-object-bad-tag", _set("objects/step", {"$f64": "00 00 00 00 0000"}), errors.ManifestSchemaError, "object 'step': malformed"),
    # 8: shape entries
    ("08-shape-true", _set("tensors/w/shape", [True, 4]), errors.ManifestSchemaError, r"tensor 'w': shape: expected an integer in \[0, 2\*\*63\), found true"),
    ("08-shape-false", _set("tensors/w/shape", [3, False]), errors.ManifestSchemaError, "shape: expected an integer .* found false"),
    ("08-shape-float", _set("tensors/w/shape", [3.0, 4]), errors.ManifestSchemaError, r"shape: expected an integer .* found 3\.0"),
    ("08-shape-string", _set("tensors/w/shape", ["3", 4]), errors.ManifestSchemaError, 'shape: expected an integer .* found "3"'),
    ("08-shape-null", _set("tensors/w/shape", [None, 4]), errors.ManifestSchemaError, "shape: expected an integer .* found null"),
    ("08-shape-negative", _set("tensors/w/shape", [-3, 4]), errors.ManifestSchemaError, "shape: expected an integer .* found -3"),
    ("08-shape-2-63", _set("tensors/w/shape", [2**63, 4]), errors.ManifestSchemaError, "shape: expected an integer .* found 9223372036854775808"),
    ("08-shape-not-list", _set("tensors/w/shape", 12), errors.ManifestSchemaError, "shape: expected a list of at most 64 integers, found 12"),
    ("08-shape-65-dims", _set("tensors/w/shape", [1] * 65), errors.ManifestSchemaError, "shape: expected a list of at most 64 integers"),
    # 9: giant integers
    ("09-5000-digit-int", _big_digits(5000), errors.ManifestParseError, "invalid JSON: Exceeds the limit .* for integer string conversion"),
    ("09-4000-digit-int", _big_digits(4000), errors.ManifestSchemaError, r"step: expected an integer in \[0, 2\*\*63\), found 9999999999"),
    ("09-5000-digit-tagged-int", _set("objects/step", {"$int": "9" * 5000}), errors.ManifestSchemaError, "object 'step': malformed"),
    # found by tests/format/test_fuzz.py: a numpy scalar tag whose value its dtype cannot hold was
    # rounded (1e300 -> inf, 1.5 -> 1, 5 -> True), with a RuntimeWarning, instead of refused
    ("07-np-float16-overflow", _set("objects/step", {"$np": ["<f2", 1e300]}), errors.ManifestSchemaError, r"object 'step': malformed tagged value .*\$np"),
    ("07-np-int-from-float", _set("objects/step", {"$np": ["<i8", 1.5]}), errors.ManifestSchemaError, r"object 'step': malformed tagged value .*\$np"),
    ("07-np-bool-from-int", _set("objects/step", {"$np": ["|b1", 5]}), errors.ManifestSchemaError, r"object 'step': malformed tagged value .*\$np"),
    ("07-np-uint-from-bool", _set("objects/step", {"$np": ["<u8", True]}), errors.ManifestSchemaError, r"object 'step': malformed tagged value .*\$np"),
    ("07-np-inexact-float16", _set("objects/step", {"$np": ["<f2", 0.1]}), errors.ManifestSchemaError, r"object 'step': malformed tagged value .*\$np"),
    ("09-offset-2-63", _set("shard:w/offsets", [2**63, 0]), errors.ManifestSchemaError, r"tensor 'w': shards\.offsets\[0\]: expected an integer in \[0, 2\*\*63\), found 9223372036854775808"),
    ("09-size-2-64", _set("shard:w/sizes", [3, 2**64]), errors.ManifestSchemaError, r"tensor 'w': shards\.sizes\[1\]: expected an integer in \[0, 2\*\*63\), found 18446744073709551616"),
    ("09-range-2-63", lambda m: _set("shard:w/byte_range", [shard_of(m, "w")["byte_range"][0], 2**63])(m), errors.InvalidByteRangeError, r"tensor 'w': shards\.byte_range\[1\]: expected an integer, found 9223372036854775808"),
    ("09-crc-2-63", _set("shard:w/crc32c", [2**63]), errors.IntegrityMetadataError, r"tensor 'w': shards\.crc32c\[0\]: expected a 32-bit unsigned integer, found 9223372036854775808"),
    ("09-file-index-2-63", _set("shard:w/file", [2**63]), errors.ManifestSchemaError, r"tensor 'w': shards\.file\[0\]: expected a file index in \[0, 1\), found 9223372036854775808"),
    ("09-box-sum-over-2-63", lambda m: _set("shard:w/sizes", [2**62 + 1, 4])(_set("shard:w/offsets", [2**62, 0])(m)), errors.ShardCoverageError, r"tensor 'w': shard 0 at offsets \[4611686018427387904, 0\] with sizes \[4611686018427387905, 4\] exceeds the shape \[3, 4\]"),
    # the element types of every shard column: integers only (booleans and floats are not)
    ("09-offset-true", _set("shard:w/offsets", [True, 0]), errors.ManifestSchemaError, r"tensor 'w': shards\.offsets\[0\]: expected an integer in \[0, 2\*\*63\), found true"),
    ("09-offset-float", _set("shard:w/offsets", [0, 0.0]), errors.ManifestSchemaError, r"shards\.offsets\[1\]: expected an integer .* found 0\.0"),
    ("09-offset-negative", _set("shard:w/offsets", [0, -1]), errors.ManifestSchemaError, r"shards\.offsets\[1\]: expected an integer .* found -1"),
    ("09-size-false", _set("shard:w/sizes", [3, False]), errors.ManifestSchemaError, r"shards\.sizes\[1\]: expected an integer .* found false"),
    ("09-size-string", _set("shard:w/sizes", ["3", 4]), errors.ManifestSchemaError, r'shards\.sizes\[0\]: expected an integer .* found "3"'),
    ("09-size-null", _set("shard:w/sizes", [3, None]), errors.ManifestSchemaError, r"shards\.sizes\[1\]: expected an integer .* found null"),
    ("09-size-list", _set("shard:w/sizes", [[3], 4]), errors.ManifestSchemaError, r"shards\.sizes\[0\]: expected an integer .* found \[3\]"),
    ("09-file-index-string", _set("shard:w/file", ["0"]), errors.ManifestSchemaError, r'shards\.file\[0\]: expected a file index in \[0, 1\), found "0"'),
    ("09-file-index-bool", _set("shard:w/file", [False]), errors.ManifestSchemaError, r"shards\.file\[0\]: expected a file index in \[0, 1\), found false"),
    ("09-file-index-past-files", _set("shard:w/file", [1]), errors.ManifestSchemaError, r"tensor 'w': shards\.file\[0\]: expected a file index in \[0, 1\), found 1"),
    ("09-file-index-negative", _set("shard:w/file", [-1]), errors.ManifestSchemaError, r"shards\.file\[0\]: expected a file index in \[0, 1\), found -1"),
    ("09-file-path-not-index", lambda m: _set("shard:w/file", [m["files"][0]["path"]])(m), errors.ManifestSchemaError, r'shards\.file\[0\]: expected a file index in \[0, 1\), found "data/'),
    ("09-file-size-2-63", _file_field("size", 2**63), errors.ManifestSchemaError, r"size: expected an integer in \[0, 2\*\*63\), found 9223372036854775808"),
    # 10: sizes
    ("10-range-shorter-than-shape", lambda m: _set("shard:w/byte_range", [shard_of(m, "w")["byte_range"][0], shard_of(m, "w")["byte_range"][1] - 4])(m), errors.TensorSizeError, r"tensor 'w': shard 0: byte_range \[\d+, \d+\) in '.*' holds 44 bytes; sizes \[3, 4\] of F32 need 48"),
    ("10-shape-over-cap", lambda m: _set("tensors/w/shape", [2, 2**62])(m), errors.TensorSizeError, r"tensor 'w': shape \[2, 4611686018427387904\] of F32 is over the \d+-byte cap"),
    ("10-zero-size-over-cap", lambda m: _set("tensors/e/shape", [0, 2**62, 2**62])(m), errors.TensorSizeError, r"tensor 'e': shape \[0, 4611686018427387904, 4611686018427387904\] of F32 is over"),
    # 13: byte ranges
    ("13-range-negative", _set("shard:w/byte_range", [-1, 47]), errors.InvalidByteRangeError, r"tensor 'w': shard 0: byte_range \[-1, 47\) in '.*' is invalid; expected 0 <= start <= end <= \d+, the file's size"),
    ("13-range-reversed", lambda m: _set("shard:w/byte_range", shard_of(m, "w")["byte_range"][::-1])(m), errors.InvalidByteRangeError, r"tensor 'w': shard 0: byte_range \[\d+, \d+\) in .* is invalid"),
    ("13-range-past-file", lambda m: _set("shard:w/byte_range", [m["files"][0]["size"], m["files"][0]["size"] + 48])(m), errors.InvalidByteRangeError, r"is invalid; expected 0 <= start <= end <= \d+, the file's size"),
    ("13-range-floats", _set("shard:w/byte_range", [0.0, 48.0]), errors.InvalidByteRangeError, r"tensor 'w': shards\.byte_range\[0\]: expected an integer, found 0\.0"),
    ("13-range-strings", _set("shard:w/byte_range", ["0", "48"]), errors.InvalidByteRangeError, r'shards\.byte_range\[0\]: expected an integer, found "0"'),
    ("13-range-bool", lambda m: _set("shard:w/byte_range", [shard_of(m, "w")["byte_range"][0], True])(m), errors.InvalidByteRangeError, r"shards\.byte_range\[1\]: expected an integer, found true"),
    ("13-range-three", _set("shard:w/byte_range", [0, 24, 48]), errors.InvalidByteRangeError, r"tensor 'w': shards\.byte_range must hold 2 integers \(2 for each of 1 shards\), found 3"),
    ("13-range-not-a-list", _set("shard:w/byte_range", "0-48"), errors.InvalidByteRangeError, r'tensor \'w\': shards\.byte_range must be a list of integers, found "0-48"'),
    # 14: aliasing
    ("14-overlapping-tensors", lambda m: _set("shard:w/byte_range", [shard_of(m, "b")["byte_range"][0] + 8, shard_of(m, "b")["byte_range"][0] + 56])(m), errors.OverlappingRangesError, r"byte ranges of '[bw]' \[\d+, \d+\) and '[bw]' \[\d+, \d+\) overlap"),
    # 16: checksum metadata
    ("16-file-crc-missing", _drop_file_field("crc32c"), errors.IntegrityMetadataError, "no crc32c checksum; verification needs one"),
    ("16-file-crc-negative", _file_field("crc32c", -1), errors.IntegrityMetadataError, "crc32c -1 is not a 32-bit unsigned integer"),
    ("16-file-crc-2-32", _file_field("crc32c", 2**32), errors.IntegrityMetadataError, "crc32c 4294967296 is not a 32-bit"),
    ("16-file-crc-hex", _file_field("crc32c", "deadbeef"), errors.IntegrityMetadataError, 'crc32c "deadbeef" is not a 32-bit'),
    ("16-shard-crc-missing", _drop("shard:w/crc32c"), errors.IntegrityMetadataError, r"tensor 'w': the shards have no crc32c checksums; verification needs them"),
    ("16-shard-crc-short", _set("shard:w/crc32c", []), errors.IntegrityMetadataError, r"tensor 'w': its 1 shards need 1 crc32c values in all \(one per \d+-byte block of each shard, in shard order\), found 0"),
    ("16-shard-crc-long", _set("shard:w/crc32c", [1, 2]), errors.IntegrityMetadataError, r"tensor 'w': its 1 shards need 1 crc32c values .* found 2"),
    ("16-shard-crc-not-a-list", _set("shard:w/crc32c", 7), errors.IntegrityMetadataError, r"tensor 'w': shards\.crc32c must be a list of integers, found 7"),
    ("16-shard-crc-negative", _set("shard:w/crc32c", [-5]), errors.IntegrityMetadataError, r"tensor 'w': shards\.crc32c\[0\]: expected a 32-bit unsigned integer, found -5"),
    ("16-shard-crc-2-32", _set("shard:w/crc32c", [2**32]), errors.IntegrityMetadataError, r"shards\.crc32c\[0\]: expected a 32-bit unsigned integer, found 4294967296"),
    ("16-shard-crc-hex", _set("shard:w/crc32c", ["deadbeef"]), errors.IntegrityMetadataError, r'shards\.crc32c\[0\]: expected a 32-bit unsigned integer, found "deadbeef"'),
    ("16-shard-crc-bool", _set("shard:w/crc32c", [True]), errors.IntegrityMetadataError, r"shards\.crc32c\[0\]: expected a 32-bit unsigned integer, found true"),
    ("16-shard-crc-float", _set("shard:w/crc32c", [1.0]), errors.IntegrityMetadataError, r"shards\.crc32c\[0\]: expected a 32-bit unsigned integer, found 1\.0"),
    ("16-algorithm-sha256", _set("checksum_algorithm", "sha256"), errors.IntegrityMetadataError, "checksum_algorithm \"sha256\" is unknown; expected 'crc32c'"),
    ("16-algorithm-none", _set("checksum_algorithm", None), errors.IntegrityMetadataError, "checksum_algorithm null is unknown"),
    # 28: dtype codes
    ("28-dtype-unknown", _set("tensors/w/dtype", "F128"), errors.UnsupportedDtypeError, r"tensor 'w': unknown dtype \"F128\"; expected one of \['BF16'"),
    ("28-dtype-lowercase", _set("tensors/w/dtype", "f32"), errors.UnsupportedDtypeError, 'unknown dtype "f32"'),
    ("28-dtype-int", _set("tensors/w/dtype", 5), errors.UnsupportedDtypeError, "unknown dtype 5"),
    ("28-dtype-torch-name", _set("tensors/w/dtype", "torch.float32"), errors.UnsupportedDtypeError, 'unknown dtype "torch.float32"'),
]


@pytest.mark.parametrize(("mutate", "err", "match"), [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES])
def test_hostile_manifest_field(
    saved: Saved, no_huge_alloc: None, mutate: Callable[[dict[str, Any]], dict[str, Any] | bytes], err: type[Exception], match: str
) -> None:
    saved.put_manifest(mutate(saved.manifest()))
    rejects(saved, err, match)


def test_the_untouched_manifest_is_accepted(saved: Saved) -> None:
    """The cases above change one thing each: the base they start from is valid."""
    saved.put_manifest(saved.manifest())  # our re-encoding is accepted too
    back = saved.restore()
    assert back["step"] == 3
    assert torch.equal(back["w"], small_state()["w"])


def test_hostile_manifest_parse_uses_bounded_memory() -> None:
    """Hostile sizes are refused from their numbers, not by allocating them (tracemalloc)."""
    shape = json.dumps([2, 2**62])
    base = '{"format_version":1,"step":0,"attempt":"a","created":"","world_size":1,"user_metadata":{},'
    base += '"checksum_algorithm":"crc32c","block_bytes":4194304,"files":[{"path":"d/f","size":%d,"crc32c":0}],'
    base += '"tensors":{"t":{"dtype":"F32","shape":%s,"shards":{"file":[0],"offsets":%s,"sizes":%s,'
    base += '"byte_range":[0,%d],"crc32c":[]}}},"objects":{},"tree":{"dict":[["t",{"tensor":"t"}]]},'
    base += '"manifest_crc32c":"00000000"}'
    cases = [
        (base % (2**62, shape, "[0,0]", shape, 2**62), errors.TensorSizeError),  # shape over the cap
        (base % (2**40, "[1099511627776]", "[0]", "[1099511627776]", 2**40), errors.TensorSizeError),  # 4 TiB: range too short
    ]
    for text, err in cases:
        tracemalloc.start()
        try:
            with quickly(), pytest.raises(err, match="tensor 't'"):
                manifest.parse(_reseal(text.encode()), where="m.json")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20


# --- items 11-12: paths ----------------------------------------------------------------------

UNSAFE_PATHS = [
    "../x", "a/../../x", "./x", "/abs/x", "C:\\x", "data\\x.safetensors", "~/x", "~", "a//b",
    "data/\x00x", "data/\x01x", "data/x\n", "%2e%2e/x", "data/%2e%2e/x", "s3://other/x",
    "file:///etc/passwd", "simplecache::s3://x/y", "http://example.com/x", "data/" + "a" * 1100,
    "", "data/", "data/.hidden", "data/-x", "d\u0430ta/x",  # a Cyrillic a
]  # fmt: skip


def _retarget(m: dict[str, Any], new: str) -> dict[str, Any]:
    """Point the one data file (every shard refers to it by index) at ``new``."""
    (entry,) = m["files"]
    entry["path"] = new
    return m


@contextlib.contextmanager
def os_calls_recorded() -> Iterator[list[str]]:
    """Every path given to os.open, os.stat, os.lstat, os.listdir or open() inside the block."""
    seen: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        for mod, name in ((os, "open"), (os, "stat"), (os, "lstat"), (os, "listdir"), (builtins, "open")):
            real = getattr(mod, name)

            def spy(path: Any, *a: Any, _real: Any = real, **kw: Any) -> Any:
                if isinstance(path, str | bytes | os.PathLike):
                    seen.append(os.path.abspath(os.fsdecode(path)))
                return _real(path, *a, **kw)

            mp.setattr(mod, name, spy)
        yield seen


@pytest.mark.parametrize("bad", UNSAFE_PATHS, ids=lambda p: repr(p[:24]))
@pytest.mark.parametrize("backend", ["local", "memory"])
def test_unsafe_file_paths_are_refused_before_any_io(bad: str, backend: str, tmp_path: Path, faulty_root: str) -> None:
    """Refused by the manifest parser, so no data file is opened, inside or outside the root:
    the OS calls (local) and the fsspec calls (memory) made are recorded to prove it."""
    rec = Recorder()
    if backend == "local":
        s = save_small(str(tmp_path / "root"))
    else:
        s = save_small(faulty_root, {"target_protocol": "memory", "recorder": rec})
    s.put_manifest(_retarget(s.manifest(), bad))
    rec.clear()
    with os_calls_recorded() as seen:
        msg = rejects(s, errors.UnsafePathError, r"files\[0\]: unsafe file path")
    assert strictjson.show(bad, 120)[:40] in msg
    assert "expected a relative path of [A-Za-z0-9._-] segments" in msg
    if backend == "local":
        manifest_path = os.path.abspath(f"{s.root}/{MANIFEST}")
        assert manifest_path in seen  # the spy works: the manifest was read through it
        ancestors = {os.path.dirname(manifest_path)}  # realpath's lstat walk of the containment check
        while len(ancestors) < 64 and min(ancestors, key=len) != "/":
            ancestors.add(os.path.dirname(min(ancestors, key=len)))
        others = [p for p in seen if p != manifest_path and p not in ancestors]
        assert not [p for p in others if not p.endswith((".py", ".pyc", ".so"))]
    else:
        assert {c.path for c in rec.calls} == {f"{s.root[len('faulty://'):]}/{MANIFEST}"}


def test_file_paths_that_collide_by_case_are_refused(saved: Saved) -> None:
    m = saved.manifest()
    info = m["files"][0]
    m["files"].append({**info, "path": info["path"].replace("data/", "DATA/", 1)})
    saved.put_manifest(m)
    rejects(saved, errors.UnsafePathError, "differ only in case; they would be one file on a case-insensitive store")


def test_a_non_string_file_path_is_refused(saved: Saved) -> None:
    saved.put_manifest(_file_field("path", 5)(saved.manifest()))
    rejects(saved, errors.UnsafePathError, r"files\[0\]: unsafe file path 5")


def test_a_shard_naming_another_tensors_file_index_is_checked_against_that_file(saved: Saved) -> None:
    """Two files: w's shard moved to file 1 (smaller than its byte range) -> refused, naming it."""
    m = saved.manifest()
    m["files"].append({"path": "data/other.safetensors", "size": 8, "crc32c": 0})
    shard_of(m, "w")["file"] = [1]
    saved.put_manifest(m)
    rejects(saved, errors.InvalidByteRangeError, r"tensor 'w': shard 0: byte_range \[\d+, \d+\) in 'data/other\.safetensors' is invalid; expected 0 <= start <= end <= 8")


# --- item 15: shard coverage -----------------------------------------------------------------


def _with_shards(m: dict[str, Any], key: str, boxes: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
    """Replace ``key``'s shards with ``boxes`` (offsets, sizes), given consecutive byte ranges
    after the tensor's original start (the file's size is grown to hold them)."""
    t = m["tensors"][key]
    (info,) = m["files"]
    pos = t["shards"]["byte_range"][0]
    item = torch.empty((), dtype=getattr(torch, {"F32": "float32", "I64": "int64"}[t["dtype"]])).element_size()
    cols: dict[str, list[int]] = {"file": [], "offsets": [], "sizes": [], "byte_range": [], "crc32c": []}
    for offsets, sizes in boxes:
        n = math.prod(sizes) * item
        cols["file"].append(0)
        cols["offsets"] += offsets
        cols["sizes"] += sizes
        cols["byte_range"] += [pos, pos + n]
        cols["crc32c"] += [0] if n else []
        pos += n
    t["shards"] = cols
    info["size"] = max(info["size"], pos)
    return m


COVERAGE_CASES = [
    # w is F32 [3, 4]
    ("rows-overlap", [([0, 0], [2, 4]), ([1, 0], [2, 4])], "shard 0 at offsets \\[0, 0\\] with sizes \\[2, 4\\] and shard 1 at offsets \\[1, 0\\] with sizes \\[2, 4\\] overlap; each element must be stored once"),
    ("rows-overlap-later", [([0, 0], [1, 4]), ([1, 0], [2, 4]), ([2, 0], [1, 4])], "shard 1 at offsets \\[1, 0\\] with sizes \\[2, 4\\] and shard 2 at offsets \\[2, 0\\] with sizes \\[1, 4\\] overlap"),
    ("rows-gap-and-overlap-same-volume", [([0, 0], [1, 4]), ([2, 0], [1, 4]), ([2, 0], [1, 4])], "shard 1 at offsets \\[2, 0\\] .* and shard 2 at offsets \\[2, 0\\] .* overlap"),
    ("rows-gap", [([0, 0], [1, 4]), ([2, 0], [1, 4])], "the shards cover 8 of 12 elements \\(gaps\\)"),
    ("rows-missing-tail", [([0, 0], [2, 4])], "the shards cover 8 of 12 elements"),
    ("rows-duplicate", [([0, 0], [3, 4]), ([0, 0], [3, 4])], "overlap"),
    ("outside-shape", [([0, 0], [2, 4]), ([2, 0], [2, 4])], "shard 1 at offsets \\[2, 0\\] with sizes \\[2, 4\\] exceeds the shape \\[3, 4\\]"),
    ("negative-offset", [([-1, 0], [3, 4])], "shards\\.offsets\\[0\\]: expected an integer"),
    ("wrong-rank", [([0], [12])], "shards\\.offsets must hold 2 integers \\(2 for each of 1 shards\\), found 1"),
    ("columns-overlap", [([0, 0], [3, 3]), ([0, 2], [3, 2])], "shard 0 at offsets \\[0, 0\\] with sizes \\[3, 3\\] and shard 1 at offsets \\[0, 2\\] .* overlap"),
    ("grid-gap", [([0, 0], [2, 2]), ([0, 2], [2, 2]), ([2, 0], [1, 2])], "cover 10 of 12 elements"),
    ("grid-overlap-same-volume", [([0, 0], [2, 2]), ([0, 2], [2, 2]), ([1, 0], [2, 2])], "overlap"),
    ("grid-overlap-and-gap-same-volume", [([0, 0], [2, 2]), ([0, 2], [2, 2]), ([1, 1], [2, 2])], "overlap"),
]


@pytest.fixture(params=["pairwise", "vectorized"])
def tiling_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a coverage test through both coverage checks: the pairwise one (few shards) and the
    vectorized one (interval sort, corner test, sweep) that many-shard tensors take."""
    if request.param == "vectorized":
        monkeypatch.setattr(coverage, "SMALL_TILING", 1)
    return str(request.param)


@pytest.mark.parametrize(("boxes", "match"), [c[1:] for c in COVERAGE_CASES], ids=[c[0] for c in COVERAGE_CASES])
def test_shard_coverage_errors(saved: Saved, boxes: list[tuple[list[int], list[int]]], match: str, tiling_path: str) -> None:
    saved.put_manifest(_with_shards(saved.manifest(), "w", boxes))
    err = errors.ManifestSchemaError if "expected" in match or "must hold" in match else errors.ShardCoverageError
    rejects(saved, err, rf"tensor 'w': .*{match}")


def test_two_shards_of_a_0d_tensor_overlap(saved: Saved, tiling_path: str) -> None:
    saved.put_manifest(_with_shards(saved.manifest(), "s", [([], []), ([], [])]))
    rejects(saved, errors.ShardCoverageError, r"tensor 's': shard 0 at offsets \[\] with sizes \[\] and shard 1 .* overlap")


@pytest.mark.parametrize(
    "boxes",
    [
        [([0, 0], [2, 4]), ([2, 0], [1, 4])],
        [([0, 0], [3, 1]), ([0, 1], [3, 3])],
        [([2, 0], [1, 2]), ([0, 0], [2, 2]), ([0, 2], [2, 2]), ([2, 2], [1, 2])],
        [([0, 0], [1, 4]), ([1, 0], [2, 1]), ([1, 1], [2, 3])],  # not a grid: a brick wall
        [([0, 0], [3, 4]), ([0, 0], [0, 4]), ([3, 4], [0, 0])],  # zero-size shards cover nothing
    ],
    ids=["rows", "columns", "grid", "brick", "empty-shards"],
)
def test_valid_shardings_are_accepted(saved: Saved, boxes: list[tuple[list[int], list[int]]], tiling_path: str) -> None:
    """The coverage check refuses overlaps and gaps, not legitimate layouts."""
    saved.put_manifest(_with_shards(saved.manifest(), "w", boxes))
    m = saved.read_manifest()
    assert [list(s.offsets) for s in m.tensors["w"].shards] == [b[0] for b in boxes]


def _many_shards(n: int, *, grid: bool, overlap: bool) -> bytes:
    """A synthetic manifest with one F32 tensor cut into ``n`` shards: column slices of [1, n],
    or a sqrt(n) x sqrt(n) grid of [k, k]."""
    k = math.isqrt(n)
    shape = [k, k] if grid else [1, n]
    boxes = [([i, j], [1, 1]) for i in range(k) for j in range(k)] if grid else [([0, j], [1, 1]) for j in range(n)]
    if overlap:
        boxes[-1] = (boxes[-2][0], [1, 1])  # the last shard lands on the one before
    shards = {
        "file": [0] * len(boxes), "offsets": [v for o, _ in boxes for v in o], "sizes": [v for _, s in boxes for v in s],
        "byte_range": [v for i in range(len(boxes)) for v in (4 * i, 4 * i + 4)], "crc32c": [0] * len(boxes),
    }  # fmt: skip
    m = {
        "format_version": 1, "step": 0, "attempt": "a", "created": "", "world_size": len(boxes),
        "user_metadata": {}, "checksum_algorithm": "crc32c", "block_bytes": 1 << 22,
        "files": [{"path": "d/f", "size": 4 * len(boxes), "crc32c": 0}],
        "tensors": {"t": {"dtype": "F32", "shape": shape, "shards": shards}},
        "objects": {}, "tree": {"dict": [["t", {"tensor": "t"}]]},
    }  # fmt: skip
    return manifest.seal(m)


@pytest.mark.parametrize("grid", [False, True], ids=["columns", "grid"])
def test_coverage_check_is_not_quadratic(grid: bool) -> None:
    """20,000 column shards (or a 141 x 141 grid) of one tensor: accepted, and an overlap found,
    in well under the time a pairwise check would take (200 million comparisons)."""
    with quickly():
        m = manifest.parse(_many_shards(20_000, grid=grid, overlap=False), where="m.json")
    assert len(m.tensors["t"].shards) == (141 * 141 if grid else 20_000)
    with quickly(), pytest.raises(errors.ShardCoverageError, match=r"tensor 't': shard \d+ at .* and shard \d+ at .* overlap"):
        manifest.parse(_many_shards(20_000, grid=grid, overlap=True), where="m.json")


# --- item 17: a manifest found at another step -----------------------------------------------


def test_a_manifest_copied_to_another_step_is_refused(saved: Saved) -> None:
    other = f"steps/{2:012d}/manifest.json"
    saved.write(other, saved.read(MANIFEST))
    with quickly(), pytest.raises(errors.ManifestLocationError, match=r"000000000002/manifest\.json: the manifest says step 1 but was found at step 2"):
        ckpt.read_manifest(saved.root, step=2)
    with pytest.raises(errors.ManifestLocationError):
        ckpt.restore(saved.root, step=2)
    # Without a step, the copy is not a checkpoint: skipped with a warning, step 1 restores.
    with pytest.warns(errors.CkptWarning, match="skipping step 2: .*found at step 2"):
        assert ckpt.latest_step(saved.root) == 1


# --- items 18, 19, 29: shard objects on every backend ------------------------------------------


def test_18_missing_shard(saved_any: Saved) -> None:
    path = saved_any.data_file
    saved_any.rm(path)
    with quickly(), pytest.raises(errors.MissingShardError, match=rf"{path}: missing; it holds keys \[.*'w'.*\]"):
        saved_any.restore()


@pytest.mark.parametrize("delta", [-1, -7, -8, 1, 7, 8, 4096], ids=lambda d: f"{d:+d}")
def test_19_truncated_or_extended_shard(saved: Saved, delta: int) -> None:
    path = saved.data_file
    data = saved.read(path)
    saved.write(path, data[:delta] if delta < 0 else data + b"\0" * delta)
    with quickly(), pytest.raises(
        errors.ShardSizeMismatchError, match=rf"{path}: {len(data) + delta} bytes, the manifest says {len(data)}; truncated or extended"
    ):
        saved.restore()


def test_19_truncated_shard_on_every_backend(saved_any: Saved) -> None:
    path = saved_any.data_file
    saved_any.write(path, saved_any.read(path)[:-7])
    with quickly(), pytest.raises(errors.ShardSizeMismatchError, match=f"{path}: .* truncated or extended"):
        saved_any.restore()


def _data_span(s: Saved) -> tuple[int, int]:
    m = s.manifest()
    spans = [t["shards"]["byte_range"][i : i + 2] for t in m["tensors"].values() for i in range(0, len(t["shards"]["byte_range"]), 2)]
    return min(a for a, _ in spans), max(b for _, b in spans)


def test_29_every_flipped_data_bit_is_caught(saved: Saved) -> None:
    """One flipped bit in each byte of the data section: ChecksumMismatchError naming the file,
    the key and the range; never a wrong tensor."""
    path = saved.data_file
    good = saved.read(path)
    m = saved.manifest()
    owner = {i: k for k, t in m["tensors"].items() for i in range(*t["shards"]["byte_range"])}
    lo, hi = _data_span(saved)
    assert hi - lo == 32 + 4 + 48
    for i in range(lo, hi):
        bad = bytearray(good)
        bad[i] ^= 1 << (i % 8)
        saved.write(path, bytes(bad))
        with pytest.raises(
            errors.ChecksumMismatchError, match=rf"{path}: key '{owner[i]}': crc32c of bytes \[\d+, \d+\) is 0x[0-9a-f]{{8}}, the manifest says 0x"
        ):
            saved.restore()


def test_29_bitflip_on_every_backend(saved_any: Saved) -> None:
    path = saved_any.data_file
    data = bytearray(saved_any.read(path))
    data[-1] ^= 0x40  # in the last tensor's bytes
    saved_any.write(path, bytes(data))
    with quickly(), pytest.raises(errors.ChecksumMismatchError, match=f"{path}: key 'w'"):
        saved_any.restore()


def test_flipped_bits_in_the_manifest_give_typed_errors_or_right_tensors(saved: Saved) -> None:
    """Fuzz-style: one flipped bit in every byte of the manifest. Each read either fails with a
    ckpt error or returns the saved tensors bit for bit (the manifest has no checksum of its own:
    a flip inside a string such as ``created`` is not detectable, and not harmful)."""
    good = saved.read(MANIFEST)
    saved_tensors = [t for t in small_state().values() if isinstance(t, torch.Tensor)]
    outcomes: dict[str, int] = {}
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 1 << (i % 8)
        saved.put_manifest(bytes(bad))
        try:
            back = saved.restore()
        except errors.CkptError as err:
            outcomes[type(err).__name__] = outcomes.get(type(err).__name__, 0) + 1
            continue
        outcomes["accepted"] = outcomes.get("accepted", 0) + 1
        # A flip inside a key name renames the key consistently; the data must still be saved data.
        for k, t in back.items():
            if isinstance(t, torch.Tensor):
                assert any(t.dtype == u.dtype and torch.equal(t, u) for u in saved_tensors), f"byte {i}: wrong tensor {k!r}"
    assert sum(v for k, v in outcomes.items() if k != "accepted") > len(good) // 2, outcomes


# --- items 21-26, 28, 30: the safetensors header parser ---------------------------------------


def st_file(header: bytes | dict[str, Any], data: bytes = b"", *, n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def _t(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


HEADER_CASES: list[tuple[str, bytes, type[Exception], str]] = [
    # 21
    ("21-empty-file", b"", errors.NotSafetensorsError, "0 bytes is too small for a safetensors file"),
    ("21-seven-bytes", b"\x02\0\0\0\0\0\0", errors.NotSafetensorsError, "7 bytes is too small"),
    # 22
    ("22-length-past-file", st_file(b"{}", n=3), errors.NotSafetensorsError, r"header length 3 exceeds the file \(10 bytes\)"),
    ("22-length-2-64", st_file(b"{}", n=2**64 - 1), errors.NotSafetensorsError, "header length 18446744073709551615 exceeds"),
    ("22-length-over-cap", st_file(b"{}", n=safetensors_format.MAX_HEADER_BYTES + 1), errors.NotSafetensorsError, r"exceeds the file .* or the 16777216-byte cap"),
    # 23
    ("23-not-utf8", st_file(b'{"\xff": 1}'), errors.HeaderError, r"header: not UTF-8"),
    ("23-not-json", st_file(b"{nope}"), errors.HeaderError, "header: invalid JSON"),
    ("23-array", st_file(b"[]"), errors.NotSafetensorsError, "the header does not start with '{'"),
    ("23-string", st_file(b'"{}"'), errors.NotSafetensorsError, "does not start with '{'"),
    ("23-duplicate-tensor", st_file(b'{"a":' + json.dumps(_t("U8", [1], 0, 1)).encode() + b',"a":' + json.dumps(_t("U8", [1], 0, 1)).encode() + b"}", b"x"), errors.HeaderError, "duplicate key 'a'"),
    ("23-metadata-int", st_file({"__metadata__": {"k": 1}}), errors.HeaderError, r'__metadata__ must map strings to strings, found \{"k": 1\}'),
    ("23-metadata-list", st_file({"__metadata__": ["k"]}), errors.HeaderError, "__metadata__ must map strings to strings"),
    ("23-nan", st_file(b'{"__metadata__":{"k":NaN}}'), errors.HeaderError, "NaN is not allowed"),
    ("23-deep", st_file(b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}"), errors.HeaderError, "nested too deeply"),
    ("23-nul-padding", st_file(b"{}\0\0\0\0\0\0"), errors.HeaderError, "invalid JSON: Extra data"),
    ("23-extra-field", st_file({"a": {**_t("U8", [1], 0, 1), "x": 1}}, b"x"), errors.HeaderError, r"tensor 'a': expected exactly the keys dtype, shape, data_offsets; found \['data_offsets', 'dtype', 'shape', 'x'\]"),
    ("23-not-an-entry", st_file({"a": 5}), errors.HeaderError, "tensor 'a': expected exactly the keys .* found 5"),
    # 24
    ("24-one-offset", st_file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1]}}, b"x"), errors.HeaderError, r"data_offsets \[1\] are not two non-negative integers"),
    ("24-negative-offset", st_file({"a": _t("U8", [1], -1, 0)}, b"x"), errors.HeaderError, r"data_offsets \[-1, 0\] are not two"),
    ("24-reversed", st_file({"a": _t("U8", [0], 1, 0)}, b"x"), errors.HeaderError, r"data_offsets \[1, 0\) hold -1 bytes"),
    ("24-gap", st_file({"a": _t("U8", [1], 0, 1), "b": _t("U8", [1], 2, 3)}, b"xyz"), errors.HeaderError, r"tensor 'b' at data_offsets \[2, 3\) leaves a gap after 'a'; expected it to start at 1"),
    ("24-overlap", st_file({"a": _t("U8", [2], 0, 2), "b": _t("U8", [2], 1, 3)}, b"xyz"), errors.HeaderError, r"tensor 'b' at data_offsets \[1, 3\) overlaps 'a'"),
    ("24-same-bytes", st_file({"a": _t("U8", [2], 0, 2), "b": _t("U8", [2], 0, 2)}, b"xy"), errors.HeaderError, "overlaps"),
    ("24-past-buffer", st_file({"a": _t("U8", [4], 0, 4)}, b"xy"), errors.HeaderError, r"the tensors end at byte \d+ but the file has \d+ bytes"),
    ("24-float-offset", st_file(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1.0]}}', b"x"), errors.HeaderError, r"data_offsets \[0, 1\.0\] are not two"),
    # 25
    ("25-polyglot-tail", st_file({"a": _t("U8", [1], 0, 1)}, b"x" + b"PK\x05\x06" + b"\0" * 18), errors.HeaderError, r"unindexed bytes after the last tensor"),
    # 26
    ("26-size-mismatch", st_file({"a": _t("F32", [2], 0, 4)}, b"xxxx"), errors.HeaderError, r"tensor 'a': data_offsets \[0, 4\) hold 4 bytes, shape \[2\] of F32 needs 8"),
    ("26-overflow", st_file({"a": _t("F32", [2, 2**64 - 2], 0, 8)}, b"x" * 8), errors.HeaderError, r"shape \[2, 18446744073709551614\] has more than 2\*\*64 - 1 elements \(the product overflows\)"),
    # found by tests/format/test_fuzz.py: the product of many huge dimensions was multiplied out in
    # full (quadratic time) and its thousands of digits then failed to print (a bare ValueError)
    ("26-many-huge-dims", st_file(b'{"a":{"dtype":"U8","shape":[' + b",".join([b"18446744073709551615"] * 100_000) + b'],"data_offsets":[0,1]}}', b"x"), errors.HeaderError, r"tensor 'a': shape \[18446744073709551615, .*\.\.\. has more than 2\*\*64 - 1 elements"),
    ("26-overflow-before-a-zero", st_file({"a": _t("U8", [2**40, 2**40, 0], 0, 0)}), errors.HeaderError, "the product overflows"),
    ("26-bits-overflow", st_file({"a": _t("F32", [2**61], 0, 2**63)}), errors.HeaderError, r"shape \[2305843009213693952\] of F32 holds more than 2\*\*64 - 1 bits"),
    ("26-shape-bool", st_file({"a": _t("U8", [True], 0, 1)}, b"x"), errors.HeaderError, r"shape \[true\] is not a list of non-negative integers"),
    ("26-shape-negative", st_file({"a": _t("U8", [-1], 0, 1)}, b"x"), errors.HeaderError, r"shape \[-1\] is not a list"),
    # 28
    ("28-unknown-dtype", st_file({"a": _t("F128", [1], 0, 16)}, b"x" * 16), errors.HeaderError, r"tensor 'a': unknown dtype \"F128\"; expected one of \['BF16'"),
    ("28-sub-byte-dtype", st_file({"a": _t("F4", [2], 0, 1)}, b"x"), errors.HeaderError, 'unknown dtype "F4"'),
    ("28-dtype-null", st_file({"a": {"dtype": None, "shape": [1], "data_offsets": [0, 1]}}, b"x"), errors.HeaderError, "unknown dtype null"),
]  # fmt: skip


@pytest.mark.parametrize(("buf", "err", "match"), [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES])
def test_hostile_safetensors_header(buf: bytes, err: type[Exception], match: str) -> None:
    tracemalloc.start()
    try:
        with quickly(), pytest.raises(err, match=match) as info:
            safetensors_format.parse(buf, file_size=len(buf), where="x/f.safetensors")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value).startswith("x/f.safetensors"), str(info.value)
    assert len(str(info.value)) < 2000
    assert peak < max(8 * len(buf), 1 << 20), peak


def test_header_length_is_checked_against_the_claimed_file_size() -> None:
    """A length prefix is refused from the 8 bytes alone: no read of the claimed header."""
    prefix = struct.pack("<Q", 1 << 40)
    with pytest.raises(errors.NotSafetensorsError, match="header length 1099511627776 exceeds"):
        safetensors_format.header_length(prefix, file_size=(1 << 41), where="f")
    with pytest.raises(errors.NotSafetensorsError, match="too small"):
        safetensors_format.header_length(b"\0\0\0\0", file_size=4, where="f")


# --- item 30: pickle, zip and torch.save files where a shard should be -------------------------


class _Boom:
    """Unpickling this creates a directory: the proof that a loader executed stored code."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.sentinel,))


def hostile_payloads(sentinel: Path) -> dict[str, bytes]:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3), "boom": _Boom(sentinel)}, buf)
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("data.pkl", pickle.dumps(_Boom(sentinel)))
    return {
        "pickle-p2": pickle.dumps(_Boom(sentinel), protocol=2),
        "pickle-p5": pickle.dumps(_Boom(sentinel), protocol=5),
        "pickle-p0": pickle.dumps(_Boom(sentinel), protocol=0),
        "zip": z.getvalue(),
        "torch-save": buf.getvalue(),
    }


def test_the_pickle_payload_is_live(tmp_path: Path) -> None:
    """The payloads below really execute when unpickled (so their sentinel means something)."""
    probe = tmp_path / "probe"
    pickle.loads(hostile_payloads(probe)["pickle-p2"])
    assert probe.is_dir()


@pytest.mark.parametrize("kind", ["pickle-p2", "pickle-p5", "pickle-p0", "zip", "torch-save"])
def test_30_not_safetensors_is_refused_and_never_loaded(kind: str, saved: Saved, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    payload = hostile_payloads(sentinel)[kind]
    # the parser (what ckpt.lifecycle.verify and adopt use) names the format and refuses it
    with pytest.raises(errors.NotSafetensorsError, match="not a safetensors file") as info:
        safetensors_format.parse(payload, file_size=len(payload), where="x/f.safetensors")
    if kind.startswith("pickle-p") and kind != "pickle-p0":
        assert "looks like pickled Python data" in str(info.value)
    if kind in ("zip", "torch-save"):
        assert "looks like a zip archive (torch.save writes these)" in str(info.value)
    # restore: the same bytes in place of a shard, cut or padded to its size
    path = saved.data_file
    size = len(saved.read(path))
    saved.write(path, (payload + b"\0" * size)[:size])
    with quickly(), pytest.raises(errors.ChecksumMismatchError, match=f"{path}: key '.*': crc32c"):
        saved.restore()
    # ... and as they are (another size)
    saved.write(path, payload if len(payload) != size else payload + b"\0")
    with pytest.raises(errors.ShardSizeMismatchError, match=path):
        saved.restore()
    # ... and as the manifest
    saved.put_manifest(payload)
    with pytest.raises(errors.ManifestError, match=r"manifest\.json"):
        saved.read_manifest()
    assert not sentinel.exists(), "a stored payload was executed"


def test_a_foreign_safetensors_file_with_the_right_size_is_a_checksum_error(saved: Saved) -> None:
    """A valid safetensors file (another model's) of exactly the shard's size: the header parses,
    the data is wrong, the block crc32c says so; no data is returned."""
    import safetensors.torch

    path = saved.data_file
    size = len(saved.read(path))
    other = next(b for k in range(size) if len(b := safetensors.torch.save({"x": torch.ones(k, dtype=torch.uint8)})) == size)
    assert safetensors_format.parse(other, file_size=size, where="other").entries[0].name == "x"
    saved.write(path, other)
    with pytest.raises(errors.ChecksumMismatchError, match=path):
        saved.restore()


# --- item 31: local file system: links, FIFOs, directories -----------------------------------


def _path_of_length(base: Path, total: int) -> Path:
    """A new file path under ``base`` whose absolute string is exactly ``total`` bytes long."""
    p = base
    while len(str(p)) + 1 + 200 < total - 60:
        p = p / ("d" * 200)
    name_len = total - len(str(p)) - 1
    assert 1 <= name_len <= 255, name_len
    p.mkdir(parents=True, exist_ok=True)
    return p / ("f" * name_len)


def test_31_a_symlinked_shard_is_not_followed(saved: Saved, tmp_path: Path) -> None:
    """The link's own size equals the shard's (so the size check passes) and its target is the
    real shard, outside the root: only O_NOFOLLOW stands in the way."""
    path = saved.data_file
    full = Path(saved.root) / path
    size = full.stat().st_size
    target = _path_of_length(tmp_path / "outside", size)
    target.write_bytes(full.read_bytes())
    full.unlink()
    full.symlink_to(target)
    assert os.lstat(full).st_size == size
    with quickly(), pytest.raises(errors.UnsafePathError, match=rf"{path}: is a symbolic link; ckpt never follows links"):
        saved.restore()


def test_31_a_fifo_in_place_of_a_shard_does_not_hang(saved: Saved) -> None:
    full = Path(saved.root) / saved.data_file
    full.unlink()
    os.mkfifo(full)
    with quickly(), pytest.raises(errors.UnsafePathError, match=r"is a FIFO, not a regular file"):
        saved.restore()  # named for what it is (it was once "truncated or extended")


def test_31_a_directory_in_place_of_a_shard(saved: Saved) -> None:
    full = Path(saved.root) / saved.data_file
    full.unlink()
    full.mkdir()
    with quickly(), pytest.raises(errors.UnsafePathError, match=f"{saved.data_file}: is a directory, not a regular file"):
        saved.restore()


def test_31_a_symlinked_data_directory_pointing_outside_is_refused(saved: Saved, tmp_path: Path) -> None:
    path = saved.data_file
    d = (Path(saved.root) / path).parent
    outside = tmp_path / "elsewhere"
    d.rename(outside)
    d.symlink_to(outside, target_is_directory=True)
    with pytest.raises(errors.UnsafePathError):
        saved.restore()


def test_31_a_symlinked_manifest_pointing_outside_is_refused(saved: Saved, tmp_path: Path) -> None:
    full = Path(saved.root) / MANIFEST
    outside = tmp_path / "other-manifest.json"
    outside.write_bytes(full.read_bytes())
    full.unlink()
    full.symlink_to(outside)
    with pytest.raises(errors.CkptError):
        saved.read_manifest()


# --- item 32: LATEST is a hint that ckpt never follows ---------------------------------------


@pytest.mark.parametrize(
    "latest",
    [b'{"step": 99}', b'{"step": 0}', b"\x80\x04garbage", b"[" * 100_000, b'{"step": ' + b"9" * 5000 + b"}", b""],
    ids=["dangling", "older", "binary", "deep", "digits", "empty"],
)
def test_32_latest_never_matters(latest: bytes, tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    ckpt.save(root, {"x": torch.tensor(1)}, step=1)
    ckpt.save(root, {"x": torch.tensor(2)}, step=2)
    Path(root, "LATEST").write_bytes(latest)
    with quickly():
        assert ckpt.latest_step(root) == 2
        assert ckpt.restore(root)["x"].item() == 2
    ckpt.save(root, {"x": torch.tensor(3)}, step=3)
    hint = json.loads(Path(root, "LATEST").read_bytes())
    # the hint moves forward, and one naming a step that is not there (99) is repaired
    assert hint == {"step": 3}


def test_32_latest_naming_a_newer_committed_step_is_kept(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    ckpt.save(root, {"x": torch.tensor(5)}, step=5)
    ckpt.save(root, {"x": torch.tensor(3)}, step=3)  # an older step saved later (a backfill)
    assert json.loads(Path(root, "LATEST").read_bytes()) == {"step": 5}


def test_32_removed_latest_step_manifest(tmp_path: Path) -> None:
    """The newest step is retired (manifest removed) while LATEST still names it."""
    root = str(tmp_path / "root")
    ckpt.save(root, {"x": torch.tensor(1)}, step=1)
    ckpt.save(root, {"x": torch.tensor(2)}, step=2)
    os.unlink(Path(root, f"steps/{2:012d}/manifest.json"))
    assert json.loads(Path(root, "LATEST").read_bytes()) == {"step": 2}
    assert ckpt.latest_step(root) == 1
    assert ckpt.restore(root)["x"].item() == 1
    with pytest.raises(errors.CheckpointNotFoundError, match="no committed checkpoint for step 2"):
        ckpt.restore(root, step=2)


# --- item 33: NaN and infinities in tensor values are data ------------------------------------


def test_33_non_finite_values_round_trip_bit_exactly(tmp_path: Path) -> None:
    bits = torch.tensor([0x7FC00000, 0x7FC00001, 0xFFC00000, 0x7F800000, 0xFF800000, 0x80000000], dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)
    root = str(tmp_path / "root")
    ckpt.save(root, {"x": x}, step=0)
    back = ckpt.restore(root)["x"]
    assert torch.equal(back.view(torch.int32), x.view(torch.int32))


# --- the resource cases, through restore --------------------------------------------------------


def test_a_4tib_tensor_over_a_small_file_is_refused_before_allocating(saved: Saved, no_huge_alloc: None) -> None:
    """Parse accepts a 4 TiB tensor whose byte range fits a file of 4 TiB, as the manifest
    claims; the size check on the real file refuses it before any buffer is allocated."""
    m = saved.manifest()
    (info,) = m["files"]
    info["size"] = 2**42 + 4096
    sh = shard_of(m, "w")
    m["tensors"]["w"]["shape"] = [2**40]
    sh.update(offsets=[0], sizes=[2**40], byte_range=[4096, 4096 + 2**42], crc32c=[0] * (2**42 // m["block_bytes"]))
    saved.put_manifest(m)
    with quickly(), pytest.raises(errors.ShardSizeMismatchError, match=rf"the manifest says {2**42 + 4096}"):
        saved.restore()


def test_messages_stay_short_for_huge_values(saved: Saved) -> None:
    m = saved.manifest()
    m["tensors"]["w"]["dtype"] = "X" * 10_000_000
    saved.put_manifest(m)
    msg = rejects(saved, errors.UnsupportedDtypeError, r'unknown dtype "XXXX.*\.\.\.')
    assert len(msg) < 1000




# --- the manifest's own checksum ---------------------------------------------------------------


def test_manifest_seal_every_single_bit_flip_is_detected(tmp_path: Path) -> None:
    """Flip each bit of a real manifest in turn: every flip is refused with a ManifestError (the
    seal catches the ones that still parse, e.g. a renamed key or a changed string)."""
    root = str(tmp_path / "run")
    ckpt.save(root, {"step": 3, "model": {"w": torch.ones(2)}, "name": "run-a"}, step=1)
    path = Path(root, MANIFEST)
    good = path.read_bytes()
    caught: dict[str, int] = {}
    for i in range(len(good)):
        for bit in range(8):
            bad = bytearray(good)
            bad[i] ^= 1 << bit
            with pytest.raises(errors.ManifestError) as info:
                manifest.parse(bytes(bad), where="m.json", expected_step=1)
            caught[type(info.value).__name__] = caught.get(type(info.value).__name__, 0) + 1
    assert sum(caught.values()) == 8 * len(good)
    assert caught.get("ManifestChecksumError", 0) > 0


def test_a_damaged_newest_manifest_is_skipped_not_restored(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    ckpt.save(root, {"step": 1}, step=1)
    ckpt.save(root, {"step": 2}, step=2)
    p = Path(root, "steps/000000000002/manifest.json")
    p.write_bytes(p.read_bytes().replace(b'"step":2', b'"step":3', 1).replace(b'"step":3,"att', b'"step":2,"att', 1))
    raw = p.read_bytes().replace(b'{"object":"step"}', b'{"object":"stdp"}')
    p.write_bytes(raw)
    with pytest.warns(errors.CkptWarning, match="skipping step 2"):
        assert ckpt.latest_step(root) == 1
    with pytest.raises(errors.ManifestError):
        ckpt.restore(root, step=2)


@pytest.mark.parametrize(
    "state",
    [{"s": "\ud800"}, {"\udcff": 1}, {"t": torch.ones(1), "m": {"x\udc80": torch.ones(1)}}, {"o": {"k": ["ok", "\ud83d"]}}],
    ids=["value", "object-key", "tensor-key", "nested"],
)
def test_a_lone_surrogate_in_the_state_is_a_state_error(state: dict[str, Any], tmp_path: Path) -> None:
    """Found by tests/format/test_fuzz.py: a str holding a lone UTF-16 surrogate (e.g. from
    os.fsdecode of a non-UTF-8 file name) failed deep in the save with a bare UnicodeEncodeError;
    it is now refused up front, naming the key."""
    with pytest.raises(errors.StateError, match="lone UTF-16 surrogate"):
        ckpt.save(str(tmp_path), state, step=STEP)
    assert not list(tmp_path.glob("steps/*/manifest.json"))


# --- a manifest re-serialized by a JSON tool ------------------------------------------------


@pytest.mark.parametrize("indent", [None, 2], ids=["spaced", "indented"])
def test_a_reserialized_manifest_is_named_for_what_happened(indent: int | None, tmp_path: Path) -> None:
    """``python -m json.tool`` keeps every member and their order; the seal covers the exact bytes
    ckpt wrote, so the error must say the file was re-serialized, not that the seal is misplaced."""
    root = str(tmp_path / "root")
    ckpt.save(root, {"x": torch.tensor(1)}, step=1)
    path = Path(root, f"steps/{1:012d}/manifest.json")
    obj = json.loads(path.read_bytes())
    assert list(obj)[-1] == "manifest_crc32c"  # it is last: only the layout changed
    path.chmod(0o644)
    path.write_text(json.dumps(obj, indent=indent))
    with pytest.raises(errors.IntegrityMetadataError, match="re-serialized") as err:
        ckpt.read_manifest(root, 1)
    assert "not written as its last member" not in str(err.value)
