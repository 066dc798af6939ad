"""Save, restore and verify against moto through a fault-injecting proxy (ckpt.testing.proxy
FaultProxy): throttling, server errors, resets, truncated bodies, 409 conflicts and lost replies
are retried (ckpt.storage's retry layer, docs/s3.md) and the data stays bitwise correct;
permanent errors are not retried."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import torch
from botocore.exceptions import ClientError  # type: ignore[import-untyped]
from s3fs.errors import translate_boto_error

import ckpt
from ckpt.errors import CheckpointExistsError, MissingShardError, StorageError
from ckpt.storage import Storage, open_storage
from ckpt.storage import _s3 as storage_mod
from ckpt.testing.fault_proxy import Fault, FaultProxy

pytestmark = pytest.mark.s3

MiB = 1 << 20
PART = 5 * MiB
FAST = ckpt.RetryPolicy(attempts=10, base_s=0.02, max_s=0.2, deadline_s=30.0)
# a 12 MiB tensor: one file of three 5 MiB parts (multipart); the rest small
SAVE = ckpt.SaveOptions(write_chunk_bytes=PART, block_bytes=1 * MiB)


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(s3_endpoint) as p:
        yield p


@pytest.fixture
def bucket(s3_endpoint: str) -> Iterator[str]:
    fs = fsspec.filesystem("s3", key="testing-key", secret="testing-secret", endpoint_url=s3_endpoint, skip_instance_cache=True)
    name = f"ckpt-faults-{uuid.uuid4().hex[:12]}"
    fs.call_s3("create_bucket", Bucket=name)
    yield name
    fs.rm(name, recursive=True)


@pytest.fixture(autouse=True)
def _small_single_puts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage_mod, "S3_SINGLE_PUT_MAX_BYTES", PART)  # bigger files: multipart


def _opts(url: str, retry: ckpt.RetryPolicy = FAST) -> dict[str, Any]:
    return {
        "key": "testing-key",
        "secret": "testing-secret",
        "endpoint_url": url,
        "skip_instance_cache": True,
        "ckpt_retry": retry,
    }


def _state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(3 * MiB, generator=g),  # 12 MiB
        "w": torch.randn(64, 33, generator=g).to(torch.bfloat16),
        "b": torch.randint(-5, 5, (17,), generator=g),
        "step": 7,
    }


def _check(root: str, opts: dict[str, Any], state: dict[str, Any], **restore_kw: Any) -> None:
    got = ckpt.restore(root, storage_options=opts, **restore_kw)
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype, k
            assert torch.equal(got[k], v), k
        else:
            assert got[k] == v
    report = ckpt.verify(root, storage_options=opts)
    assert report.ok, report.problems


def _retries(before: dict[str, int], prefix: str = "") -> dict[str, int]:
    """Retries since ``before`` whose "operation: reason" starts with ``prefix``."""
    now = dict(ckpt.storage.RETRIES)
    return {k: n - before.get(k, 0) for k, n in now.items() if k.startswith(prefix) and n > before.get(k, 0)}


def _no_such_upload() -> ClientError:
    """What S3 answers to the completion of an upload it no longer has."""
    return ClientError(
        {"Error": {"Code": "NoSuchUpload", "Message": "The specified upload does not exist."},
         "ResponseMetadata": {"HTTPStatusCode": 404}},
        "CompleteMultipartUpload",
    )  # fmt: skip


def _uploads(st: Storage) -> list[Any]:
    bucket, _, _ = st.fs.split_path(st.root)
    return list(st.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []))


def test_slowdown_on_30_percent_of_requests(proxy: FaultProxy, bucket: str) -> None:
    root, opts, state = f"s3://{bucket}/run", _opts(proxy.url), _state(1)
    proxy.faults = [Fault("slowdown", probability=0.3, seed=11)]
    before, backoffs = dict(ckpt.storage.RETRIES), len(ckpt.storage.BACKOFFS)
    ckpt.save(root, state, step=1, options=SAVE, storage_options=opts)
    _check(root, opts, state, options=ckpt.RestoreOptions(read_chunk_bytes=2 * MiB))
    injected = proxy.injected_counts.get("slowdown", 0)
    retried = _retries(before)
    assert injected >= 5, proxy.counts
    assert all(k.endswith(("503 SlowDown", "503 503")) for k in retried), retried  # a HEAD's 503 has no body
    # every injected 503 was retried by ckpt (none absorbed elsewhere, none given up on)
    assert sum(retried.values()) == injected, (retried, injected)
    slept = list(ckpt.storage.BACKOFFS)[backoffs:]
    assert len(slept) == injected
    assert len(set(slept)) > 1  # full jitter: the sleeps differ
    assert all(0 <= s <= FAST.max_s for s in slept)
    proxy.faults = []
    assert _uploads(open_storage(root, opts)) == []
    assert ckpt.list_steps(root, storage_options=opts) == [1]


def test_reads_survive_resets_and_truncated_bodies(proxy: FaultProxy, bucket: str) -> None:
    root, opts, state = f"s3://{bucket}/run", _opts(proxy.url), _state(2)
    ckpt.save(root, state, step=1, options=SAVE, storage_options=opts)
    proxy.faults = [
        Fault("truncate", method="GET", path="/data/", probability=0.4, seed=1),
        Fault("reset", method="GET", path="/data/", probability=0.3, seed=2),
        Fault("hang", method="GET", path="/data/", probability=0.2, seed=3, hang_s=0.05),
    ]
    before = dict(ckpt.storage.RETRIES)
    _check(root, opts, state, options=ckpt.RestoreOptions(read_chunk_bytes=1 * MiB))
    counts = proxy.injected_counts
    assert counts.get("truncate", 0) >= 3, counts
    assert counts.get("reset", 0) >= 2, counts
    retried = _retries(before, "get_object")
    # a cut body is always ckpt's to retry (the reply had started); a reset before any reply is
    # usually retried once by aiohttp itself (an idempotent request on a reused connection), so
    # ckpt sees it only when that retry fails too
    assert retried.get("get_object: ClientPayloadError", 0) >= counts["truncate"], retried


def test_409_on_the_manifest_put_and_on_complete_multipart_is_retried(proxy: FaultProxy, bucket: str) -> None:
    root, opts, state = f"s3://{bucket}/run", _opts(proxy.url), _state(3)
    proxy.faults = [
        Fault("conflict", method="PUT", path="/steps/", nth=1),
        Fault("conflict", method="POST", query="uploadId=", nth=1),
        Fault("internal", method="PUT", query="partNumber=", nth=2),
    ]
    before = dict(ckpt.storage.RETRIES)
    m = ckpt.save(root, state, step=1, options=SAVE, storage_options=opts)
    assert proxy.injected_counts == {"conflict": 2, "internal": 1}
    retried = _retries(before)
    assert retried == {
        "put_object: 409 ConditionalRequestConflict": 1,
        "complete_multipart_upload: 409 ConditionalRequestConflict": 1,
        "upload_part: 500 InternalError": 1,
    }
    assert ckpt.read_manifest(root, storage_options=opts).attempt == m.attempt
    _check(root, opts, state)


def test_a_lost_reply_to_the_manifest_put_is_our_own_commit(proxy: FaultProxy, bucket: str) -> None:
    """The manifest PUT lands but its reply is lost; the retry meets 412. The object is ours
    (byte-equal): success, not a conflict. A different writer still loses."""
    root, opts, state = f"s3://{bucket}/run", _opts(proxy.url), _state(4)
    mine = ckpt.begin(root, step=1, options=SAVE, storage_options=opts)
    other = ckpt.begin(root, step=1, options=SAVE, storage_options=opts)
    mine_report = ckpt.write_shards(mine, state, storage_options=opts)
    other_report = ckpt.write_shards(other, _state(5), storage_options=opts)
    proxy.faults = [Fault("lost_response", method="PUT", path="/steps/", limit=2)]
    m = ckpt.commit(mine, [mine_report], storage_options=opts)
    assert proxy.injected_counts.get("lost_response", 0) >= 1
    st = open_storage(root, opts)
    assert st.read("steps/000000000001/manifest.json") == m.to_json()
    with pytest.raises(CheckpointExistsError, match=mine.attempt):
        ckpt.commit(other, [other_report], storage_options=opts)
    _check(root, opts, state)


def test_put_if_absent_reads_back_after_a_lost_reply(proxy: FaultProxy, bucket: str) -> None:
    st = open_storage(f"s3://{bucket}/run", _opts(proxy.url))
    rel = "steps/000000000009/manifest.json"
    proxy.faults = [Fault("lost_response", method="PUT", path="/steps/", limit=2)]
    assert st.put_if_absent(rel, b'{"mine": 1}', fsync=False)  # landed, reply lost: ours
    assert proxy.injected_counts == {"lost_response": 2}
    assert proxy.counts["PUT"] == 3  # two lost replies, then the 412
    assert st.read(rel) == b'{"mine": 1}'
    assert not st.put_if_absent(rel, b'{"theirs": 1}', fsync=False)  # a real conflict
    assert st.read(rel) == b'{"mine": 1}'


def test_data_writes_whose_reply_was_lost_succeed(proxy: FaultProxy, bucket: str) -> None:
    st = open_storage(f"s3://{bucket}/run", _opts(proxy.url), part_bytes=PART, single_put_max_bytes=PART)
    small = bytes(range(256)) * 4096  # 1 MiB: one PutObject
    big = torch.randint(0, 256, (2 * PART + 3,), dtype=torch.uint8, generator=torch.Generator().manual_seed(6)).numpy().tobytes()
    real, completed = st.fs._call_s3, set()

    async def like_s3(method: str, *args: Any, **kwargs: Any) -> Any:
        """A completed upload is gone: S3 answers NoSuchUpload to a second completion (moto
        completes it again)."""
        if method == "complete_multipart_upload":
            if kwargs["UploadId"] in completed:
                raise translate_boto_error(_no_such_upload())
            completed.add(kwargs["UploadId"])
        return await real(method, *args, **kwargs)

    st.fs._call_s3 = like_s3
    proxy.faults = [
        Fault("lost_response", method="PUT", path="/data/s", limit=2),
        Fault("lost_response", method="POST", query="uploadId=", nth=1),
    ]
    before = dict(ckpt.storage.RETRIES)
    st.write_file("data/s", [small], size=len(small), fsync=False)
    st.write_file("data/m", [big], size=len(big), fsync=False)
    assert proxy.injected_counts == {"lost_response": 3}
    assert sum(_retries(before, "complete_multipart_upload").values()) == 1  # the lost completion
    assert st.fs.cat_file(st.path("data/s")) == small
    assert st.fs.cat_file(st.path("data/m")) == big
    assert _uploads(st) == []
    # someone else's object at a data key is still a conflict
    with pytest.raises(StorageError, match="already exists"):
        st.write_file("data/s", [small[::-1]], size=len(small), fsync=False)


def test_a_discarded_multipart_upload_is_started_over(proxy: FaultProxy, bucket: str) -> None:
    """S3 may discard an upload whose completion got 409 (its docs: start over): the retried
    completion meets NoSuchUpload, and the upload restarts when the data can be read again."""
    st = open_storage(f"s3://{bucket}/run", _opts(proxy.url), part_bytes=PART, single_put_max_bytes=PART)
    data = torch.randint(0, 256, (2 * PART + 5,), dtype=torch.uint8, generator=torch.Generator().manual_seed(7)).numpy().tobytes()
    real = st.fs._call_s3

    async def discard_first(method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "complete_multipart_upload" and not discarded:
            discarded.append(kwargs["UploadId"])  # S3 drops the upload; then the 409 below
            await real("abort_multipart_upload", Bucket=kwargs["Bucket"], Key=kwargs["Key"], UploadId=kwargs["UploadId"])
        elif method == "complete_multipart_upload" and kwargs["UploadId"] in discarded:
            # what S3 answers for a dropped upload (moto answers 500 here)
            raise translate_boto_error(_no_such_upload())
        return await real(method, *args, **kwargs)

    st.fs._call_s3 = discard_first
    discarded: list[str] = []
    proxy.faults = [Fault("conflict", method="POST", query="uploadId=", nth=1)]
    before = dict(ckpt.storage.RETRIES)
    st.write_file("data/r", lambda: [data], size=len(data), fsync=False)  # replayable source
    assert _retries(before, "multipart upload") == {"multipart upload: restarted": 1}
    assert st.fs.cat_file(st.path("data/r")) == data
    discarded.clear()
    for rule in proxy.faults:
        rule.matched = rule.injected = 0
    with pytest.raises(StorageError, match="save must be retried"):
        st.write_file("data/q", [data], size=len(data), fsync=False)  # a one-shot source
    assert not st.exists("data/q")
    assert _uploads(st) == []


def test_permanent_errors_are_not_retried(proxy: FaultProxy, bucket: str) -> None:
    st = open_storage(f"s3://{bucket}/run", _opts(proxy.url))
    st.exists("warm-up")
    proxy.faults = [Fault("denied", method="PUT")]
    before = dict(ckpt.storage.RETRIES)
    proxy.reset()
    with pytest.raises(StorageError, match="Access Denied"):
        st.write_file("data/x", [b"abc"], size=3, fsync=False)
    with pytest.raises(StorageError, match="Access Denied"):
        st.put_if_absent("steps/000000000001/manifest.json", b"{}", fsync=False)
    assert proxy.counts == {"PUT": 2}  # one try each
    proxy.faults = []
    proxy.reset()
    with pytest.raises(MissingShardError):
        st.read_into("data/nope", 0, [memoryview(bytearray(4))])
    assert proxy.counts == {"GET": 1}
    assert _retries(before) == {}


def test_retries_stop_at_the_attempt_cap_and_the_deadline(proxy: FaultProxy, bucket: str) -> None:
    proxy.faults = [Fault("slowdown", method="PUT")]
    st = open_storage(f"s3://{bucket}/run", _opts(proxy.url, ckpt.RetryPolicy(attempts=3, base_s=0.01)))
    st.exists("warm-up")
    proxy.reset()
    with pytest.raises(StorageError, match="reduce your request rate"):
        st.write_file("data/x", [b"abc"], size=3, fsync=False)
    assert proxy.counts == {"PUT": 3}
    slow = open_storage(f"s3://{bucket}/run", _opts(proxy.url, ckpt.RetryPolicy(attempts=1000, base_s=0.1, max_s=0.1, deadline_s=0.5)))
    slow.exists("warm-up")
    proxy.reset()
    t0 = time.monotonic()
    with pytest.raises(StorageError):
        slow.write_file("data/y", [b"abc"], size=3, fsync=False)
    assert time.monotonic() - t0 < 2.0
    assert 2 <= proxy.counts["PUT"] < 100


@pytest.mark.parametrize("action", ["reset", "lost_response", "truncate", "internal"])
def test_a_failed_ranged_get_is_read_again(proxy: FaultProxy, bucket: str, action: str) -> None:
    st = open_storage(f"s3://{bucket}/run", _opts(proxy.url))
    data = bytes(range(256)) * 8192  # 2 MiB
    st.write_file("data/g", [data], size=len(data), fsync=False)
    st.read_into("data/g", 0, [memoryview(bytearray(10))])  # a connection to reuse
    # burst=2: past aiohttp's own single retry of an idempotent request on a reused connection
    proxy.faults = [Fault(action, method="GET", path="/data/", nth=1, burst=2)]
    before = dict(ckpt.storage.RETRIES)
    bufs = [memoryview(bytearray(n)) for n in (7, 1 * MiB, 333_333)]
    st.read_into("data/g", 1000, bufs)
    assert b"".join(bytes(b) for b in bufs) == data[1000 : 1000 + 7 + MiB + 333_333]
    assert proxy.injected_counts == {action: 2}
    assert sum(_retries(before, "get_object").values()) >= 1
