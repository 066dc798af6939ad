"""``ckpt cp`` between any two of local disk, S3 (moto), GCS (fake-gcs-server) and Azure
(Azurite): every pair, through the CLI, each copy verified and restored bitwise."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import ckpt
from ckpt.cli import main
from tests.conftest import Store

BACKENDS = [
    "local",
    pytest.param("s3", marks=pytest.mark.s3),
    pytest.param("gcs", marks=pytest.mark.gcs),
    pytest.param("azure", marks=pytest.mark.azure),
]


def _flags(flag: str, opts: dict[str, Any]) -> list[str]:
    return [f"--{flag}={k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in opts.items()]


@pytest.mark.parametrize("src_kind", BACKENDS)
@pytest.mark.parametrize("dst_kind", BACKENDS)
def test_cp_between_backends(src_kind: str, dst_kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> None:
    if src_kind == dst_kind:
        pytest.skip("a copy within one backend is tested in tests/lifecycle/test_copy.py")
    src: Store = request.getfixturevalue(f"{src_kind}_store")
    dst: Store = request.getfixturevalue(f"{dst_kind}_store")
    state = {"w": torch.randn(3000, generator=torch.Generator().manual_seed(2)), "b": torch.arange(7)}
    ckpt.save(src.root, state, step=5, storage_options=src.opts)
    dst_root = dst.root + "-copy"
    argv = ["cp", src.root, dst_root, *_flags("src-opt", src.opts), *_flags("dst-opt", dst.opts), "--quiet"]
    assert main(argv) == 0
    assert ckpt.list_steps(dst_root, storage_options=dst.opts) == [5]
    assert ckpt.verify(dst_root, storage_options=dst.opts).ok
    back = ckpt.restore(dst_root, storage_options=dst.opts)
    assert torch.equal(back["w"], state["w"])
    assert torch.equal(back["b"], state["b"])
