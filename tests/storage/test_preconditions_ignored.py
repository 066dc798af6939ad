"""Real endpoints that ignore create-only preconditions are refused: gcp-storage-emulator
(ignores ``ifGenerationMatch``) and s3rver (ignores ``If-None-Match``). Save, copy and adopt all
stop at the probe and commit nothing; a caller who declares a single writer
(``allow_non_atomic_commit=True``) may still save there (docs/storage.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from safetensors.torch import save as st_save

import ckpt
from ckpt.errors import ConditionalWriteUnsupportedError
from ckpt.storage import open_storage
from tests.conftest import Store
from tests.support.emulators import gcp_storage_emulator, gcs_options, s3rver

BUCKET = "lax"


@pytest.fixture(params=[pytest.param("gcp-storage-emulator", marks=pytest.mark.gcs), "s3rver"])
def lax_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "gcp-storage-emulator":
        with gcp_storage_emulator(BUCKET) as url:
            yield Store("gcs", f"gs://{BUCKET}/run", gcs_options(url))
    else:
        (tmp_path / "s3rver").mkdir()
        with s3rver(BUCKET, tmp_path / "s3rver") as url:
            opts = {"key": "S3RVER", "secret": "S3RVER", "endpoint_url": url, "skip_instance_cache": True}
            yield Store("s3", f"s3://{BUCKET}/run", opts)


def test_an_endpoint_that_ignores_preconditions_is_refused(lax_store: Store, tmp_path: Path) -> None:
    root, opts = lax_store.root, lax_store.opts
    precondition = open_storage(root, opts).precondition
    assert not open_storage(root, opts).conditional_writes_work()
    state = {"x": torch.arange(5)}
    with pytest.raises(ConditionalWriteUnsupportedError, match="allow_non_atomic_commit") as info:
        ckpt.save(root, state, step=1, storage_options=opts)
    assert precondition in str(info.value)
    src = str(tmp_path / "src")
    ckpt.save(src, state, step=1)
    with pytest.raises(ConditionalWriteUnsupportedError):
        ckpt.copy(src, root, dst_storage_options=opts)
    fs: Any = fsspec.core.url_to_fs(root, **opts)[0]
    model = root.rsplit("/", 1)[0] + "/model"
    fs.pipe_file(f"{model}/model.safetensors", st_save({"w": torch.ones(4)}))
    with pytest.raises(ConditionalWriteUnsupportedError):
        ckpt.adopt(model, storage_options=opts)
    assert ckpt.list_steps(root, storage_options=opts) == []
    single = ckpt.SaveOptions(allow_non_atomic_commit=True)  # one declared writer: allowed
    ckpt.save(root, state, step=1, options=single, storage_options=opts)
    assert torch.equal(ckpt.restore(root, storage_options=opts)["x"], state["x"])
    assert ckpt.verify(root, storage_options=opts).ok
