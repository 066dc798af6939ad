"""The requests of a save and of a restore on S3, counted and ordered by the latency proxy in
front of moto (docs/s3.md, "Requests of a save and a restore"): a second save of a process makes
no probe, no stat of what it just wrote, and checks the step and reads LATEST while other
requests are in flight; a restore reads its manifest with one GET and goes straight to the data
(no listing for a named step, no HEADs), and the size checks it skipped still hold, made from
the data GETs' replies instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import torch

import ckpt
from ckpt.errors import (
    CheckpointExistsError,
    ManifestTooLargeError,
    MissingShardError,
    ShardSizeMismatchError,
)
from ckpt.format import manifest as manifest_mod
from ckpt.storage import open_storage
from ckpt.testing.proxy import LatencyProxy
from tests.conftest import Store, s3_options

pytestmark = pytest.mark.s3


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[LatencyProxy]:
    with LatencyProxy(s3_endpoint) as p:
        yield p


@pytest.fixture
def bucket(s3_store: Store) -> str:
    """A fresh bucket (conftest's ``s3_store``), by name."""
    return s3_store.root.removeprefix("s3://").split("/")[0]


def _opts(url: str) -> dict[str, Any]:
    return s3_options(url)


def _state() -> dict[str, torch.Tensor]:
    return {"a": torch.randn(1000, generator=torch.Generator().manual_seed(1)), "b": torch.arange(64)}


def _data_files(proxy: LatencyProxy, bucket: str, step: int) -> list[str]:
    """The data files of ``step`` (listed straight at moto: not one of the proxy's requests)."""
    fs = fsspec.filesystem("s3", **_opts(str(proxy.upstream)))
    fs.invalidate_cache()
    return [p for p in fs.find(f"{bucket}/run/data") if f"/data/{step:012d}-" in p]


def test_a_second_save_makes_no_probe_no_stat_and_no_dependent_checks(proxy: LatencyProxy, bucket: str) -> None:
    root, opts = f"s3://{bucket}/run", _opts(proxy.url)
    ckpt.save(root, _state(), step=1, storage_options=opts)  # the first save of the process probes
    proxy.reset()
    ckpt.save(root, _state(), step=2, storage_options=opts)
    seen = proxy.requests
    (data,) = _data_files(proxy, bucket, 2)
    manifest = f"/{bucket}/run/steps/000000000002/manifest.json"
    # the step check and the LATEST read ride along with the data PUT and the commit
    assert sorted(seen) == sorted(
        [f"HEAD {manifest}", f"PUT /{data}", f"PUT {manifest}", f"GET /{bucket}/run/LATEST", f"PUT /{bucket}/run/LATEST"]
    ), seen
    puts = [r for r in seen if r.startswith("PUT ")]
    assert puts == [f"PUT /{data}", f"PUT {manifest}", f"PUT /{bucket}/run/LATEST"]  # data, commit, hint
    assert seen.index(f"GET /{bucket}/run/LATEST") > seen.index(f"PUT /{data}")  # read only for a commit
    assert ckpt.list_steps(root, storage_options=opts) == [1, 2]
    assert open_storage(root, opts).read("LATEST") == b'{"step":2}'


def test_a_save_of_a_committed_step_is_refused_and_leaves_no_data(proxy: LatencyProxy, bucket: str) -> None:
    root, opts = f"s3://{bucket}/run", _opts(proxy.url)
    first = ckpt.save(root, _state(), step=1, storage_options=opts)
    with pytest.raises(CheckpointExistsError, match="step 1 is already committed"):
        ckpt.save(root, {"a": torch.zeros(1000), "b": torch.arange(64)}, step=1, storage_options=opts)
    assert _data_files(proxy, bucket, 1) == [p for p in _data_files(proxy, bucket, 1) if first.attempt in p]
    assert len(_data_files(proxy, bucket, 1)) == 1
    assert torch.equal(ckpt.restore(root, storage_options=opts)["a"], _state()["a"])


def test_a_restore_reads_its_manifest_with_one_get_and_then_the_data(proxy: LatencyProxy, bucket: str) -> None:
    root, opts = f"s3://{bucket}/run", _opts(proxy.url)
    for step in (1, 2):
        ckpt.save(root, _state(), step=step, storage_options=opts)
    target = {k: torch.empty_like(v) for k, v in _state().items()}
    for step, listing in ((1, []), (None, [f"GET /{bucket}?list-type=2&prefix=run%2Fsteps%2F"])):
        proxy.reset()
        ckpt.restore(root, step, target=target, storage_options=opts)
        (data,) = _data_files(proxy, bucket, step or 2)
        seen = [r.split("&delimiter")[0] for r in proxy.requests]
        manifest = f"GET /{bucket}/run/steps/{step or 2:012d}/manifest.json"
        assert seen == [*listing, manifest, f"GET /{data}"], seen  # no HEAD, no listing for a named step
        assert all(torch.equal(target[k], v) for k, v in _state().items())


@pytest.mark.parametrize("change", ["extended", "truncated", "missing"])
def test_an_in_place_restore_checks_file_sizes_from_the_reads(proxy: LatencyProxy, bucket: str, change: str) -> None:
    root, opts = f"s3://{bucket}/run", _opts(proxy.url)
    ckpt.save(root, _state(), step=1, storage_options=opts)
    (data,) = _data_files(proxy, bucket, 1)
    fs = fsspec.filesystem("s3", **_opts(proxy.url))
    good = fs.cat_file(data)
    if change == "missing":
        fs.rm(data)
    else:
        fs.pipe_file(data, good + b"\0" * 8 if change == "extended" else good[:-8])
    name = data.rsplit("/", 1)[1]
    target = {k: torch.empty_like(v) for k, v in _state().items()}
    if change == "missing":
        with pytest.raises(MissingShardError, match=rf"{name}: missing; it holds keys \['a', 'b'\]"):
            ckpt.restore(root, 1, target=target, storage_options=opts)
        return
    size = len(good) + (8 if change == "extended" else -8)
    with pytest.raises(ShardSizeMismatchError, match=rf"{name}: {size} bytes, the manifest says {len(good)}; truncated or extended"):
        ckpt.restore(root, 1, target=target, storage_options=opts)


def test_a_manifest_over_the_cap_is_refused_from_the_replys_size(
    proxy: LatencyProxy, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, opts = f"s3://{bucket}/run", _opts(proxy.url)
    ckpt.save(root, _state(), step=1, storage_options=opts)
    size = len(open_storage(root, opts).read("steps/000000000001/manifest.json"))
    monkeypatch.setattr(manifest_mod, "MAX_MANIFEST_BYTES", size - 1)
    proxy.reset()
    with pytest.raises(ManifestTooLargeError, match=rf"manifest\.json: {size} bytes is over the {size - 1}-byte"):
        ckpt.read_manifest(root, 1, storage_options=opts)
    assert proxy.counts == {"GET": 1}


def test_ls_of_a_large_paged_manifest_reads_its_head_not_its_body(proxy: LatencyProxy, bucket: str) -> None:
    """A paged manifest over 256 KiB is listed from a ranged GET of its start: far fewer bytes
    than the file (the first GET, which states the size, is dropped after its headers)."""
    from ckpt.lifecycle.steps import read_head

    root, opts = f"s3://{bucket}/run", _opts(proxy.url)
    state = {f"t{i:05d}": torch.full((2,), float(i)) for i in range(8000)}
    ckpt.save(root, state, step=1, storage_options=opts)
    size = open_storage(root, opts).size("steps/000000000001/manifest.json")
    assert size > 1_000_000
    proxy.reset()
    head = read_head(open_storage(root, opts), 1)
    assert (head.num_tensors, head.format_version) == (8000, 2)
    assert proxy.stats()["bytes_out"] < size / 2, proxy.stats()
