"""Multi-node behaviour: three Ray nodes on this machine (ray.cluster_utils.Cluster), workers
spread across them, saving and restoring through the S3 endpoint and a shared local directory."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import torch

import ckpt
import ckpt.parallel.ray
from ckpt.engine.owners import chunk

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")
pytestmark = pytest.mark.ray

SHAPE = (60, 16)


@pytest.fixture(scope="module")
def three_nodes(s3_endpoint: str) -> Iterator[Any]:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["PYTHONPATH"] = os.pathsep.join([repo, saved["PYTHONPATH"] or ""])
    # Workers get S3 credentials from their environment, never from ckpt's arguments.
    os.environ["AWS_ACCESS_KEY_ID"] = "cluster-test-key"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "cluster-test-secret"
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"node0": 4}, "object_store_memory": 80 << 20},
    )
    for i in (1, 2):
        cluster.add_node(num_cpus=1, resources={f"node{i}": 4}, object_store_memory=80 << 20)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@ray.remote(num_cpus=0)
class NodeWorker:
    def __init__(self, rank: int, world: int) -> None:
        off, n = chunk(SHAPE[0], world, rank)
        self.offset = off
        full = torch.arange(SHAPE[0] * SHAPE[1], dtype=torch.float32).reshape(SHAPE)
        self.rows = full[off : off + n].clone()

    def node(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def checkpoint_state(self) -> dict[str, Any]:
        return {"w": ckpt.Shard(self.rows, SHAPE, (self.offset, 0))}

    def checkpoint_target(self) -> dict[str, Any]:
        return {"w": ckpt.Shard(torch.zeros_like(self.rows), SHAPE, (self.offset, 0))}

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        self.rows = state["w"].tensor

    def rows_and_offset(self) -> tuple[torch.Tensor, int]:
        return self.rows, self.offset


def _spread(world: int) -> list[Any]:
    return [NodeWorker.options(resources={f"node{r % 3}": 1}).remote(r, world) for r in range(world)]


def _roundtrip(root: str, storage_options: dict[str, Any]) -> None:
    writers = _spread(3)
    assert len(set(ray.get([w.node.remote() for w in writers]))) == 3  # one writer per node
    m = ckpt.parallel.ray.save(root, writers, step=4, storage_options=storage_options)
    assert len(m.files) == 3
    readers = _spread(4)  # a different layout, also spread over the three nodes
    assert ckpt.parallel.ray.restore(root, readers, storage_options=storage_options) == 4
    full = torch.arange(SHAPE[0] * SHAPE[1], dtype=torch.float32).reshape(SHAPE)
    for rows, off in ray.get([r.rows_and_offset.remote() for r in readers]):
        assert torch.equal(rows, full[off : off + rows.shape[0]])


def test_three_nodes_through_s3(three_nodes: Any, s3_endpoint: str) -> None:
    bucket = f"ckpt-cluster-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3", endpoint_url=s3_endpoint, skip_instance_cache=True).call_s3("create_bucket", Bucket=bucket)
    _roundtrip(f"s3://{bucket}/run", {"endpoint_url": s3_endpoint})


def test_three_nodes_through_shared_directory(three_nodes: Any, tmp_path: Any) -> None:
    _roundtrip(str(tmp_path / "shared"), {})


@ray.remote(num_cpus=0)
class ReplicaWorker:
    """A data-parallel replica: needs every byte of the state (and one actor only half of it)."""

    def __init__(self, half: bool) -> None:
        self.half = half
        self.state: dict[str, Any] = {}

    def node(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def checkpoint_target(self) -> dict[str, Any]:
        if self.half:
            return {"w": ckpt.Shard.empty((512, 512), (0, 0), (256, 512), torch.float32)}
        return {"w": torch.zeros(512, 512), "b": None}

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        self.state = state

    def got(self) -> dict[str, Any]:
        return {k: (v.tensor if isinstance(v, ckpt.Shard) else v) for k, v in self.state.items()}


def test_a_shared_restore_fetches_each_byte_once_per_node(three_nodes: Any, s3_endpoint: str) -> None:
    """4 actors on 2 nodes restoring a replicated state through a counting proxy: the store
    serves each byte once per node (2x the state at most, not 4x), and every actor gets it exact."""
    from ckpt.testing.proxy import LatencyProxy

    bucket = f"ckpt-cluster-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3", endpoint_url=s3_endpoint, skip_instance_cache=True).call_s3("create_bucket", Bucket=bucket)
    g = torch.Generator().manual_seed(8)
    state = {"w": torch.randn(512, 512, generator=g), "b": torch.randn(1000, generator=g)}  # ~1 MiB
    with LatencyProxy(s3_endpoint, latency_ms=0) as proxy:
        root, opts = f"s3://{bucket}/run", {"endpoint_url": proxy.url}
        m = ckpt.save(root, state, step=2, storage_options={**opts, "key": "cluster-test-key", "secret": "cluster-test-secret"},
                      options=ckpt.SaveOptions(block_bytes=64 << 10))  # fmt: skip
        actors = [ReplicaWorker.options(resources={f"node{r % 2}": 1}).remote(r == 3) for r in range(4)]
        assert len(set(ray.get([a.node.remote() for a in actors]))) == 2
        proxy.reset()
        assert ckpt.parallel.ray.restore_shared(root, actors, storage_options=opts, slab_bytes=256 << 10) == 2
        served = proxy.stats()["bytes_out"]
    total = sum(t.nbytes for t in m.tensors.values())
    assert total <= served <= 2 * 1.05 * total + 4 * len(m.to_json()), (served, total)
    for r, got in enumerate(ray.get([a.got.remote() for a in actors])):
        if r == 3:
            assert torch.equal(got["w"], state["w"][:256])
        else:
            assert torch.equal(got["w"], state["w"])
            assert torch.equal(got["b"], state["b"])
