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
from ckpt.errors import ConditionalWriteUnsupportedError, PlanError
from ckpt.storage import PROBE_DIR, open_storage
from ckpt.testing.fault_proxy import FaultProxy

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
        open_storage(root, opts).exists("warm-up")
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
        st = open_storage(root, opts)
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
    assert open_storage(f"s3://{bucket}/run", _opts(s3_endpoint)).conditional_writes_work()


def test_other_backends_need_no_probe(tmp_path: Any) -> None:
    assert open_storage(str(tmp_path / "run")).conditional_writes_work()


def test_copy_and_adopt_to_an_endpoint_that_ignores_if_none_match_are_refused_like_save(
    s3_endpoint: str, bucket: str, tmp_path: Any
) -> None:
    """The one commit-permission check (``ckpt.lifecycle.steps.ensure_committable``) runs the
    probe for every operation that commits: ``ckpt cp`` and ``ckpt adopt`` too, not only save."""
    from safetensors.torch import save as st_save

    from ckpt.cli import main

    src = str(tmp_path / "src")
    ckpt.save(src, {"x": torch.arange(5)}, step=1)
    with FaultProxy(s3_endpoint, strip_headers=("If-None-Match",)) as proxy:
        opts = _opts(proxy.url)
        dst = f"s3://{bucket}/copy"
        with pytest.raises(ConditionalWriteUnsupportedError, match="If-None-Match") as info:
            ckpt.copy(src, dst, dst_storage_options=opts)
        assert "CopyOptions(allow_non_atomic_commit=True)" in str(info.value)
        assert ckpt.list_steps(dst, storage_options=opts) == []
        adopt_root = f"s3://{bucket}/model"
        fsspec.filesystem("s3", **opts).pipe_file(f"{bucket}/model/model.safetensors", st_save({"w": torch.ones(4)}))
        with pytest.raises(ConditionalWriteUnsupportedError, match="If-None-Match"):
            ckpt.adopt(adopt_root, storage_options=opts)
        assert ckpt.list_steps(adopt_root, storage_options=opts) == []
        # the CLI says so too, with the exit code of a refused operation
        dst_opts = [f"--dst-opt={k}={v}" for k, v in opts.items() if k != "skip_instance_cache"]
        assert main(["cp", src, dst, *dst_opts, "--quiet"]) != 0
        # declared single-writer use copies
        single = ckpt.CopyOptions(allow_non_atomic_commit=True)
        ckpt.copy(src, dst, dst_storage_options=opts, options=single)
        assert torch.equal(ckpt.restore(dst, storage_options=opts)["x"], torch.arange(5))
