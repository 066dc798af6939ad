"""The GCS backend against fake-gcs-server on 127.0.0.1: the public API and the manager with
default options, racing committers, the conditional-write probe (an endpoint that ignores
``ifGenerationMatch``, like gcp-storage-emulator, is refused), retries, lost replies, and the CLI.

Fault tests put a FaultProxy in front of a fake-gcs-server of their own that hands out the
proxy's address for resumable upload sessions, so every request goes through the proxy."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import torch
from safetensors.torch import save as st_save

import ckpt
from ckpt.cli import main
from ckpt.errors import ConditionalWriteUnsupportedError
from ckpt.storage import GCSStorage, open_storage
from ckpt.testing.fault_proxy import Fault, FaultProxy
from tests.conftest import Store, make_state
from tests.support.emulators import fake_gcs_server, free_port, gcs_options

pytestmark = pytest.mark.gcs
_MiB = 1 << 20


@pytest.fixture(scope="module")
def proxied() -> Iterator[tuple[FaultProxy, str]]:
    """A FaultProxy in front of a fake-gcs-server of this module's (its sessions point at the
    proxy); yields the proxy and the server's own URL."""
    port = free_port()
    with (
        FaultProxy(f"http://127.0.0.1:{port}") as proxy,
        fake_gcs_server(port, external_url=proxy.url) as url,
    ):
        yield proxy, url


@pytest.fixture
def via_proxy(proxied: tuple[FaultProxy, str]) -> Iterator[tuple[FaultProxy, Store]]:
    proxy, url = proxied
    opts = gcs_options(proxy.url)
    bucket = f"ckpt-f-{threading.get_ident() % 10_000}-{id(proxy) % 10_000}-{free_port()}"
    fsspec.filesystem("gs", **gcs_options(url)).mkdir(bucket)
    proxy.faults = []
    proxy.strip_query = frozenset()
    proxy.reset()
    yield proxy, Store("gcs", f"gs://{bucket}/run", opts)
    proxy.faults = []


def _equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    for k, v in a.items():
        if isinstance(v, dict):
            _equal(v, b[k])
        elif isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k


def test_save_restore_verify_with_default_options(gcs_store: Store) -> None:
    st = open_storage(gcs_store.root, gcs_store.opts)
    assert isinstance(st, GCSStorage)
    assert st.atomic_create
    state = make_state(3)
    m = ckpt.save(gcs_store.root, state, step=4, storage_options=gcs_store.opts)
    back = ckpt.restore(gcs_store.root, storage_options=gcs_store.opts)
    _equal(state["model"], back["model"])
    assert ckpt.verify(gcs_store.root, storage_options=gcs_store.opts).ok
    assert ckpt.list_steps(gcs_store.root, storage_options=gcs_store.opts) == [4]
    assert ckpt.read_manifest(gcs_store.root, storage_options=gcs_store.opts).attempt == m.attempt


def test_manager_saves_retains_and_resumes(gcs_store: Store) -> None:
    opts = ckpt.ManagerOptions(retention=ckpt.RetentionPolicy(keep_last=2))
    with ckpt.CheckpointManager(gcs_store.root, opts, storage_options=gcs_store.opts) as mgr:
        for step in range(1, 5):
            mgr.save(step, {"w": torch.full((64,), float(step)), "step": step})
    assert ckpt.list_steps(gcs_store.root, storage_options=gcs_store.opts) == [3, 4]
    with ckpt.CheckpointManager(gcs_store.root, opts, storage_options=gcs_store.opts) as mgr:
        target = {"w": torch.zeros(64), "step": 0}
        step = mgr.restore(target)
    assert (step, target["step"]) == (4, 4)
    assert torch.equal(target["w"], torch.full((64,), 4.0))


def test_sixteen_racing_committers_exactly_one_wins(gcs_store: Store) -> None:
    n, results = 16, []
    attempts = [
        ckpt.begin(gcs_store.root, step=7, storage_options=gcs_store.opts) for _ in range(n)
    ]
    reports = [
        ckpt.write_shards(a, {"who": torch.tensor([i])}, storage_options=gcs_store.opts)
        for i, a in enumerate(attempts)
    ]
    barrier, lock = threading.Barrier(n), threading.Lock()

    def commit(i: int) -> None:
        barrier.wait(timeout=60)
        try:
            ckpt.commit(attempts[i], [reports[i]], storage_options=dict(gcs_store.opts))
            outcome = "won"
        except ckpt.CheckpointExistsError:
            outcome = "lost"
        with lock:
            results.append((outcome, i))

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    winners = [i for outcome, i in results if outcome == "won"]
    assert len(results) == n, results
    assert len(winners) == 1, results
    assert (
        ckpt.read_manifest(gcs_store.root, 7, storage_options=gcs_store.opts).attempt
        == attempts[winners[0]].attempt
    )
    assert (
        ckpt.restore(gcs_store.root, 7, storage_options=gcs_store.opts)["who"].item() == winners[0]
    )


