"""Integrity at scale (reliability.md 5.1, items 19 and 20): 1,000 seeded single-bit flips
spread over the manifest, the safetensors headers and the data bytes of a real three-file
checkpoint, and truncations and extensions of every file.

For each flip the pristine checkpoint is damaged in place (one bit of one file), restored in
full and on two random regions, and verified; then the byte is put back. Outcomes:

- **detected**: a typed error (``CkptError``) from restore or a problem in ``verify``'s report,
  naming the file, and the key where the flip hit a tensor's data or its header entry;
- **harmless**: restore returned the saved tensors bit for bit (every restore of every flip is
  checked for that when it does not raise) and verify found nothing. Which bits could be
  harmless? None: the manifest carries its own crc32c over every byte (a flipped digit of that
  crc itself no longer matches), every data-file byte, header and padding included, is under
  the file's crc32c (checked by verify), and every data byte under its block's crc32c (checked
  by restore). So the test requires no harmless flip at all, and no wrong tensor ever.

Restore reads only the byte ranges the manifest names, never a header: a flipped header bit is
invisible to restore (which returns the right tensors) and caught by verify (file crc32c, and
the header check naming the tensor when the header still parses).

Truncations and extensions by 1, 7, 8 and 4096 bytes of every file: data files are refused by
the size check before any byte is read or parsed (ShardSizeMismatchError naming the file);
the manifest, whose size nothing records, is refused by its parser or its crc32c; LATEST is a
hint that ckpt never reads (restore lists ``steps/``), so damaging it is harmless.
"""

from __future__ import annotations

import json
import os
import random
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt import errors
from ckpt.engine.owners import chunk
from tests.lifecycle.test_save_restore import _random

STEP = 1
MANIFEST = f"steps/{STEP:012d}/manifest.json"
N_FLIPS = 1000
SHARE = {"manifest": 0.25, "header": 0.25, "data": 0.50}
OPTS = ckpt.RestoreOptions(num_threads=1)


def _state() -> dict[str, torch.Tensor]:
    return {
        "w": _random(torch.float32, (192, 128), 1),  # 96 KiB, row-sharded over 3 writers
        "e": _random(torch.bfloat16, (64, 256), 2),  # 32 KiB, column-sharded over 2
        "i": _random(torch.int64, (1000,), 3),  # rank 1's own
        "f8": _random(torch.float8_e4m3fn, (4096,), 4),  # rank 2's own
        "m": _random(torch.bool, (3000,), 5),  # rank 0's own
        "s": _random(torch.float64, (), 6),  # 0-d
        "z": torch.zeros(0, 5),  # zero-size
    }


@dataclass
class Ckpt:
    root: Path
    full: dict[str, torch.Tensor]
    pristine: dict[str, bytes]  # relative path -> bytes
    data_files: list[str]
    header_end: dict[str, int]  # data file -> 8 + N
    owner: dict[str, list[tuple[int, int, str]]]  # data file -> (start, end, key) of each shard
    entries: dict[str, list[tuple[int, int, str]]]  # data file -> (start, end, name) of each header entry

    def put(self, rel: str, data: bytes) -> None:
        p = self.root / rel
        os.chmod(p, 0o644)
        p.write_bytes(data)


def _save(root: Path) -> Ckpt:
    full = _state()
    a = ckpt.begin(str(root), step=STEP, world_size=3, options=ckpt.SaveOptions(block_bytes=1024, fsync=False))
    reports = []
    for r in range(3):
        part: dict[str, Any] = {}
        off, n = chunk(192, 3, r)
        part["w"] = ckpt.Shard(full["w"][off : off + n].clone(), (192, 128), (off, 0))
        if r < 2:
            part["e"] = ckpt.Shard(full["e"][:, 128 * r : 128 * r + 128].clone(), (64, 256), (0, 128 * r))
        part.update({0: {"m": full["m"], "s": full["s"], "z": full["z"]}, 1: {"i": full["i"]}, 2: {"f8": full["f8"]}}[r])
        reports.append(ckpt.write_shards(a, part, rank=r))
    m = ckpt.commit(a, reports)
    data_files = sorted(m.files)
    assert len(data_files) == 3
    pristine = {rel: (root / rel).read_bytes() for rel in [*data_files, MANIFEST, "LATEST"]}
    header_end: dict[str, int] = {}
    owner: dict[str, list[tuple[int, int, str]]] = {}
    entries: dict[str, list[tuple[int, int, str]]] = {}
    for f in data_files:
        buf = pristine[f]
        (n,) = struct.unpack("<Q", buf[:8])
        header_end[f] = 8 + n
        text = buf[8 : 8 + n].decode()
        entries[f] = []
        for name in json.loads(text):
            if name == "__metadata__":  # not a tensor entry: covered by the file crc32c only
                continue
            at = text.index(json.dumps(name) + ":{")
            entries[f].append((8 + at, 8 + text.index("]}", at) + 2, name))
        owner[f] = [(s.byte_range.start, s.byte_range.end, k) for k, t in m.tensors.items() for s in t.shards if s.file == f]
    return Ckpt(root, full, pristine, data_files, header_end, owner, entries)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Ckpt:
    return _save(tmp_path_factory.mktemp("bitflips") / "root")


