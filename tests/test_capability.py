"""The conditional-write probe (docs/s3.md): an S3 endpoint that ignores If-None-Match (here:
moto behind a proxy that strips the header) is refused for multi-writer commits unless the user
declares single-writer use; a normal endpoint passes with three extra requests, once per
endpoint and bucket per process."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import torch

import ckpt
from benchmarks.proxy import FaultProxy
from ckpt.errors import ConditionalWriteUnsupportedError, PlanError
from ckpt.storage import PROBE_DIR, Storage

pytestmark = pytest.mark.s3


@pytest.fixture
def bucket(s3_endpoint: str) -> Iterator[str]:
    fs = fsspec.filesystem("s3", key="testing-key", secret="testing-secret", endpoint_url=s3_endpoint, skip_instance_cache=True)
    name = f"ckpt-probe-{uuid.uuid4().hex[:12]}"
    fs.call_s3("create_bucket", Bucket=name)
    yield name
    fs.rm(name, recursive=True)


def _opts(url: str) -> dict[str, Any]:
    return {"key": "testing-key", "secret": "testing-secret", "endpoint_url": url, "skip_instance_cache": True}


def _probe_keys(s3_endpoint: str, bucket: str) -> list[str]:
    fs = fsspec.filesystem("s3", **_opts(s3_endpoint))
    fs.invalidate_cache()
    return [p for p in fs.find(bucket) if f"/{PROBE_DIR}/" in p]


def test_a_normal_endpoint_passes_the_probe_once(s3_endpoint: str, bucket: str) -> None:
    with FaultProxy(s3_endpoint) as proxy:
        root, opts = f"s3://{bucket}/run", _opts(proxy.url)
        Storage(root, opts).exists("warm-up")
        proxy.reset()
        ckpt.begin(root, step=1, storage_options=opts)
        # probe: create-only PUT, the same again (412), DeleteObjects (a POST); then the HEAD
        # of the step's manifest
        assert proxy.counts == {"PUT": 2, "POST": 1, "HEAD": 1}
        proxy.reset()
        ckpt.begin(root, step=2, storage_options=opts)
        assert proxy.counts == {"HEAD": 1}  # the verdict is cached for this endpoint and bucket
        m = ckpt.save(root, {"x": torch.arange(5)}, step=3, storage_options=opts)
        assert ckpt.read_manifest(root, storage_options=opts).attempt == m.attempt
    assert _probe_keys(s3_endpoint, bucket) == []  # the probe cleaned up


def test_an_endpoint_that_ignores_if_none_match_is_refused(s3_endpoint: str, bucket: str) -> None:
    with FaultProxy(s3_endpoint, strip_headers=("If-None-Match",)) as proxy:
        root, opts = f"s3://{bucket}/run", _opts(proxy.url)
        st = Storage(root, opts)
        assert not st.conditional_writes_work()
        with pytest.raises(ConditionalWriteUnsupportedError, match="If-None-Match") as info:
            ckpt.save(root, {"x": torch.arange(5)}, step=1, storage_options=opts)
        assert proxy.url in str(info.value)  # names the endpoint
        assert "allow_non_atomic_commit" in str(info.value)
        assert isinstance(info.value, PlanError)
        assert ckpt.list_steps(root, storage_options=opts) == []  # nothing was written
        # single-writer use, declared: allowed, and no probe is made
        proxy.reset()
        single = ckpt.SaveOptions(allow_non_atomic_commit=True)
        ckpt.save(root, {"x": torch.arange(5)}, step=1, options=single, storage_options=opts)
        assert proxy.counts.get("POST", 0) == 0  # no probe's DeleteObjects
        got = ckpt.restore(root, storage_options=opts)
        assert torch.equal(got["x"], torch.arange(5))
    assert _probe_keys(s3_endpoint, bucket) == []
    # the same bucket straight at moto (which honours the header) is another endpoint: it passes
    assert Storage(f"s3://{bucket}/run", _opts(s3_endpoint)).conditional_writes_work()


def test_other_backends_need_no_probe(tmp_path: Any) -> None:
    assert Storage(str(tmp_path / "run")).conditional_writes_work()
