"""The S3 paths of ckpt.storage against the real moto endpoint (through the latency proxy of the
benchmarks, which counts the HTTP requests): single PutObject for files that fit, concurrent
multipart uploads for bigger ones, abort on every failure, ranged reads straight into the
destination buffers, and the few requests the metadata operations cost."""

from __future__ import annotations

import base64
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import torch

import ckpt
from ckpt._concurrency import ByteBudget
from ckpt.errors import MissingShardError, ShardSizeMismatchError, StorageError
from ckpt.lifecycle.steps import committed_steps, resolve_step
from ckpt.storage import Stat, Storage, open_storage
from ckpt.storage import _s3 as storage_mod
from ckpt.testing.proxy import LatencyProxy

pytestmark = pytest.mark.s3

MiB = 1 << 20
PART = 5 * MiB  # S3's minimum part size: the smallest multipart uploads a test can make


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[LatencyProxy]:
    with LatencyProxy(s3_endpoint) as p:
        yield p


@pytest.fixture
def bucket(s3_endpoint: str) -> Iterator[str]:
    fs = fsspec.filesystem(
        "s3",
        key="testing-key",
        secret="testing-secret",
        endpoint_url=s3_endpoint,
        skip_instance_cache=True,
    )
    name = f"ckpt-s3-{uuid.uuid4().hex[:12]}"
    fs.call_s3("create_bucket", Bucket=name)
    yield name
    fs.rm(name, recursive=True)


def _opts(url: str) -> dict[str, Any]:
    return {
        "key": "testing-key",
        "secret": "testing-secret",
        "endpoint_url": url,
        "skip_instance_cache": True,
    }


def _storage(url: str, bucket: str, **kw: Any) -> Storage:
    return open_storage(f"s3://{bucket}/run", _opts(url), **kw)


def _data(n: int, seed: int = 0) -> bytes:
    return (
        torch.randint(
            0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
        )
        .numpy()
        .tobytes()
    )


def _chunks(
    data: bytes, sizes: tuple[int, ...] = (1 * MiB + 7, 333, 3 * MiB)
) -> Iterator[memoryview]:
    """``data`` in chunks of uneven sizes (so they straddle part boundaries), as the executor
    gives them: views, not copies."""
    view = memoryview(data)
    pos, i = 0, 0
    while pos < len(view):
        n = sizes[i % len(sizes)]
        yield view[pos : pos + n]
        pos += n
        i += 1


def _uploads(st: Storage) -> list[dict[str, Any]]:
    bucket, _, _ = st.fs.split_path(st.root)
    out: list[dict[str, Any]] = st.fs.call_s3("list_multipart_uploads", Bucket=bucket).get(
        "Uploads", []
    )
    return out


def test_a_file_that_fits_one_put_is_one_request(proxy: LatencyProxy, bucket: str) -> None:
    st = _storage(proxy.url, bucket)
    st.exists("warm-up")  # the client's first connection is not the write's
    data = _data(12 * MiB + 5)  # more than one multipart part, less than the single-PUT limit
    proxy.reset()
    st.write_file("data/a.safetensors", _chunks(data), size=len(data), fsync=False)
    assert proxy.counts == {"PUT": 1}
    assert st.fs.cat_file(st.path("data/a.safetensors")) == data


def test_a_file_bigger_than_the_upload_budget_goes_up_in_parts(proxy: LatencyProxy, bucket: str) -> None:
    """A single PUT's body is one copy of the whole file: a file bigger than the bytes allowed in
    flight is uploaded in parts instead, so the budget bounds memory."""
    st = _storage(proxy.url, bucket, part_bytes=PART, max_inflight_bytes=2 * PART)
    assert st.single_put_max_bytes == 2 * PART
    st.exists("warm-up")
    data = _data(2 * PART + 1)
    proxy.reset()
    st.write_file("data/b.safetensors", _chunks(data), size=len(data), fsync=False)
    assert proxy.counts.get("PUT") == 3  # 3 parts
    assert proxy.counts.get("POST") == 2  # create + complete
    assert st.fs.cat_file(st.path("data/b.safetensors")) == data