def _raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _regions(rng: random.Random, c: Ckpt) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    out = []
    for key in rng.sample(["w", "e", "i", "f8", "m"], 2):
        shape = tuple(c.full[key].shape)
        offs = tuple(rng.randrange(d) for d in shape)
        out.append((key, offs, tuple(rng.randint(1, d - o) for d, o in zip(shape, offs, strict=True))))
    return out


@dataclass
class Result:
    errors: list[errors.CkptError]  # from the restores
    verify: list[str]  # verify's problem messages, or the ManifestError it raised
    wrong: list[str]  # tensors that came back different: must stay empty


def _check(c: Ckpt, rng: random.Random) -> Result:
    res = Result([], [], [])
    try:
        back = ckpt.restore(str(c.root), step=STEP, options=OPTS)
    except errors.CkptError as err:
        res.errors.append(err)
    else:
        res.wrong += [k for k, t in c.full.items() if back[k].dtype != t.dtype or back[k].shape != t.shape or _raw(back[k]) != _raw(t)]
    for key, offs, sizes in _regions(rng, c):
        t = c.full[key]
        target = {key: ckpt.Shard.empty(tuple(t.shape), offs, sizes, t.dtype)}
        try:
            ckpt.restore(str(c.root), step=STEP, target=target, options=OPTS)
        except errors.CkptError as err:
            res.errors.append(err)
        else:
            sl = tuple(slice(o, o + s) for o, s in zip(offs, sizes, strict=True))
            if _raw(target[key].tensor) != _raw(t[sl]):
                res.wrong.append(f"{key} at {offs} size {sizes}")
    try:
        report = ckpt.verify(str(c.root), step=STEP, num_threads=1)
    except errors.ManifestError as err:
        res.verify.append(str(err))
    else:
        res.verify += report.problems
    return res


def _flip_targets(c: Ckpt, rng: random.Random) -> Iterator[tuple[str, str, int, int]]:
    """(kind, file, byte, bit) for N_FLIPS flips, spread as SHARE says."""
    for kind, share in SHARE.items():
        for _ in range(round(N_FLIPS * share)):
            if kind == "manifest":
                f, lo, hi = MANIFEST, 0, len(c.pristine[MANIFEST])
            else:
                f = rng.choice(c.data_files)
                lo, hi = (0, c.header_end[f]) if kind == "header" else (c.header_end[f], len(c.pristine[f]))
            yield kind, f, rng.randrange(lo, hi), rng.randrange(8)


def _flip(path: Path, at: int, bit: int) -> int:
    with open(path, "r+b") as fh:
        fh.seek(at)
        (old,) = fh.read(1)
        fh.seek(at)
        fh.write(bytes([old ^ (1 << bit)]))
    return old


