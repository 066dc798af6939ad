"""ckpt.verify: a full re-read of a committed checkpoint finds every kind of damage, names the
file (and the key, for data and header entries), and keeps going after the first problem."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

import ckpt
from ckpt.format.manifest import Manifest
from tests.conftest import Store

BLOCK = 64  # small checksum blocks: key "a" spans many of them


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(1000, generator=g),  # 4000 bytes: 63 blocks of 64
        "b": {"c": torch.arange(77, dtype=torch.int16), "w": torch.randn(4, 16, generator=g)},
        "n": 3,
    }


def _save(store: Store, step: int = 1) -> Manifest:
    # max_file_bytes splits the state over two files: "a" alone, then "b/c" and "b/w"
    opts = ckpt.SaveOptions(block_bytes=BLOCK, max_file_bytes=2000)
    return ckpt.save(store.root, _state(), step=step, options=opts, storage_options=store.opts)


def _file_of(m: Manifest, key: str) -> str:
    return m.tensors[key].shards[0].file


def _local(store: Store, rel: str) -> str:
    return os.path.join(store.root, rel)


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_verify_passes_on_a_good_checkpoint(store: Store) -> None:
    m = _save(store)
    assert len(m.files) == 2
    seen: list[ckpt.Progress] = []
    r = ckpt.verify(store.root, storage_options=store.opts, progress=seen.append)
    assert r.ok, r.problems
    assert r.problems == []
    assert r.step == 1
    assert r.files_checked == 2
    assert r.bytes_read == m.total_bytes == seen[-1].bytes_done
    assert r.blocks_checked == sum(len(s.crc32c) for t in m.tensors.values() for s in t.shards)
    r.raise_if_failed()  # no error


@pytest.mark.parametrize("chunk_bytes", [1, 7, BLOCK, 100, 8 << 20])
def test_chunk_size_does_not_change_the_verdict(local_store: Store, chunk_bytes: int) -> None:
    m = _save(local_store)
    assert ckpt.verify(local_store.root, chunk_bytes=chunk_bytes).ok
    shard = m.tensors["a"].shards[0]
    _flip(_local(local_store, shard.file), shard.byte_range.start + 100)
    r = ckpt.verify(local_store.root, chunk_bytes=chunk_bytes)
    assert [(p.error, p.key) for p in r.findings] == [
        (ckpt.ChecksumMismatchError, "a"),
        (ckpt.ChecksumMismatchError, None),  # the whole-file crc32c
    ]


def test_flipped_data_byte_names_the_file_the_key_and_the_block(local_store: Store) -> None:
    m = _save(local_store)
    shard = m.tensors["a"].shards[0]
    _flip(_local(local_store, shard.file), shard.byte_range.start + 100)  # in block 1
    r = ckpt.verify(local_store.root)
    assert not r.ok
    block = (shard.byte_range.start + BLOCK, shard.byte_range.start + 2 * BLOCK)
    first = r.findings[0]
    assert (first.error, first.file, first.key) == (ckpt.ChecksumMismatchError, shard.file, "a")
    assert shard.file in first.message
    assert "'a'" in first.message
    assert f"1 of {len(shard.crc32c)} crc32c blocks" in first.message
    assert f"[{block[0]}, {block[1]})" in first.message
    assert all(p.file == shard.file for p in r.findings)  # the other file is intact
    with pytest.raises(ckpt.ChecksumMismatchError, match=r"key 'a'.*and 1 more problem"):
        r.raise_if_failed()


def test_flipped_header_length_is_a_header_error(local_store: Store) -> None:
    m = _save(local_store)
    path = _file_of(m, "a")
    _flip(_local(local_store, path), 6)  # the u64 header length becomes huge
    r = ckpt.verify(local_store.root)
    errors = [(p.error, p.file) for p in r.findings]
    assert (ckpt.HeaderError, path) in errors
    assert (ckpt.ChecksumMismatchError, path) in errors  # whole-file crc32c
    assert not [p for p in r.findings if p.key is not None]  # the data blocks are intact
    with pytest.raises(ckpt.HeaderError, match=path):
        r.raise_if_failed()


def test_flipped_byte_in_a_header_key_name_names_the_key(local_store: Store) -> None:
    m = _save(local_store)
    path = _file_of(m, "b/c")
    full = _local(local_store, path)
    with open(full, "rb") as f:
        head = f.read(4096)
    _flip(full, head.index(b'"b/c"') + 3)  # "b/c" -> "b/b"
    r = ckpt.verify(local_store.root)
    header = [p for p in r.findings if p.error is ckpt.HeaderError]
    assert header, r.problems
    assert {p.key for p in header} == {"b/c", "b/b"}  # missing from the header; not in the manifest
    assert all(p.file == path for p in header)
    assert any("not in the safetensors header" in p.message for p in header)
    assert any("does not place here" in p.message for p in header)
    with pytest.raises(ckpt.HeaderError):
        r.raise_if_failed()


def test_truncated_file_names_the_file_and_the_keys_beyond_its_end(local_store: Store) -> None:
    m = _save(local_store)
    path = _file_of(m, "b/c")
    full = _local(local_store, path)
    size = os.path.getsize(full)
    os.truncate(full, size - 1)
    r = ckpt.verify(local_store.root)
    assert [(p.error, p.file) for p in r.findings] == [(ckpt.ShardSizeMismatchError, path)]
    last_key = max(("b/c", "b/w"), key=lambda k: m.tensors[k].shards[0].byte_range.end)
    assert f"{size - 1} bytes, the manifest says {size}: truncated" in r.problems[0]
    assert repr(last_key) in r.problems[0]
    with pytest.raises(ckpt.ShardSizeMismatchError, match=path):
        r.raise_if_failed()


def test_extended_file_is_a_size_problem_only(local_store: Store) -> None:
    m = _save(local_store)
    path = _file_of(m, "a")
    with open(_local(local_store, path), "ab") as f:
        f.write(b"\0")
    r = ckpt.verify(local_store.root)
    assert [(p.error, p.file, p.key) for p in r.findings] == [
        (ckpt.ShardSizeMismatchError, path, None)
    ]
    assert "extended" in r.problems[0]
    assert r.bytes_read == m.total_bytes  # the extra byte is not read


def test_deleted_file_is_missing_and_the_rest_is_still_checked(store: Store) -> None:
    m = _save(store)
    path = _file_of(m, "a")
    fs, root = fsspec.core.url_to_fs(store.root, **store.opts)
    fs.rm(f"{root.rstrip('/')}/{path}")
    r = ckpt.verify(store.root, storage_options=store.opts)
    assert [(p.error, p.file) for p in r.findings] == [(ckpt.MissingShardError, path)]
    assert "'a'" in r.problems[0]  # the keys it held
    assert r.files_checked == 2
    assert r.bytes_read == m.files[_file_of(m, "b/c")].size  # the other file was read in full
    with pytest.raises(ckpt.MissingShardError, match=path):
        r.raise_if_failed()


def test_every_problem_is_collected(local_store: Store) -> None:
    m = _save(local_store)
    a, bc = m.tensors["a"].shards[0], m.tensors["b/c"].shards[0]
    _flip(_local(local_store, a.file), a.byte_range.start)  # block 0 of "a"
    _flip(_local(local_store, a.file), a.byte_range.end - 1)  # last block of "a"
    os.truncate(_local(local_store, bc.file), 10)
    r = ckpt.verify(local_store.root)
    found = {(p.error, p.file, p.key) for p in r.findings}
    assert (ckpt.ChecksumMismatchError, a.file, "a") in found
    assert (ckpt.ShardSizeMismatchError, bc.file, None) in found
    assert any(f"2 of {len(a.crc32c)} crc32c blocks" in msg for msg in r.problems)
    # raise_if_failed picks the most fundamental problem: the size mismatch
    with pytest.raises(ckpt.ShardSizeMismatchError, match=r"and \d+ more problems"):
        r.raise_if_failed()


def _rewrite_manifest(store: Store, m: Manifest) -> None:
    """Replace a committed manifest by ``m`` (re-serialized, so it is still well-formed)."""
    with open(_local(store, f"steps/{m.step:012d}/manifest.json"), "wb") as f:
        f.write(m.to_json())


def _with_tensor(m: Manifest, key: str, **changes: Any) -> Manifest:
    tensors = dict(m.tensors)
    tensors[key] = dataclasses.replace(m.tensors[key], **changes)
    return dataclasses.replace(m, tensors=tensors)


def test_header_that_disagrees_with_the_manifest(local_store: Store) -> None:
    """The file is intact (every crc32c matches) but the manifest describes it differently."""
    m = _save(local_store)
    edited = _with_tensor(m, "b/c", dtype="F16")  # same item size: the manifest still validates
    (w,) = m.tensors["b/w"].shards
    edited = _with_tensor(
        edited, "b/w", shape=(16, 4), shards=(dataclasses.replace(w, sizes=(16, 4)),)
    )
    _rewrite_manifest(local_store, edited)
    r = ckpt.verify(local_store.root)
    assert {(p.error, p.file, p.key) for p in r.findings} == {
        (ckpt.HeaderError, _file_of(m, "b/c"), "b/c"),
        (ckpt.HeaderError, _file_of(m, "b/w"), "b/w"),
    }
    assert any("header dtype I16, the manifest says F16" in msg for msg in r.problems)
    assert any(
        "header shape [4, 16], the manifest's shard sizes [16, 4]" in msg for msg in r.problems
    )


def test_misplaced_byte_range_is_a_header_problem(local_store: Store) -> None:
    """Two equal-size tensors whose byte ranges (and checksums) are swapped in the manifest:
    every crc32c still matches, only the header says where each tensor really is."""
    state = {"x": torch.arange(10, dtype=torch.int16), "y": torch.arange(10, 20, dtype=torch.int16)}
    m = ckpt.save(local_store.root, state, step=1)
    (x,), (y,) = m.tensors["x"].shards, m.tensors["y"].shards
    swapped = dataclasses.replace(x, byte_range=y.byte_range, crc32c=y.crc32c)
    edited = _with_tensor(m, "x", shards=(swapped,))
    swapped = dataclasses.replace(y, byte_range=x.byte_range, crc32c=x.crc32c)
    _rewrite_manifest(local_store, _with_tensor(edited, "y", shards=(swapped,)))
    r = ckpt.verify(local_store.root)
    assert {(p.error, p.key) for p in r.findings} == {
        (ckpt.HeaderError, "x"),
        (ckpt.HeaderError, "y"),
    }
    assert any(
        f"header places the data at bytes [{x.byte_range.start}, {x.byte_range.end})" in msg
        for msg in r.problems
    )
    assert ckpt.restore(local_store.root)["x"].tolist() == list(range(10, 20))  # what restore does


def test_no_checkpoint_and_bad_manifest_raise(local_store: Store) -> None:
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.verify(local_store.root)
    _save(local_store, step=1)
    with pytest.raises(ckpt.CheckpointNotFoundError, match="step 5"):
        ckpt.verify(local_store.root, step=5)
    with open(_local(local_store, "steps/000000000001/manifest.json"), "r+b") as f:
        f.write(b"[")  # no longer a JSON object
    with pytest.raises(ckpt.ManifestParseError):
        ckpt.verify(local_store.root, step=1)


def test_latest_skips_an_invalid_newer_manifest_with_a_warning(local_store: Store) -> None:
    _save(local_store, step=1)
    bad = _local(local_store, "steps/000000000002/manifest.json")
    os.makedirs(os.path.dirname(bad))
    with open(bad, "wb") as f:
        f.write(b"{not json")
    with pytest.warns(ckpt.CkptWarning, match="skipping step 2"):
        r = ckpt.verify(local_store.root)
    assert r.step == 1
    assert r.ok


def test_symlinked_shard_is_a_finding_not_a_crash(local_store: Store, tmp_path: Path) -> None:
    ckpt.save(local_store.root, {"w": torch.ones(64)}, step=1)
    m = ckpt.read_manifest(local_store.root)
    (path,) = m.files
    full = Path(local_store.root) / path
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(full.read_bytes())
    full.unlink()
    full.symlink_to(outside)
    report = ckpt.verify(local_store.root)
    assert not report.ok
    assert any("symbolic link" in p for p in report.problems)
