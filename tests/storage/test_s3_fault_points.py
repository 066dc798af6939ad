"""Hang and kill at each S3 request of a save (reliability.md 5.1 item 2, the S3 half of the
fault matrix): CreateMultipartUpload, the first and a middle UploadPart, CompleteMultipartUpload,
the manifest PutObject and the LATEST PutObject, through the fault proxy.

Hang: the request sleeps in the proxy past the save's ``io_timeout_s``: the save raises
StorageTimeoutError naming the file within the deadline, and once the abandoned request has
landed or not, step 1 restores bitwise and step 2 is either absent or whole. Kill: the saving
process (forked from tests/support/forker.py) is SIGKILLed while its request hangs: step 1 restores,
step 2 is not committed, and ``ckpt gc`` aborts the multipart upload left behind."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import torch

import ckpt
from ckpt.lifecycle import cleanup
from ckpt.storage import _s3 as storage_mod
from ckpt.storage import open_storage
from ckpt.testing.fault_proxy import Fault, FaultProxy
from tests.support.forker import forker

# Timing-sensitive (a deadline of a few seconds against moto on a loaded 2-core machine): run with
# `pytest -m stress tests/storage/test_s3_fault_points.py`, not in CI.
pytestmark = [pytest.mark.s3, pytest.mark.stress]

MiB = 1 << 20
PART = 5 * MiB
SAVE = ckpt.SaveOptions(write_chunk_bytes=PART, block_bytes=1 * MiB, io_timeout_s=3.0)
SETUP = ckpt.SaveOptions(write_chunk_bytes=PART, block_bytes=1 * MiB)
HANG_S = 6.0
KILL_HANG_S = 10.0  # the kill and the checks after it come well before the hung request goes on

POINTS: dict[str, dict[str, Any]] = {
    "create": {"method": "POST", "query": "uploads", "not_query": "uploadId"},
    "part 1": {"method": "PUT", "query": "partNumber=1"},
    "part 2": {"method": "PUT", "query": "partNumber=2"},
    "complete": {"method": "POST", "query": "uploadId="},
    "manifest": {"method": "PUT", "path": "manifest.json"},
    "LATEST": {"method": "PUT", "path": "/LATEST"},
}


def state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"big": torch.randn(3 * MiB, generator=g), "small": torch.randn(1000, generator=g), "step": seed}


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(s3_endpoint) as p:
        yield p


@pytest.fixture
def root(s3_endpoint: str, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(storage_mod, "S3_SINGLE_PUT_MAX_BYTES", PART)
    fs = fsspec.filesystem("s3", key="testing-key", secret="testing-secret", endpoint_url=s3_endpoint, skip_instance_cache=True)
    bucket = f"ckpt-points-{uuid.uuid4().hex[:12]}"
    fs.call_s3("create_bucket", Bucket=bucket)
    r = f"s3://{bucket}/run"
    ckpt.save(r, state(1), step=1, options=SETUP, storage_options=_opts(proxy.url))
    return r


def _opts(url: str) -> dict[str, Any]:
    return {"key": "testing-key", "secret": "testing-secret", "endpoint_url": url, "skip_instance_cache": True,
            "ckpt_retry": ckpt.RetryPolicy(attempts=3, base_s=0.01, max_s=0.05, deadline_s=5.0)}  # fmt: skip


def _check_after(root: str, url: str, *, new_may_exist: bool) -> None:
    opts = _opts(url)
    steps = ckpt.list_steps(root, storage_options=opts)
    assert 1 in steps, "the committed step 1 was lost"
    for s in steps:
        got = ckpt.restore(root, s, storage_options=opts)
        want = state(s)
        assert torch.equal(got["big"], want["big"]), f"step {s}"
        assert torch.equal(got["small"], want["small"]), f"step {s}"
        assert ckpt.verify(root, s, storage_options=opts).ok
    if not new_may_exist:
        assert steps == [1], f"a step appeared after a failed save: {steps}"


@pytest.mark.parametrize("point", sorted(POINTS))
def test_hang_at_each_s3_request_of_a_save(point: str, proxy: FaultProxy, root: str) -> None:
    fault = Fault("hang", hang_s=HANG_S, nth=1, **POINTS[point])
    proxy.faults = [fault]
    t0 = time.monotonic()
    if point == "LATEST":  # the step is committed; a hint that could not be written warns
        with pytest.warns(ckpt.CkptWarning, match="LATEST hint was not updated"):
            ckpt.save(root, state(2), step=2, options=SAVE, storage_options=_opts(proxy.url))
        saved = True
    else:
        with pytest.raises(ckpt.StorageTimeoutError, match=r"s3://.*no answer within 3 s"):
            ckpt.save(root, state(2), step=2, options=SAVE, storage_options=_opts(proxy.url))
        saved = False
    elapsed = time.monotonic() - t0
    assert fault.injected == 1, f"{point}: the hang never fired"
    if point == "LATEST":
        assert saved, "a slow LATEST hint failed a committed save"
    else:
        assert not saved, f"{point}: the save waited out a {HANG_S} s hang instead of its 3 s deadline"
        assert elapsed < HANG_S, f"{point}: took {elapsed:.1f} s"
    time.sleep(HANG_S + 0.5)  # the abandoned request lands (or not) before the checks
    proxy.faults = []
    # an abandoned manifest PUT may land late (the outcome of a timed-out commit is unknown):
    # then step 2 must be whole
    _check_after(root, proxy.url, new_may_exist=point in ("manifest", "LATEST"))


@pytest.mark.parametrize("point", sorted(p for p in POINTS if p != "LATEST"))
def test_kill_at_each_s3_request_of_a_save(point: str, proxy: FaultProxy, root: str) -> None:
    fault = Fault("hang", hang_s=KILL_HANG_S, nth=1, **POINTS[point])
    proxy.faults = [fault]
    opts = {k: v for k, v in _opts(proxy.url).items() if k not in ("key", "secret", "ckpt_retry")}
    env = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret"}
    with forker(env) as fk:
        pid = fk.start("tests.support.s3_kill_child:save", root, json.dumps(opts), 2)
        deadline = time.monotonic() + 20
        while fault.injected == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fault.injected == 1, f"{point}: the save never reached its hang"
        os.kill(pid, signal.SIGKILL)
        assert fk.reap(pid) == -signal.SIGKILL
    proxy.faults = []  # the hung request is still asleep in the proxy; nothing after it was sent
    _check_after(root, proxy.url, new_may_exist=False)
    st = open_storage(root, _opts(proxy.url))
    report = cleanup.collect_garbage(st, grace_s=0.0)
    assert not st.multipart_uploads(), f"{point}: an upload was left after gc: {report}"
    _check_after(root, proxy.url, new_may_exist=False)