def _put_back(path: Path, at: int, old: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(bytes([old]))


def test_1000_single_bit_flips_are_detected_and_never_return_a_wrong_tensor(saved: Ckpt) -> None:
    c = saved
    for rel in c.pristine:
        os.chmod(c.root / rel, 0o644)
    rng = random.Random(20261126)
    outcomes: Counter[str] = Counter()
    t0 = time.perf_counter()
    for kind, f, at, bit in _flip_targets(c, rng):
        path = c.root / f
        old = _flip(path, at, bit)
        try:
            res = _check(c, rng)
        finally:
            _put_back(path, at, old)
        where = f"{kind} {f} byte {at} bit {bit}"
        assert not res.wrong, f"{where}: wrong tensors returned: {res.wrong}"
        for err in res.errors:  # every restore error names the damaged file
            assert f in str(err), f"{where}: {type(err).__name__} does not name the file: {err}"
        if not res.errors and not res.verify:
            outcomes[f"{kind}: harmless"] += 1
            continue
        assert res.verify, f"{where}: restore failed but verify found nothing ({res.errors[0]})"
        assert any(f in msg for msg in res.verify), f"{where}: verify does not name the file: {res.verify}"
        if kind == "manifest":
            assert len(res.errors) == 3, where
            assert all(isinstance(e, errors.ManifestError) for e in res.errors), where
            outcomes[f"manifest: {type(res.errors[0]).__name__}"] += 1
        elif kind == "data":
            key = next(k for s, e, k in c.owner[f] if s <= at < e)
            assert any(f"key {key!r}" in msg for msg in res.verify), f"{where}: verify does not name {key!r}: {res.verify}"
            assert res.errors, f"{where}: the full restore read a damaged block without noticing"
            for err in res.errors:
                assert isinstance(err, errors.ChecksumMismatchError), f"{where}: {err!r}"
                assert f"key {key!r}" in str(err), f"{where}: {err}"
            outcomes[f"data: caught by restore ({len(res.errors)} of 3 reads) and verify"] += 1
        else:
            assert not res.errors, f"{where}: restore never reads headers, yet failed: {res.errors[0]}"
            name = next((n for s, e, n in c.entries[f] if s <= at < e), None)
            parsed = not any(w in msg for msg in res.verify for w in ("invalid JSON", "not UTF-8", "header length", "does not start with"))
            if name is not None and parsed:
                assert any(repr(name) in msg for msg in res.verify), f"{where}: verify does not name {name!r}: {res.verify}"
                outcomes["header entry: verify names the tensor"] += 1
            elif name is not None:
                outcomes["header entry: header no longer parses, verify names the file"] += 1
            else:
                outcomes["header framing, __metadata__ or padding: verify names the file"] += 1
    elapsed = time.perf_counter() - t0
    assert sum(outcomes.values()) == N_FLIPS
    assert not any(k.endswith("harmless") for k in outcomes), outcomes
    print(f"{N_FLIPS} flips in {elapsed:.1f} s: {dict(outcomes)}")
    for rel, data in c.pristine.items():
        assert (c.root / rel).read_bytes() == data


@pytest.mark.parametrize("delta", [-1, -7, -8, -4096, 1, 7, 8, 4096], ids=lambda d: f"{d:+d}")
def test_truncated_and_extended_files(saved: Ckpt, delta: int) -> None:
    c = saved
    outcomes: Counter[str] = Counter()
    for rel, good in c.pristine.items():
        pads = [b"\0", b" "] if delta > 0 else [b""]  # spaces are JSON whitespace: the manifest's crc catches them
        for pad in pads:
            bad = good[:delta] if delta < 0 else good + pad * delta
            c.put(rel, bad)
            try:
                res = _check(c, random.Random(delta))
            finally:
                c.put(rel, good)
            where = f"{rel} {delta:+d} ({len(good)} -> {len(bad)} bytes)"
            assert not res.wrong, f"{where}: wrong tensors {res.wrong}"
            if rel == "LATEST":  # a hint ckpt never reads
                assert not res.errors, f"{where}: {res.errors}"
                assert not res.verify, f"{where}: {res.verify}"
                outcomes["LATEST: harmless (never read)"] += 1
            elif rel == MANIFEST:
                assert len(res.errors) == 3, where
                assert all(isinstance(e, errors.ManifestError) for e in res.errors), where
                assert all(rel in str(e) for e in res.errors), where
                outcomes[f"manifest: {type(res.errors[0]).__name__}"] += 1
            else:
                # Before parsing: the full restore stops at the one stat per file.
                assert isinstance(res.errors[0], errors.ShardSizeMismatchError), f"{where}: {res.errors[0]!r}"
                assert f"{rel}: {len(bad)} bytes, the manifest says {len(good)}" in str(res.errors[0])
                assert any(rel in m and ("truncated" in m or "extended" in m) for m in res.verify), res.verify
                outcomes["data: ShardSizeMismatchError before any read"] += 1
    print(f"{delta:+d}: {dict(outcomes)}")
