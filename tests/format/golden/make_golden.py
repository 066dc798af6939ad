"""Write the golden compatibility corpus of a format version (run once per version, from the repo root):

    .venv/bin/python tests/format/golden/make_golden.py 3

(``1`` wrote ``v1/``, before format v2 existed: a v1 corpus is no longer written, since ckpt now
writes small manifests as v1 and the v1 files on disk are what older releases wrote. ``2`` writes
``v2/``, the paged manifest of FORMAT.md 4.8, forced on this small state with
``SaveOptions(paged_manifest=True)``, with the same alterations and one more: a bit flipped in a
page of the body. ``3`` writes ``v3/``, the manifest of an incremental save (FORMAT.md 4.9): v2's
lines with a content hash per shard, made with ``SaveOptions(incremental=True)``. Since v3
exists, the v2 corpus's "future-version" copy (v2 head saying 3) is a malformed v3 manifest,
``ManifestSchemaError``: its expectation was changed by hand.)

``tests/format/golden/v1/good/`` is a tiny checkpoint root (step 1) made by ``ckpt.save`` from
:func:`golden_state`, made deterministic by rewriting the random attempt id and the creation
time in the manifest (and renaming the data directory to match). Each other directory under
``v1/`` is a full copy of it with one alteration. ``v1/expected.json`` holds the exact value the
good copy must restore to (see :func:`describe`) and, for each altered copy, whether it must
still load or the typed error it must raise.

Once released, these files are never regenerated for v1: they are what older releases wrote,
and every later ckpt must keep reading them (tests/format/test_golden.py). (They were regenerated once,
before the first release, when v1's shards became columnar tables: FORMAT.md 4.4.)
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
STEP = 1
ATTEMPT = "golden"
CREATED = "2025-01-01T00:00:00+00:00"
MANIFEST = f"steps/{STEP:012d}/manifest.json"


def golden_state() -> dict[str, Any]:
    """The saved state: several dtypes incl. bf16, a 0-d and a zero-size tensor, nested
    dict/tuple/OrderedDict (with state_dict ``_metadata``), a numpy array and plain objects."""
    model: OrderedDict[str, Any] = OrderedDict(
        [
            ("w", torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7),
            ("b16", torch.arange(6, dtype=torch.float32).to(torch.bfloat16) * 0.5 - 1),
            ("h", torch.tensor([1.0, -2.5, float("inf"), float("nan")], dtype=torch.float16)),
            ("i8", torch.tensor([-128, 0, 127], dtype=torch.int8)),
            ("mask", torch.tensor([True, False, True])),
        ]
    )
    model._metadata = OrderedDict([("", {"version": 1})])  # type: ignore[attr-defined]
    return {
        "model": model,
        "scalar": torch.tensor(42, dtype=torch.int64),
        "empty": torch.zeros(0, 3, dtype=torch.float64),
        "np": np.arange(5, dtype=np.int32),
        "nested": {"pair": (torch.tensor([1, 2], dtype=torch.uint8), {"k": 1}), "names": ["a", "é"]},
        "objects": {
            "big": 2**100,
            "neg_big": -(3**50),
            "nan": float("nan"),
            "neg_zero": -0.0,
            "inf": float("-inf"),
            "bytes": b"\x00\xffckpt",
            "tuple": (1, "two", None, True),
            "odict": OrderedDict([("z", 1), ("a", 2)]),
            "np_scalar": np.float32(1.5),
            7: "an int key",
        },
        "step": 100,
    }


def describe(x: Any) -> Any:
    """An exact, JSON-able description of a value: types, dtypes, shapes and raw bytes."""
    if isinstance(x, torch.Tensor):
        raw = x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"tensor": [str(x.dtype), list(x.shape), raw.hex()]}
    if isinstance(x, np.ndarray):
        return {"ndarray": [x.dtype.str, list(x.shape), x.tobytes().hex()]}
    if isinstance(x, np.generic):
        return {"np": [x.dtype.str, x.tobytes().hex()]}
    if x is None or isinstance(x, bool | str):
        return {type(x).__name__: x}
    if type(x) is int:
        return {"int": str(x)}
    if type(x) is float:
        return {"float": struct.pack(">d", x).hex()}
    if type(x) is bytes:
        return {"bytes": x.hex()}
    if type(x) in (list, tuple):
        return {type(x).__name__: [describe(v) for v in x]}
    if type(x) is OrderedDict:
        meta = getattr(x, "_metadata", None)
        return {"odict": [[describe(k), describe(v)] for k, v in x.items()], "metadata": describe(meta)}
    if type(x) is dict:
        return {"dict": [[describe(k), describe(v)] for k, v in x.items()]}
    raise TypeError(f"cannot describe a {type(x).__name__}")


# Each altered copy: (what is done, the error restore must raise or None if it must load, a
# regex its message must match).
DAMAGE: dict[str, tuple[str, str | None, str]] = {
    "bitflip-data": ("one bit flipped in model/w's bytes", "ChecksumMismatchError", r"key 'model/w': crc32c of bytes"),
    "truncated-shard": ("model/w's file cut by 7 bytes", "ShardSizeMismatchError", r"truncated or extended"),
    "missing-shard": ("model/w's file deleted", "MissingShardError", r"missing; it holds keys \['model/w'"),
    "unknown-dtype": ("model/w's dtype set to F128 in the manifest", "UnsupportedDtypeError", r"tensor 'model/w': unknown dtype \"F128\""),
    "future-version": ("format_version set to 4", "UnsupportedFormatError", r"format_version 4 is not supported"),
    "manifest-traversal": ("model/w's file renamed to ../../outside.safetensors in the manifest", "UnsafePathError", r"unsafe file path \"\.\./\.\./outside\.safetensors\""),
    "bitflip-manifest": ("one bit flipped in the manifest's created string (still valid JSON)", "ManifestChecksumError", r"the manifest's crc32c is [0-9a-f]{8} but it records"),
    "bitflip-page": ("one bit flipped in the body's first page of tensor entries", "ManifestChecksumError", r"page 0 has crc32c [0-9a-f]{8} but the head records"),
    "dangling-latest": ("LATEST names step 99, which does not exist (a hint only)", None, ""),
    "no-latest": ("LATEST removed (a hint only)", None, ""),
}  # fmt: skip


def _file_of(m: dict[str, Any], key: str) -> str:
    (index,) = m["tensors"][key]["shards"]["file"]  # one shard: its file's position in "files"
    return str(m["files"][index]["path"])


def main(version: int) -> None:
    sys.path.insert(0, str(HERE.parents[2]))  # the repo root
    import ckpt
    from ckpt.format import _manifest_pages
    from ckpt.format import manifest as manifest_mod

    if version != 3:
        raise SystemExit("only the v3 corpus is written now (see the docstring)")
    out = HERE / f"v{version}"
    if out.exists():
        shutil.rmtree(out)
    good = out / "good"
    state = golden_state()
    opts = ckpt.SaveOptions(max_file_bytes=64, block_bytes=16, fsync=False, incremental=True)
    m0 = ckpt.save(str(good), state, step=STEP, options=opts)

    def load(raw: bytes) -> dict[str, Any]:  # the manifest as its v1-shaped fields
        return manifest_mod.parse(raw, where="golden").fields()

    def store(fields: dict[str, Any], *, version: int = 3) -> bytes:
        data = _manifest_pages.encode(fields)[0]
        if version == 3:
            return data
        head, body = _manifest_pages.split(data)
        value = json.loads(head)
        value["format_version"] = version
        return manifest_mod.seal(value) + b"\n" + bytes(body)

    # Determinism: fixed attempt id and creation time; the data directory renamed to match.
    mpath = good / MANIFEST
    m = load(mpath.read_bytes())
    old_dir, new_dir = f"data/{STEP:012d}-{m0.attempt}", f"data/{STEP:012d}-{ATTEMPT}"
    (good / old_dir).rename(good / new_dir)
    m["attempt"], m["created"] = ATTEMPT, CREATED
    for f in m["files"]:  # shards name files by their index in this list
        f["path"] = f["path"].replace(old_dir, new_dir, 1)
    mpath.write_bytes(store(m))
    assert describe(ckpt.restore(str(good))) == describe(state), "the good copy does not round-trip"
    assert ckpt.read_manifest(str(good)).format_version == version

    victim = _file_of(m, "model/w")
    for name in DAMAGE:
        root = out / name
        shutil.copytree(good, root)
        mp = root / MANIFEST
        dm = load(mp.read_bytes())
        to = 3
        if name == "bitflip-data":
            (start, _), data = dm["tensors"]["model/w"]["shards"]["byte_range"], bytearray((root / victim).read_bytes())
            data[start + 5] ^= 0x10
            (root / victim).write_bytes(bytes(data))
        elif name == "truncated-shard":
            (root / victim).write_bytes((root / victim).read_bytes()[:-7])
        elif name == "missing-shard":
            (root / victim).unlink()
        elif name == "unknown-dtype":
            dm["tensors"]["model/w"]["dtype"] = "F128"
        elif name == "future-version":
            to = 4
        elif name == "manifest-traversal":
            bad = "../../outside.safetensors"
            for f in dm["files"]:
                if f["path"] == victim:
                    f["path"] = bad
        elif name in ("bitflip-manifest", "bitflip-page"):
            raw = bytearray(mp.read_bytes())
            mark = b'"created":"' if name == "bitflip-manifest" else b'"dtype":"'
            at = raw.index(mark) if name == "bitflip-manifest" else raw.index(mark, raw.index(b"\n"))
            raw[at + len(mark)] ^= 0x01
            mp.write_bytes(bytes(raw))
            continue  # the flipped bytes are the point: do not re-seal them
        elif name == "dangling-latest":
            (root / "LATEST").write_bytes(b'{"step":99}')
        elif name == "no-latest":
            (root / "LATEST").unlink()
        if dm != m or to != 3:
            mp.write_bytes(store(dm, version=to))

    expected = {
        "format_version": version,
        "step": STEP,
        "state": describe(state),
        "damaged": {k: {"change": c, "error": e, "match": r} for k, (c, e, r) in DAMAGE.items()},
    }
    # A tensor entry is validated when it is used (FORMAT.md 4.8): the newest-step search, which
    # checks the head, the tree, the objects and every checksum, does not skip this step.
    expected["damaged"]["unknown-dtype"]["found_when_used"] = True
    (out / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total} bytes, {len(DAMAGE)} altered copies)")
    assert total < 100_000, total


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