def test_an_endpoint_that_ignores_if_generation_match_is_refused(
    via_proxy: tuple[FaultProxy, Store], tmp_path: Any
) -> None:
    proxy, store = via_proxy
    proxy.strip_query = frozenset({"ifGenerationMatch"})  # what gcp-storage-emulator does
    assert not open_storage(store.root, store.opts).conditional_writes_work()
    with pytest.raises(ConditionalWriteUnsupportedError, match="ifGenerationMatch") as info:
        ckpt.save(store.root, {"x": torch.arange(5)}, step=1, storage_options=store.opts)
    assert "allow_non_atomic_commit" in str(info.value)
    assert ckpt.list_steps(store.root, storage_options=store.opts) == []
    src = str(tmp_path / "src")
    ckpt.save(src, {"x": torch.arange(5)}, step=1)
    with pytest.raises(ConditionalWriteUnsupportedError):
        ckpt.copy(src, store.root, dst_storage_options=store.opts)
    fs = fsspec.filesystem("gs", **store.opts)
    model = store.root.removeprefix("gs://").replace("/run", "/model")
    fs.pipe_file(f"{model}/model.safetensors", st_save({"w": torch.ones(4)}))
    with pytest.raises(ConditionalWriteUnsupportedError):
        ckpt.adopt(f"gs://{model}", storage_options=store.opts)
    single = ckpt.SaveOptions(allow_non_atomic_commit=True)  # declared single writer: allowed
    ckpt.save(
        store.root, {"x": torch.arange(5)}, step=1, options=single, storage_options=store.opts
    )
    assert torch.equal(ckpt.restore(store.root, storage_options=store.opts)["x"], torch.arange(5))


def test_transient_errors_are_retried_and_counted(via_proxy: tuple[FaultProxy, Store]) -> None:
    proxy, store = via_proxy
    proxy.faults = [
        Fault("slowdown", probability=0.3, seed=13),
        Fault("reset", method="GET", probability=0.1, seed=5),
    ]
    before = dict(ckpt.storage.RETRIES)
    state = {
        f"t{i}": torch.randn(50_000, generator=torch.Generator().manual_seed(i)) for i in range(6)
    }
    ckpt.save(
        store.root,
        state,
        step=1,
        options=ckpt.SaveOptions(max_file_bytes=300_000),
        storage_options=store.opts,
    )
    back = ckpt.restore(store.root, storage_options=store.opts)
    proxy.faults = []
    assert all(torch.equal(back[k], v) for k, v in state.items())
    assert ckpt.verify(store.root, storage_options=store.opts).ok
    injected = proxy.injected_counts
    assert injected.get("slowdown", 0) >= 3, injected
    retried = {
        k: v - before.get(k, 0) for k, v in ckpt.storage.RETRIES.items() if v > before.get(k, 0)
    }
    assert sum(v for k, v in retried.items() if "503" in k) >= injected["slowdown"], retried


def test_lost_replies_are_recognised_by_read_back(via_proxy: tuple[FaultProxy, Store]) -> None:
    proxy, store = via_proxy
    st = open_storage(store.root, store.opts, single_put_max_bytes=_MiB, part_bytes=_MiB)
    # a create-only upload that landed, its reply lost: the retry meets 412, the bytes are ours
    proxy.faults = [Fault("lost_response", method="POST", query="ifGenerationMatch", nth=1)]
    assert st.put_if_absent("steps/000000000001/manifest.json", b'{"a": 1}', fsync=True)
    assert not st.put_if_absent("steps/000000000001/manifest.json", b'{"a": 2}', fsync=True)
    small = bytes(range(256)) * 1000
    proxy.faults = [Fault("lost_response", method="POST", query="ifGenerationMatch", nth=1)]
    st.write_file("data/small.bin", [small], size=len(small), fsync=False)
    proxy.faults = []
    assert st.read("data/small.bin") == small
    assert sum(v for k, v in st.retries.items() if k.startswith("upload")) >= 2, st.retries


