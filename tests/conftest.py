"""Shared fixtures: real backends (local disk, fsspec memory, a moto S3 server, fake-gcs-server
and Azurite, each on 127.0.0.1 with an ephemeral port) and small training states."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pytest
import torch

from ckpt.testing import register_faulty

# gcsfs would look up each bucket's type (hierarchical/zonal) and stall a minute per call against
# fake-gcs-server; set before any child process (fork server, spawned ranks) starts
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def pytest_configure(config: pytest.Config) -> None:
    register_faulty()  # faulty:// URLs (FaultyFileSystem) are used across the suite


@dataclass(frozen=True)
class Store:
    """A checkpoint root on one backend, with the storage_options to reach it."""

    kind: str
    root: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.storage_options)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """One real HTTP S3 endpoint (moto) per test run, on loopback, port 0."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": "testing-key",
        "secret": "testing-secret",
        "endpoint_url": endpoint,
        "skip_instance_cache": True,
    }


@pytest.fixture
def s3_store(s3_endpoint: str) -> Store:
    """A fresh bucket on the moto endpoint."""
    opts = s3_options(s3_endpoint)
    bucket = f"ckpt-test-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3", **opts)
    fs.call_s3("create_bucket", Bucket=bucket)
    return Store("s3", f"s3://{bucket}/run", opts)


@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[str]:
    """One fake-gcs-server per test run, on loopback (tests/support/emulators.py)."""
    from tests.support.emulators import fake_gcs_server

    with fake_gcs_server() as url:
        yield url


@pytest.fixture
def gcs_store(gcs_endpoint: str) -> Store:
    """A fresh bucket on the fake-gcs-server endpoint."""
    from tests.support.emulators import gcs_options

    opts = gcs_options(gcs_endpoint)
    bucket = f"ckpt-test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("gs", **opts).mkdir(bucket)
    return Store("gcs", f"gs://{bucket}/run", opts)


@pytest.fixture(scope="session")
def azure_endpoint() -> Iterator[str]:
    """One Azurite blob service per test run, on loopback (tests/support/emulators.py)."""
    from tests.support.emulators import azurite

    with azurite() as url:
        yield url


@pytest.fixture
def azure_store(azure_endpoint: str) -> Store:
    """A fresh container on the Azurite endpoint."""
    from tests.support.emulators import azure_options

    opts = azure_options(azure_endpoint)
    container = f"ckpt-test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("az", **opts).mkdir(container)
    return Store("azure", f"az://{container}/run", opts)


@pytest.fixture
def memory_store() -> Iterator[Store]:
    path = f"memory://ckpt-test-{uuid.uuid4().hex[:12]}/run"
    yield Store("memory", path)
    fs = fsspec.filesystem("memory")
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture
def local_store(tmp_path: Any) -> Store:
    return Store("local", str(tmp_path / "run"))


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest) -> Store:
    """Each test using this runs once per backend."""
    return request.getfixturevalue(f"{request.param}_store")  # type: ignore[no-any-return]


def make_state(seed: int = 0) -> dict[str, Any]:
    """A small but real training state: model, AdamW, scheduler, RNG states, counters."""
    import random

    import numpy as np

    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x = torch.randn(32, 8, generator=g)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "step": 3,
    }
