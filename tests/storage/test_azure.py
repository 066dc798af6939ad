"""Azure Blob Storage (ckpt.storage._azure) against Azurite, directly and through the
fault-injecting proxy (ckpt.testing.fault_proxy.FaultProxy): save / restore / verify and the
manager with default options, racing committers, the conditional-write probe, lost replies read
back, transient errors retried by ckpt alone, data files in staged blocks, streamed ranged reads
(docs/storage.md, "Azure Blob Storage")."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np
import pytest
import torch

import ckpt
from ckpt.errors import ConditionalWriteUnsupportedError, MissingShardError, StorageError
from ckpt.storage import AzureStorage, open_storage
from ckpt.storage import _azure as azure_mod
from ckpt.testing.fault_proxy import Fault, FaultProxy
from tests.conftest import Store, make_state
from tests.support.emulators import AZURITE_ACCOUNT, azure_options, azure_sas_options

pytestmark = pytest.mark.azure

KiB, MiB = 1 << 10, 1 << 20
FAST = ckpt.RetryPolicy(attempts=10, base_s=0.02, max_s=0.2, deadline_s=30.0)
SMALL = {"part_bytes": 256 * KiB, "single_put_max_bytes": MiB}  # 1.5 MiB: six staged blocks


@pytest.fixture
def proxy(azure_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(azure_endpoint.rsplit("/", 1)[0]) as p:
        yield p


def _via(proxy: FaultProxy, **extra: Any) -> dict[str, Any]:
    """Azurite's account, reached through the proxy."""
    return {**azure_options(f"{proxy.url}/{AZURITE_ACCOUNT}"), **extra}


