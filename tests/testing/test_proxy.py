"""The latency proxy of the S3 benchmarks (ckpt/testing/proxy.py), in front of the moto endpoint:
S3 semantics survive it, each request pays its latency, and requests are counted."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterator

import fsspec
import pytest

from ckpt.testing.proxy import STATS_PATH, LatencyProxy, fetch_stats

LATENCY_S = 0.05


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[LatencyProxy]:
    with LatencyProxy(s3_endpoint, latency_ms=LATENCY_S * 1000) as p:
        yield p


@pytest.fixture
def fs_bucket(proxy: LatencyProxy) -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    fs = fsspec.filesystem(
        "s3", key="testing-key", secret="testing-secret", endpoint_url=proxy.url, skip_instance_cache=True
    )
    bucket = f"proxy-test-{uuid.uuid4().hex[:12]}"
    fs.call_s3("create_bucket", Bucket=bucket)
    yield fs, bucket
    fs.rm(bucket, recursive=True)


def test_round_trip_ranges_and_create_only(proxy: LatencyProxy, fs_bucket: tuple[fsspec.AbstractFileSystem, str]) -> None:
    fs, bucket = fs_bucket
    data = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes
    proxy.reset()

    fs.pipe_file(f"{bucket}/obj", data)  # one PUT
    assert fs.cat_file(f"{bucket}/obj") == data  # one GET (small: not split)
    assert fs.cat_file(f"{bucket}/obj", start=1000, end=70_001) == data[1000:70_001]  # ranged GET
    assert fs.info(f"{bucket}/obj")["size"] == len(data)  # HEAD keeps Content-Length

    fs.pipe_file(f"{bucket}/commit", b"first", mode="create")  # If-None-Match: * passes through
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{bucket}/commit", b"second", mode="create")
    assert fs.cat_file(f"{bucket}/commit") == b"first"

    counts = proxy.counts
    assert counts.get("PUT") == 3
    assert counts.get("GET", 0) >= 3
    assert counts.get("HEAD", 0) >= 1
    stats = fetch_stats(proxy.url)
    assert stats["requests"] == counts  # the stats endpoint itself is not counted
    assert stats["total"] == sum(counts.values())
    assert stats["bytes_in"] >= len(data)


def test_each_request_pays_the_latency(proxy: LatencyProxy, fs_bucket: tuple[fsspec.AbstractFileSystem, str]) -> None:
    fs, bucket = fs_bucket
    fs.pipe_file(f"{bucket}/small", b"x" * 100)
    proxy.reset()
    for _ in range(3):
        t0 = time.perf_counter()
        assert fs.cat_file(f"{bucket}/small", max_concurrency=1) == b"x" * 100  # exactly one GET
        assert time.perf_counter() - t0 >= LATENCY_S
    assert proxy.counts == {"GET": 3}

    proxy.reset()
    t0 = time.perf_counter()
    for i in range(4):  # sequential requests: latencies add up
        fs.pipe_file(f"{bucket}/seq-{i}", b"y")
    elapsed = time.perf_counter() - t0
    assert proxy.total == 4
    assert elapsed >= 4 * LATENCY_S


def test_stats_endpoint_and_reset(proxy: LatencyProxy, fs_bucket: tuple[fsspec.AbstractFileSystem, str]) -> None:
    fs, bucket = fs_bucket
    fs.pipe_file(f"{bucket}/a", b"a")
    assert fetch_stats(proxy.url)["total"] >= 1
    assert fetch_stats(proxy.url, reset=True)["total"] == 0
    assert proxy.counts == {}
    with urllib.request.urlopen(proxy.url + STATS_PATH, timeout=10) as resp:
        assert json.loads(resp.read())["requests"] == {}