def test_multipart_upload_is_correct_and_concurrent(proxy: LatencyProxy, bucket: str) -> None:
    st = _storage(proxy.url, bucket, part_bytes=PART, single_put_max_bytes=PART)
    data = _data(6 * PART + 12345, seed=1)  # 7 parts, the last one short
    inflight, peak = 0, 0
    lock = threading.Lock()
    real = st.fs._call_s3

    async def counting(method: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal inflight, peak
        if method != "upload_part":
            return await real(method, *args, **kwargs)
        with lock:
            inflight += 1
            peak = max(peak, inflight)
        try:
            return await real(method, *args, **kwargs)
        finally:
            with lock:
                inflight -= 1

    st.fs._call_s3 = counting  # observe the real calls
    proxy.latency_s = 0.2  # each part takes long enough for the next ones to start
    proxy.reset()
    st.write_file("data/big.safetensors", _chunks(data), size=len(data), fsync=False)
    assert proxy.counts == {"POST": 2, "PUT": 7}  # create, 7 parts, complete
    assert peak >= 2, "parts were uploaded one at a time"
    assert peak <= storage_mod.S3_PARTS_PER_FILE
    assert st.fs.cat_file(st.path("data/big.safetensors")) == data
    assert _uploads(st) == []


@pytest.mark.parametrize("failure", ["source raises", "source too short", "source too long"])
def test_a_failed_multipart_upload_is_aborted_and_invisible(
    proxy: LatencyProxy, bucket: str, failure: str
) -> None:
    st = _storage(proxy.url, bucket, part_bytes=PART, single_put_max_bytes=PART)
    data = _data(5 * PART, seed=2)
    size = len(data)

    def source() -> Iterator[memoryview]:
        got = 0
        for c in _chunks(data if failure != "source too short" else data[: 3 * PART + 1]):
            yield c
            got += len(c)
            if failure == "source raises" and got > 3 * PART:
                raise RuntimeError("the tensor went away")
        if failure == "source too long":
            yield memoryview(b"extra")

    with pytest.raises(StorageError, match=r"data/bad\.safetensors") as info:
        st.write_file("data/bad.safetensors", source(), size=size, fsync=False)
    if failure == "source raises":
        assert isinstance(info.value.__cause__, RuntimeError)
    assert not st.exists("data/bad.safetensors")
    assert st.fs.find(st.path("data")) == []
    assert _uploads(st) == []  # aborted: no parts left stored
    assert proxy.counts.get("DELETE") == 1  # the abort


@pytest.mark.parametrize("multipart", [False, True])
def test_data_files_are_never_overwritten(
    proxy: LatencyProxy, bucket: str, multipart: bool
) -> None:
    kw = {"part_bytes": PART, "single_put_max_bytes": PART} if multipart else {}
    st = _storage(proxy.url, bucket, **kw)
    first, second = _data(2 * PART + 1, seed=3), _data(2 * PART + 1, seed=4)
    st.write_file("data/x.safetensors", _chunks(first), size=len(first), fsync=False)
    with pytest.raises(StorageError, match="already exists"):
        st.write_file("data/x.safetensors", _chunks(second), size=len(second), fsync=False)
    assert st.fs.cat_file(st.path("data/x.safetensors")) == first
    assert _uploads(st) == []


def test_ranged_reads_land_in_place_across_part_boundaries(
    proxy: LatencyProxy, bucket: str
) -> None:
    st = _storage(proxy.url, bucket, part_bytes=PART, single_put_max_bytes=PART)
    data = _data(3 * PART + 999, seed=5)
    st.write_file("data/r.safetensors", _chunks(data), size=len(data), fsync=False)
    for start, lengths in [
        (PART - 10, [3, 17, 2 * PART]),  # crosses two part boundaries, into three buffers
        (0, [len(data)]),
        (len(data) - 5, [5]),
        (2 * PART - 1, [1, 0, 2]),  # an empty buffer in the middle
    ]:
        bufs = [memoryview(bytearray(n)) for n in lengths]
        proxy.reset()
        st.read_into("data/r.safetensors", start, bufs)
        assert proxy.counts == {"GET": 1}
        assert b"".join(bytes(b) for b in bufs) == data[start : start + sum(lengths)]
    with pytest.raises(ShardSizeMismatchError, match="short read"):
        st.read_into("data/r.safetensors", len(data) - 4, [memoryview(bytearray(8))])
    with pytest.raises(MissingShardError, match="data/nope"):
        st.read_into("data/nope", 0, [memoryview(bytearray(8))])


def test_metadata_operations_cost_one_request_each(proxy: LatencyProxy, bucket: str) -> None:
    st = _storage(proxy.url, bucket)
    st.put("LATEST", b'{"step": 1}', fsync=False)
    for step in (3, 1):
        assert st.put_if_absent(f"steps/{step:012d}/manifest.json", b"{}", fsync=False)
    cases: list[tuple[Any, Any, dict[str, int]]] = [
        (lambda: st.exists("steps/000000000003/manifest.json"), True, {"HEAD": 1}),
        (lambda: st.exists("steps/000000000002/manifest.json"), False, {"HEAD": 1}),
        (lambda: st.read("LATEST"), b'{"step": 1}', {"GET": 1}),
        (lambda: committed_steps(st), [1, 3], {"GET": 1}),  # one listing
    ]
    for call, want, requests in cases:
        proxy.reset()
        assert call() == want
        assert proxy.counts == requests
    with pytest.raises(MissingShardError):
        st.read("steps/000000000002/manifest.json")
    assert committed_steps(_storage(proxy.url, bucket)) == [1, 3]
    assert committed_steps(open_storage(f"s3://{bucket}/other", _opts(proxy.url))) == []


def test_save_and_restore_through_multipart_and_split_reads(
    proxy: LatencyProxy, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_mod, "S3_PART_BYTES", PART)
    monkeypatch.setattr(storage_mod, "S3_SINGLE_PUT_MAX_BYTES", PART)
    g = torch.Generator().manual_seed(6)
    state = {
        "w": torch.randn(3 * PART // 4 + 11, generator=g),
        "b": torch.randn(17, generator=g).to(torch.bfloat16),
    }
    root, opts = f"s3://{bucket}/ckpt", _opts(proxy.url)
    ckpt.save(
        root, state, step=1, storage_options=opts, options=ckpt.SaveOptions(block_bytes=1 * MiB)
    )
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    ckpt.restore(
        root,
        target=target,
        storage_options=opts,
        options=ckpt.RestoreOptions(read_chunk_bytes=3 * MiB),
    )
    for k, v in state.items():
        assert torch.equal(target[k], v), k


def test_concurrent_writes_stay_within_the_upload_budget(proxy: LatencyProxy, bucket: str) -> None:
    st = _storage(
        proxy.url,
        bucket,
        part_bytes=PART,
        single_put_max_bytes=2 * PART,
        max_inflight_bytes=PART + 64,
    )
    peak = 0

    class Observed(ByteBudget):
        def acquire(self, n: int) -> None:
            nonlocal peak
            super().acquire(n)
            with self._cond:
                peak = max(peak, self._used)

    st._upload_budget = Observed(PART + 64)
    data = [_data(PART + i, seed=10 + i) for i in range(2)] + [
        _data(3 * PART, seed=12)
    ]  # 2 PUTs, 1 multipart
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            st.write_file(f"data/{i}.safetensors", _chunks(data[i]), size=len(data[i]), fsync=False)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(data))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert 0 < peak <= PART + 64  # one body at a time: each is about the whole budget
    for i, d in enumerate(data):
        assert st.fs.cat_file(st.path(f"data/{i}.safetensors")) == d


def _b64(crc: int) -> str:
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def test_uploads_carry_ckpt_crc32c_and_s3_keeps_it(
    proxy: LatencyProxy, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save hands S3 the CRC-32C ckpt computed as the bytes went by, on every PutObject and
    UploadPart (and the whole file's on the completion), and nothing botocore computed: no
    CRC32 of its own (botocore >= 1.36 adds one by default), no SHA-256 of the body for the
    signature. S3 keeps it: a HeadObject gives each file's manifest CRC, which ``stat`` reads."""
    monkeypatch.setattr(storage_mod, "S3_SINGLE_PUT_MAX_BYTES", 2 * PART)
    g = torch.Generator().manual_seed(7)
    root, opts = f"s3://{bucket}/ckpt", _opts(proxy.url)
    # parts of 8 MiB, which may end early on a block boundary: no byte hashed twice
    options = ckpt.SaveOptions(block_bytes=1 * MiB, write_chunk_bytes=8 * MiB)
    proxy.reset()
    ckpt.save(root, {"w": torch.randn(3 * PART // 4 + 5, generator=g)}, step=1, storage_options=opts, options=options)
    ckpt.save(root, {"w": torch.randn(1000, generator=g)}, step=2, storage_options=opts, options=options)
    bodies = [s for s in proxy.seen if s.method == "PUT" and "/data/" in s.path]
    # step 1's file (header, 15 MiB + 20 bytes): parts of the header and 7 blocks, 8 blocks, the
    # last 20 bytes; step 2's single PUT
    assert len(bodies) == 4
    for s in bodies:
        assert "x-amz-checksum-crc32c" in s.headers, s
        assert "x-amz-checksum-crc32" not in s.headers, s
        assert s.headers.get("x-amz-content-sha256") == "UNSIGNED-PAYLOAD", s
    st = open_storage(root, opts)
    fs = st.fs
    for step in (1, 2):
        m = resolve_step(st, step)
        for path, f in m.files.items():
            bkt, key, _ = fs.split_path(st.path(path))
            head = fs.call_s3("head_object", Bucket=bkt, Key=key, ChecksumMode="ENABLED")
            assert head.get("ChecksumCRC32C") == _b64(f.crc32c), (step, path, head)
            assert st.stat(path) == Stat(f.size, f.crc32c)


def test_uploads_without_checksums_when_turned_off(proxy: LatencyProxy, bucket: str) -> None:
    """``ckpt_s3_checksums=False`` (an S3-compatible endpoint that refuses them): no checksum
    header at all, and ``stat`` has only the size to give."""
    st = open_storage(f"s3://{bucket}/run", {**_opts(proxy.url), "ckpt_s3_checksums": False}, part_bytes=PART, single_put_max_bytes=PART)
    small, big = _data(1000), _data(PART + 10, seed=3)
    proxy.reset()
    st.write_file("data/small", _chunks(small), size=len(small), fsync=False)
    st.write_file("data/big", _chunks(big), size=len(big), fsync=False)
    puts = [s for s in proxy.seen if s.method == "PUT"]
    assert len(puts) == 3
    assert all(not any(h.startswith("x-amz-checksum-") for h in s.headers) for s in puts), puts
    assert st.stat("data/small") == Stat(len(small), None)
    assert st.stat("data/big") == Stat(len(big), None)
    assert st.fs.cat_file(st.path("data/big")) == big