def _data(n: int, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()


def _retries(before: dict[str, int], prefix: str = "") -> dict[str, int]:
    now = dict(ckpt.storage.RETRIES)
    return {
        k: n - before.get(k, 0)
        for k, n in now.items()
        if k.startswith(prefix) and n > before.get(k, 0)
    }


def _same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a == b


def _spy(st: AzureStorage, name: str) -> list[Any]:
    """Record what the storage's method ``name`` returns."""
    seen: list[Any] = []
    real: Callable[..., Any] = getattr(st, name)

    def spy(*args: Any, **kw: Any) -> Any:
        seen.append(real(*args, **kw))
        return seen[-1]

    setattr(st, name, spy)
    return seen


# --- the public API on an az:// root --------------------------------------------------------------


def test_save_restore_verify_and_the_manager_with_default_options(azure_store: Store) -> None:
    """Only the connection string: ckpt's defaults (and its cached client, reused)."""
    opts = {"connection_string": azure_store.opts["connection_string"]}
    root, state = azure_store.root, make_state(1)
    m = ckpt.save(root, state, step=1, storage_options=opts)
    _same(ckpt.restore(root, storage_options=opts), state)
    assert ckpt.verify(root, storage_options=opts).ok
    assert open_storage(root, opts).fs is open_storage(root, opts).fs
    # the URL named as given, whichever of adlfs's schemes (it calls itself abfs)
    with pytest.raises(ckpt.CheckpointNotFoundError, match=re.escape(f"{root}: ")) as info:
        ckpt.restore(root, 99, storage_options=opts)
    assert "abfs://" not in str(info.value)
    other = "abfs://" + root.removeprefix("az://")
    assert ckpt.read_manifest(other, storage_options=opts).attempt == m.attempt
    with pytest.raises(ckpt.CheckpointNotFoundError, match=re.escape(f"{other}: ")):
        ckpt.restore(other, 99, storage_options=opts)

    keep2 = ckpt.ManagerOptions(retention=ckpt.RetentionPolicy(keep_last=2))
    with ckpt.CheckpointManager(root + "-mgr", keep2, storage_options=opts) as mgr:
        for step in range(4):
            state["step"] = step
            mgr.save(step, state)
    assert ckpt.list_steps(root + "-mgr", storage_options=opts) == [2, 3]
    target = make_state(2)
    with ckpt.CheckpointManager(root + "-mgr", keep2, storage_options=opts) as mgr:
        assert mgr.restore(target) == 3
    _same(target, state)


def test_16_racing_committers_of_one_step_exactly_one_wins(azure_store: Store) -> None:
    """16 threads each make a whole attempt at step 7 (begin, write, commit), committing at the
    same moment: one wins, the 15 others get CheckpointExistsError, the winner's data is intact."""
    root, opts, n = azure_store.root, azure_store.opts, 16
    barrier = threading.Barrier(n)
    results: dict[int, tuple[str, str]] = {}

    def one(i: int) -> None:
        try:
            a = ckpt.begin(root, step=7, storage_options=opts)
            report = ckpt.write_shards(a, {"who": torch.tensor([i])}, storage_options=opts)
            barrier.wait(timeout=120)
            ckpt.commit(a, [report], storage_options=opts)
            results[i] = ("won", a.attempt)
        except ckpt.CheckpointExistsError as err:
            results[i] = ("lost", str(err))
        except BaseException as err:  # reported below
            barrier.abort()
            results[i] = ("error", repr(err))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    outcomes = sorted(r for r, _ in results.values())
    assert outcomes == ["lost"] * (n - 1) + ["won"], results
    (winner,) = [i for i, (r, _) in results.items() if r == "won"]
    assert all("step 7" in msg for r, msg in results.values() if r == "lost")
    assert ckpt.read_manifest(root, 7, storage_options=opts).attempt == results[winner][1]
    assert ckpt.restore(root, 7, storage_options=opts)["who"].item() == winner


# --- the conditional-write probe ----------------------------------------------------------------


def test_the_probe_passes_once_and_refuses_an_endpoint_that_ignores_if_none_match(
    azure_endpoint: str, azure_store: Store, tmp_path: Any
) -> None:
    """Azure's create-only write is ``If-None-Match: *``. A SharedKey signature covers that
    header (a proxy dropping it breaks authentication: 403), so the endpoint that ignores it is
    Azurite behind a header-stripping proxy reached with a SAS, which signs the URL only."""
    from safetensors.torch import save as st_save

    from ckpt.cli import main

    base, container = (
        azure_endpoint.rsplit("/", 1)[0],
        azure_store.root.removeprefix("az://").split("/")[0],
    )
    with FaultProxy(base) as honest:
        opts = azure_sas_options(f"{honest.url}/{AZURITE_ACCOUNT}")
        open_storage(azure_store.root, opts).exists("warm-up")
        honest.reset()
        ckpt.begin(azure_store.root, step=1, storage_options=opts)
        assert honest.counts == {"PUT": 2, "DELETE": 1, "HEAD": 1}  # probe: Put Blob, 409, delete
        honest.reset()
        ckpt.begin(azure_store.root, step=2, storage_options=opts)
        assert honest.counts == {"HEAD": 1}  # cached for this endpoint and container
    src = str(tmp_path / "src")
    ckpt.save(src, {"x": torch.arange(5)}, step=1)
    with FaultProxy(base, strip_headers=("If-None-Match",)) as proxy:
        opts = azure_sas_options(f"{proxy.url}/{AZURITE_ACCOUNT}")
        root = f"az://{container}/run"
        assert not open_storage(root, opts).conditional_writes_work()
        with pytest.raises(ConditionalWriteUnsupportedError, match="If-None-Match") as info:
            ckpt.save(root, {"x": torch.arange(5)}, step=1, storage_options=opts)
        assert proxy.url in str(info.value)
        assert "allow_non_atomic_commit" in str(info.value)
        with pytest.raises(ConditionalWriteUnsupportedError, match="If-None-Match"):
            ckpt.copy(src, f"az://{container}/copy", dst_storage_options=opts)
        fsspec.filesystem("az", **opts).pipe_file(
            f"{container}/model/model.safetensors", st_save({"w": torch.ones(4)})
        )
        with pytest.raises(ConditionalWriteUnsupportedError, match="If-None-Match"):
            ckpt.adopt(f"az://{container}/model", storage_options=opts)
        dst_opt = f"--dst-storage-option=connection_string={opts['connection_string']}"
        assert main(["cp", src, f"az://{container}/copy", dst_opt, "--quiet"]) != 0
        for r in ("run", "copy", "model"):
            assert ckpt.list_steps(f"az://{container}/{r}", storage_options=opts) == []
        # single-writer use, declared: allowed, no probe made
        single = ckpt.SaveOptions(allow_non_atomic_commit=True)
        proxy.reset()
        ckpt.save(root, {"x": torch.arange(5)}, step=1, options=single, storage_options=opts)
        assert proxy.counts.get("DELETE", 0) == 0
        assert torch.equal(ckpt.restore(root, storage_options=opts)["x"], torch.arange(5))
    assert open_storage(root, azure_sas_options(azure_endpoint)).conditional_writes_work()


# --- retries and lost replies (through the fault proxy) ------------------------------------------


def test_lost_replies_are_recognised_by_reading_back(proxy: FaultProxy, azure_store: Store) -> None:
    """A create-only write lands and its reply is lost (twice: aiohttp retries a PUT on a reused
    connection once by itself); the retry meets 409 BlobAlreadyExists. The blob there is ours
    (a Put Blob: its Content-MD5; a block list: our block ids): success. Another writer's is not."""
    st = open_storage(azure_store.root, _via(proxy, ckpt_retry=FAST), **SMALL)
    assert isinstance(st, AzureStorage)
    holds, committed = _spy(st, "_holds"), _spy(st, "_committed")
    small, big = _data(100 * KiB, 1), _data(3 * MiB // 2, 2)
    proxy.faults = [
        Fault("lost_response", method="PUT", path="/steps/", limit=2),
        Fault("lost_response", method="PUT", path="/data/s", limit=2),
        Fault("lost_response", method="PUT", query="comp=blocklist", limit=2),
    ]
    before = dict(ckpt.storage.RETRIES)
    rel = "steps/000000000009/manifest.json"
    assert st.put_if_absent(rel, b'{"mine": 1}', fsync=False)
    st.write_file("data/s", [small], size=len(small), fsync=False)
    st.write_file("data/m", [big], size=len(big), fsync=False)
    assert proxy.injected_counts == {"lost_response": 6}
    assert holds == [True, True]
    assert committed == [True]
    # aiohttp's disconnect is what azure-core calls a ServiceRequestError ("not sent"), though
    # the write landed: retried by ckpt, and read back
    assert {k.split(":")[0] for k in _retries(before)} == {"upload", "commit_block_list"}
    assert (st.read(rel), st.read("data/s"), st.read("data/m")) == (b'{"mine": 1}', small, big)
    assert st.multipart_uploads() == []
    # a real conflict is still one
    assert not st.put_if_absent(rel, b'{"theirs": 1}', fsync=False)
    for name, data in (("data/s", small[::-1]), ("data/m", big[::-1])):
        with pytest.raises(StorageError, match="already exists"):
            st.write_file(name, [data], size=len(data), fsync=False)
    assert (st.read(rel), st.read("data/s"), st.read("data/m")) == (b'{"mine": 1}', small, big)
    assert st.multipart_uploads() == []


def test_503s_are_retried_by_ckpt_alone_and_counted(
    proxy: FaultProxy, azure_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 % of all requests answer 503: the save, the restore and verify succeed, and every 503
    is exactly one retry of ckpt's (the SDK's own retries are off: none absorbed elsewhere)."""
    monkeypatch.setattr(azure_mod, "AZ_SINGLE_PUT_MAX_BYTES", MiB)
    opts, state = (
        _via(proxy, ckpt_retry=FAST),
        {"big": torch.randn(MiB // 2), "w": torch.randn(64, 33)},
    )
    save = ckpt.SaveOptions(write_chunk_bytes=256 * KiB, block_bytes=256 * KiB)
    proxy.faults = [Fault("slowdown", probability=0.3, seed=11)]
    before = dict(ckpt.storage.RETRIES)
    ckpt.save(azure_store.root, state, step=1, options=save, storage_options=opts)
    back = ckpt.restore(
        azure_store.root,
        storage_options=opts,
        options=ckpt.RestoreOptions(read_chunk_bytes=512 * KiB),
    )
    assert ckpt.verify(azure_store.root, storage_options=opts).ok
    _same(back, state)
    injected, retried = proxy.injected_counts.get("slowdown", 0), _retries(before)
    assert injected >= 5, proxy.counts
    assert all(re.search(r": 503\b", k) for k in retried), retried
    assert sum(retried.values()) == injected, (retried, injected)
    assert any(k.startswith("stage_block") for k in retried), retried  # the blocks too
    # each Storage counts its own
    proxy.faults = [Fault("slowdown", method="GET", path="/data/", nth=1)]
    st = open_storage(azure_store.root, opts)
    m = ckpt.read_manifest(azure_store.root, storage_options=opts)
    st.read_into(sorted(m.files)[0], 0, [memoryview(bytearray(10))])
    assert dict(st.retries) == {"download: 503": 1}  # the proxy sends no x-ms-error-code


def test_permanent_errors_are_not_retried(proxy: FaultProxy, azure_store: Store) -> None:
    """403 (a write refused) and 404 (no such blob) are one request each, never retried."""
    st = open_storage(azure_store.root, _via(proxy, ckpt_retry=FAST))
    st.exists("warm-up")
    before = dict(ckpt.storage.RETRIES)
    calls: list[tuple[Callable[[], Any], type[Exception], str, list[Fault]]] = [
        (
            lambda: st.write_file("data/x", [b"abc"], size=3, fsync=False),
            StorageError,
            "PUT",
            [Fault("denied", method="PUT")],
        ),
        (
            lambda: st.put_if_absent("steps/000000000001/manifest.json", b"{}", fsync=False),
            StorageError,
            "PUT",
            [Fault("denied")],
        ),
        (
            lambda: st.read_into("data/nope", 0, [memoryview(bytearray(4))]),
            MissingShardError,
            "GET",
            [],
        ),
        (lambda: st.size("data/nope"), MissingShardError, "HEAD", []),
    ]
    for call, error, method, faults in calls:
        proxy.faults = faults
        proxy.reset()
        with pytest.raises(error, match="403" if faults else "not found"):
            call()
        assert proxy.counts == {method: 1}
    assert _retries(before) == {}


@pytest.mark.parametrize("action", ["reset", "lost_response", "truncate", "internal"])
def test_a_failed_ranged_get_is_read_again(
    proxy: FaultProxy, azure_store: Store, action: str
) -> None:
    st = open_storage(azure_store.root, _via(proxy, ckpt_retry=FAST))
    data = _data(2 * MiB, 3)
    st.write_file("data/g", [data], size=len(data), fsync=False)
    st.read_into("data/g", 0, [memoryview(bytearray(10))])  # a connection to reuse
    # burst=2: past aiohttp's own single retry of an idempotent request on a reused connection
    proxy.faults = [Fault(action, method="GET", path="/data/", nth=1, burst=2)]
    before = dict(ckpt.storage.RETRIES)
    bufs = [memoryview(bytearray(n)) for n in (7, MiB, 333_333)]
    st.read_into("data/g", 1000, bufs)
    assert b"".join(bytes(b) for b in bufs) == data[1000 : 1000 + 7 + MiB + 333_333]
    assert proxy.injected_counts == {action: 2}
    assert sum(_retries(before, "download").values()) >= 1


# --- writes in blocks, reads in one request -------------------------------------------------------


def test_a_big_file_goes_up_in_concurrent_blocks_and_reads_back_byte_exact(
    proxy: FaultProxy, azure_store: Store
) -> None:
    st = open_storage(azure_store.root, _via(proxy), **SMALL)
    assert isinstance(st, AzureStorage)
    data = _data(6 * MiB + 12345, 4)  # 25 blocks of 256 KiB, the last one short
    inflight, peak, lock = 0, 0, threading.Lock()
    real = st._retrying

    async def counting(op: str, *args: Any) -> Any:
        nonlocal inflight, peak
        if op != "stage_block":
            return await real(op, *args)
        with lock:
            inflight += 1
            peak = max(peak, inflight)
        try:
            return await real(op, *args)
        finally:
            with lock:
                inflight -= 1

    st._retrying = counting  # type: ignore[method-assign]
    blocks, lists = (
        Fault("internal", query="blockid=", probability=0.0),
        Fault("internal", query="comp=blocklist", probability=0.0),
    )
    proxy.faults = [blocks, lists]  # never hit: they count the requests
    proxy.latency_s = 0.02
    proxy.reset()
    st.write_file(
        "data/big",
        iter([memoryview(data)[i : i + 333_333] for i in range(0, len(data), 333_333)]),
        size=len(data),
        fsync=False,
    )
    assert (blocks.matched, lists.matched) == (25, 1)
    assert proxy.counts == {"PUT": 26}
    assert 2 <= peak <= azure_mod.AZ_BLOCKS_PER_FILE
    assert st.size("data/big") == len(data)
    for start, lengths in [
        (256 * KiB - 10, [3, 17, 2 * MiB]),
        (0, [len(data)]),
        (len(data) - 5, [5]),
        (MiB - 1, [1, 0, 2]),
    ]:
        bufs = [memoryview(bytearray(n)) for n in lengths]
        proxy.reset()
        st.read_into("data/big", start, bufs)
        assert proxy.counts == {"GET": 1}  # one ranged GET, across block boundaries
        assert b"".join(bytes(b) for b in bufs) == data[start : start + sum(lengths)]
    proxy.reset()
    assert st.read("data/big") == data
    assert proxy.counts == {"GET": 1}


def test_ckpt_uses_a_client_of_its_own_with_the_sdk_retries_off(azure_store: Store) -> None:
    """The caller's cached adlfs instance keeps its client (and its retries); ckpt's client has
    the SDK's retry policy at zero, and is reused for the same options."""
    opts = {"connection_string": azure_store.opts["connection_string"]}
    caller = fsspec.filesystem("az", **opts)
    theirs = caller.service_client
    st = open_storage(azure_store.root, opts)
    assert isinstance(st, AzureStorage)
    assert st.fs is not caller
    assert caller.service_client is theirs
    assert theirs._config.retry_policy.total_retries == 3  # the SDK's default, untouched
    assert st._client._config.retry_policy.total_retries == 0
    assert open_storage(azure_store.root, opts).fs is st.fs
    assert open_storage(azure_store.root, {**opts, "skip_instance_cache": True}).fs is not st.fs
    assert st.endpoint() == azure_store.opts["connection_string"].split("BlobEndpoint=")[1].rstrip(
        ";"
    )