def test_a_resumed_chunk_is_exact_or_the_write_fails_closed(
    via_proxy: tuple[FaultProxy, Store],
) -> None:
    """A chunk of a resumable upload whose reply was lost: the upload asks the service how much
    it holds and sends the rest (real GCS). fake-gcs-server finalizes the object on that status
    query and appends a resent range blindly (emulator gaps, docs/storage.md): the end-of-upload
    check (size and CRC32C) then fails the write and deletes the object. Never a wrong file."""
    proxy, store = via_proxy
    st = open_storage(store.root, store.opts, single_put_max_bytes=_MiB, part_bytes=_MiB)
    big = torch.randint(
        0, 255, (3 * _MiB + 12345,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    for i, fault in enumerate(("lost_response", "reset")):
        proxy.faults = [Fault(fault, method="PUT", nth=2)]
        rel = f"data/big{i}.bin"
        err: ckpt.StorageError | None = None
        try:
            st.write_file(rel, [memoryview(big.numpy())], size=big.numel(), fsync=False)
        except ckpt.StorageError as e:
            err = e
        if err is not None:
            assert "does not match what was sent" in str(err) or "FileNotFoundError" in repr(
                err.__cause__
            )
            proxy.faults = []
            assert not st.exists(rel)
        else:
            proxy.faults = []
            assert st.read(rel) == big.numpy().tobytes()
        assert proxy.injected_counts.get(fault) == 1


def test_a_failed_resumable_upload_leaves_nothing(via_proxy: tuple[FaultProxy, Store]) -> None:
    proxy, store = via_proxy
    st = open_storage(store.root, store.opts, single_put_max_bytes=_MiB, part_bytes=_MiB)
    proxy.faults = [Fault("denied", method="PUT", nth=2)]
    data = bytes(3 * _MiB)
    with pytest.raises(ckpt.StorageError, match=r"big\.bin"):
        st.write_file("data/big.bin", [data], size=len(data), fsync=False)
    proxy.faults = []
    assert not st.exists("data/big.bin")
    assert st.list_files() == []


def test_cli_on_a_gs_root(
    gcs_store: Store, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    opts = [
        f"--storage-option={k}={json.dumps(v) if not isinstance(v, str) else v}"
        for k, v in gcs_store.opts.items()
    ]
    root = gcs_store.root
    for step in (1, 2, 3):
        ckpt.save(
            root, {"w": torch.full((8,), float(step))}, step=step, storage_options=gcs_store.opts
        )
    capsys.readouterr()
    assert main([*opts, "ls", root, "--json"]) == 0
    assert [s["step"] for s in json.loads(capsys.readouterr().out)["steps"]] == [1, 2, 3]
    assert main([*opts, "show", f"{root}@2"]) == 0
    assert main([*opts, "verify", root, "--all"]) == 0
    assert main([*opts, "rm", root, "1"]) == 0
    assert main([*opts, "gc", root, "--grace-hours", "0"]) == 0
    assert ckpt.list_steps(root, storage_options=gcs_store.opts) == [2, 3]
    local = str(tmp_path / "copy")
    assert main([*opts, "cp", root, local, "--quiet"]) == 0
    assert ckpt.list_steps(local) == [2, 3]
    back_root = root.replace("/run", "/back")
    dst_opts = [
        f"--dst-opt={k}={json.dumps(v) if not isinstance(v, str) else v}"
        for k, v in gcs_store.opts.items()
    ]
    assert main(["cp", local, back_root, *dst_opts, "--quiet"]) == 0
    assert torch.equal(
        ckpt.restore(back_root, storage_options=gcs_store.opts)["w"], torch.full((8,), 3.0)
    )
    assert main([*opts, "export", "--format", "hf", root, str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf").is_dir()
    model = root.replace("/run", "/model")
    fsspec.filesystem("gs", **gcs_store.opts).pipe_file(
        model.removeprefix("gs://") + "/model.safetensors", st_save({"w": torch.ones(4)})
    )
    assert main([*opts, "adopt", model]) == 0
    assert torch.equal(ckpt.restore(model, storage_options=gcs_store.opts)["w"], torch.ones(4))
