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
