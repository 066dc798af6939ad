"""ckpt.verify(quick=True): no data read, one metadata request per file; sizes, and the CRC-32C
the store keeps for each file (S3 since ckpt sends its own with every upload), against the
manifest. Files the store keeps no CRC-32C for are checked by size and listed."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from typing import Any

import crc32c
import fsspec
import pytest
import torch

import ckpt
from ckpt.format.manifest import Manifest
from ckpt.storage import _s3 as s3_mod
from ckpt.testing.proxy import LatencyProxy
from tests.conftest import Store

MiB = 1 << 20


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(1000, generator=g), "b": {"w": torch.randn(4, 16, generator=g)}, "n": 3}


def _save(root: str, opts: dict[str, Any], state: dict[str, Any] | None = None) -> Manifest:
    options = ckpt.SaveOptions(block_bytes=64, max_file_bytes=2000)  # "a" alone, then "b/w"
    return ckpt.save(root, state or _state(), step=1, options=options, storage_options=opts)


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[LatencyProxy]:
    with LatencyProxy(s3_endpoint) as p:
        yield p


def _proxied(s3_store: Store, proxy: LatencyProxy) -> dict[str, Any]:
    return {**s3_store.opts, "endpoint_url": proxy.url}


def _replace(store: Store, rel: str, data: bytes, *, with_crc32c: bool) -> None:
    """Overwrite an object behind ckpt's back: a writer that sends a CRC-32C with it (as ckpt
    does, or ``aws s3 cp --checksum-algorithm CRC32C``), or one that sends none."""
    fs = fsspec.filesystem("s3", **store.opts)
    bucket, key, _ = fs.split_path(f"{store.root}/{rel}")
    extra: dict[str, Any] = {}
    if with_crc32c:
        crc = base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()
        extra = {"ChecksumAlgorithm": "CRC32C", "ChecksumCRC32C": crc}
    fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **extra)


@pytest.mark.s3
def test_quick_reads_no_data_on_s3(
    s3_store: Store, proxy: LatencyProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Single-PUT files and a multipart one: every file checked against the CRC-32C S3 keeps,
    with one HEAD each; the only GETs are the manifest's (and the listing's), none of a data file."""
    monkeypatch.setattr(s3_mod, "S3_SINGLE_PUT_MAX_BYTES", 5 * MiB)
    opts = _proxied(s3_store, proxy)
    state = {**_state(), "big": torch.randn(6 * MiB // 4)}  # its own 6 MiB file: 2 parts
    m = ckpt.save(
        s3_store.root, state, step=1, storage_options=opts,
        options=ckpt.SaveOptions(max_file_bytes=2000, write_chunk_bytes=5 * MiB),
    )  # fmt: skip
    assert len(m.files) == 3
    proxy.reset()
    r = ckpt.verify(s3_store.root, storage_options=opts, quick=True)
    assert r.ok, r.problems
    assert (r.quick, r.files_checked, r.bytes_read, r.size_only) == (True, 3, 0, ())
    data_requests = [(s.method, s.path) for s in proxy.seen if "/data/" in s.path]
    assert sorted(data_requests) == sorted(("HEAD", f"/{s3_store.root[5:]}/{p}") for p in m.files)
    assert not any(s.method == "GET" and "/data/" in s.path for s in proxy.seen)


@pytest.mark.s3
def test_quick_catches_a_file_replaced_by_other_bytes_of_the_same_size(s3_store: Store) -> None:
    m = _save(s3_store.root, s3_store.opts)
    path = m.tensors["a"].shards[0].file
    size = m.files[path].size
    _replace(s3_store, path, os.urandom(size), with_crc32c=True)
    r = ckpt.verify(s3_store.root, storage_options=s3_store.opts, quick=True)
    assert [(p.error, p.file) for p in r.findings] == [(ckpt.ChecksumMismatchError, path)]
    assert path in r.problems[0]
    assert "the manifest says" in r.problems[0]
    assert r.bytes_read == 0
    with pytest.raises(ckpt.ChecksumMismatchError, match=path):
        r.raise_if_failed()


@pytest.mark.s3
def test_quick_on_objects_without_a_stored_checksum_checks_their_sizes(s3_store: Store) -> None:
    """Objects written before ckpt sent its CRC-32C (here: with ``ckpt_s3_checksums`` off) are
    checked by size and listed; one replaced by a writer that sent no CRC-32C is one of them."""
    opts = {**s3_store.opts, "ckpt_s3_checksums": False}
    m = _save(s3_store.root, opts)
    r = ckpt.verify(s3_store.root, storage_options=s3_store.opts, quick=True)
    assert r.ok, r.problems
    assert r.size_only == tuple(sorted(m.files))
    a = m.tensors["a"].shards[0].file
    _replace(s3_store, a, b"short", with_crc32c=False)
    r = ckpt.verify(s3_store.root, storage_options=s3_store.opts, quick=True)
    assert [(p.error, p.file) for p in r.findings] == [(ckpt.ShardSizeMismatchError, a)]
    assert "truncated" in r.problems[0]


def test_quick_on_a_local_disk_checks_sizes(local_store: Store) -> None:
    m = _save(local_store.root, {})
    a, bw = m.tensors["a"].shards[0].file, m.tensors["b/w"].shards[0].file
    r = ckpt.verify(local_store.root, quick=True)
    assert r.ok
    assert r.size_only == tuple(sorted(m.files))
    with open(os.path.join(local_store.root, a), "ab") as f:
        f.write(b"x")
    os.remove(os.path.join(local_store.root, bw))
    r = ckpt.verify(local_store.root, quick=True)
    assert sorted((p.error.__name__, p.file) for p in r.findings) == [
        ("MissingShardError", bw),
        ("ShardSizeMismatchError", a),
    ]
    assert r.size_only == ()

