"""The driver pattern and the SPMD coordinator on a real local Ray instance."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import ckpt
import ckpt.parallel.ray
from ckpt.engine.owners import chunk

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

GLOBAL = (96, 24)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ["PYTHONPATH"] = os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=150 << 20, log_to_driver=False)
    yield
    ray.shutdown()


def full_weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(GLOBAL, generator=torch.Generator().manual_seed(seed))


@ray.remote(num_cpus=0.5)
class Worker:
    """Holds rows of a weight (a tensor-parallel shard), a replicated bias and per-rank data."""

    def __init__(self, rank: int, world: int, fail: str = "") -> None:
        self.rank, self.world, self.fail = rank, world, fail
        off, n = chunk(GLOBAL[0], world, rank)
        self.offset = off
        self.weight = full_weight().narrow(0, off, n).clone()
        self.bias = torch.arange(GLOBAL[1], dtype=torch.float32)
        self.step = 0
        self.asked = 0  # checkpoint_state() calls

    def checkpoint_state(self) -> dict[str, Any]:
        self.asked += 1
        if self.fail == "raise":
            raise RuntimeError(f"worker {self.rank} cannot produce its state")
        if self.fail == "hang":
            time.sleep(3600)
        return {
            "weight": ckpt.Shard(self.weight, GLOBAL, (self.offset, 0)),
            "bias": ckpt.Shard(self.bias, (GLOBAL[1],), (0,), replica_ranks=tuple(range(self.world))),
            f"rank{self.rank}": {"seen": self.rank * 10},
            "emb": torch.ones(100, 4),  # plain and identical on every actor: deduped by "auto"
            "step": self.step,
        }

    def checkpoint_target(self) -> dict[str, Any]:
        return {
            "weight": ckpt.Shard(torch.empty_like(self.weight), GLOBAL, (self.offset, 0)),
            "bias": None,
            "step": None,
        }

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        self.weight = state["weight"].tensor
        self.bias = state["bias"]
        self.step = state["step"]

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        return self.weight, self.bias, self.offset, self.step

    def times_asked(self) -> int:
        return self.asked


def test_driver_saves_from_4_actors_and_restores_onto_3(ray_local: None, tmp_path: Any) -> None:
    root = str(tmp_path / "run")
    writers = [Worker.remote(r, 4) for r in range(4)]
    m = ckpt.parallel.ray.save(root, writers, step=10)
    assert m.world_size == 4
    assert len(m.tensors["weight"].shards) == 4
    assert len(m.tensors["bias"].shards) == 1  # the replica is written once
    assert len(m.tensors["emb"].shards) == 1  # found by the describe exchange
    assert sorted(k for k in m.objects if k.startswith("rank")) == ["rank0", "rank1", "rank2", "rank3"]
    readers = [Worker.remote(r, 3) for r in range(3)]
    assert ckpt.parallel.ray.restore(root, readers) == 10
    full = full_weight()
    for w, b, off, _ in ray.get([a.snapshot.remote() for a in readers]):
        assert torch.equal(w, full[off : off + w.shape[0]])
        assert torch.equal(b, torch.arange(GLOBAL[1], dtype=torch.float32))


def test_incremental_saves_from_actors_reference_what_did_not_change(ray_local: None, tmp_path: Any) -> None:
    """Each actor reads the base manifest and references its own unchanged regions: a second
    save of the same states writes nothing but the changed step counters' objects."""
    from ckpt.format import layout

    root = str(tmp_path / "run")
    opts = ckpt.SaveOptions(incremental=True, fsync=False)
    writers = [Worker.remote(r, 4) for r in range(4)]
    m1 = ckpt.parallel.ray.save(root, writers, step=10, options=opts)
    m2 = ckpt.parallel.ray.save(root, writers, step=11, options=opts)
    assert m2.format_version == 3
    own = layout.data_dir(11, m2.attempt) + "/"
    assert not [p for p in m2.files if p.startswith(own)]  # every region unchanged: nothing written
    assert set(m2.files) == set(m1.files)
    readers = [Worker.remote(r, 3) for r in range(3)]
    assert ckpt.parallel.ray.restore(root, readers, step=11) == 11
    full = full_weight()
    for w, _, off, _ in ray.get([a.snapshot.remote() for a in readers]):
        assert torch.equal(w, full[off : off + w.shape[0]])


def test_driver_asks_each_actor_for_its_state_once_per_save(ray_local: None, tmp_path: Any) -> None:
    """The describe exchange ("auto") and the write use one state, taken once."""
    writers = [Worker.remote(r, 2) for r in range(2)]
    ckpt.parallel.ray.save(str(tmp_path / "run"), writers, step=1)
    assert ray.get([w.times_asked.remote() for w in writers]) == [1, 1]
    ckpt.parallel.ray.save(str(tmp_path / "run"), writers, step=2, plain_tensors="replicated")
    assert ray.get([w.times_asked.remote() for w in writers]) == [2, 2]


def test_failing_actor_fails_the_save_naming_its_rank(ray_local: None, tmp_path: Any) -> None:
    root = str(tmp_path / "run")
    writers = [Worker.remote(r, 3, "raise" if r == 2 else "") for r in range(3)]
    with pytest.raises(ckpt.WorkerFailedError, match="rank 2") as info:
        ckpt.parallel.ray.save(root, writers, step=1)
    assert list(info.value.failures) == [2]
    assert ckpt.list_steps(root) == []
    ckpt.parallel.ray.save(root, [Worker.remote(r, 3) for r in range(3)], step=1)  # the step is still free
    assert ckpt.list_steps(root) == [1]


def test_killed_actor_fails_the_save_within_bounded_time(ray_local: None, tmp_path: Any) -> None:
    root = str(tmp_path / "run")
    writers = [Worker.remote(r, 2, "hang" if r == 1 else "") for r in range(2)]
    ray.get([w.snapshot.remote() for w in writers])
    t0 = time.monotonic()
    with pytest.raises(ckpt.WorkerFailedError, match="rank 1"):
        ckpt.parallel.ray.save(root, writers, step=1, timeout_s=5)
    assert time.monotonic() - t0 < 30
    ray.kill(writers[1])
    with pytest.raises(ckpt.WorkerFailedError, match="rank 1") as info:
        ckpt.parallel.ray.save(root, writers, step=2, timeout_s=60)
    assert "Actor" in info.value.failures[1] or "actor" in info.value.failures[1]
    assert ckpt.list_steps(root) == []


def test_credentials_are_not_sent_to_workers(ray_local: None, tmp_path: Any) -> None:
    with pytest.raises(ckpt.PlanError, match="look like credentials"):
        ckpt.parallel.ray.save(str(tmp_path), [], step=1, storage_options={"key": "AKIA", "secret": "x"})


@ray.remote(num_cpus=0.5)
def _spmd_rank(root: str, rank: int, world: int, fail: bool) -> int:
    state = {"w": ckpt.Shard(full_weight().narrow(0, *chunk(GLOBAL[0], world, rank)).clone(), GLOBAL,
                             (chunk(GLOBAL[0], world, rank)[0], 0))}  # fmt: skip
    if fail:
        state["bad"] = lambda: None  # type: ignore[assignment]
    return ckpt.parallel.ray.spmd_save(root, state, step=3, rank=rank, world_size=world, timeout_s=60)


def test_spmd_coordinator_commits_once_all_ranks_report(ray_local: None, tmp_path: Any) -> None:
    root = str(tmp_path / f"spmd-{uuid.uuid4().hex[:6]}")
    assert ray.get([_spmd_rank.remote(root, r, 3, False) for r in range(3)]) == [3, 3, 3]
    assert torch.equal(ckpt.restore(root)["w"], full_weight())


def test_spmd_coordinator_one_rank_fails_all_ranks_error(ray_local: None, tmp_path: Any) -> None:
    root = str(tmp_path / f"spmd-{uuid.uuid4().hex[:6]}")
    refs = [_spmd_rank.remote(root, r, 3, r == 1) for r in range(3)]
    for ref in refs:
        with pytest.raises(ray.exceptions.RayTaskError, match="rank 1"):
            ray.get(ref, timeout=120)
    assert ckpt.list_steps(root) == []


def _train_loop(config: dict[str, Any]) -> None:
    import ray.train

    import ckpt.parallel.torchrun

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    off, n = chunk(GLOBAL[0], world, rank)
    state = {
        "w": ckpt.Shard(full_weight().narrow(0, off, n).clone(), GLOBAL, (off, 0)),
        "bias": torch.arange(GLOBAL[1], dtype=torch.float32),
        f"rank{rank}": rank,
    }
    ckpt.parallel.torchrun.save(config["root"], state, step=1, plain_tensors="replicated", timeout_s=120)
    # and through the named coordinator actor, with no process group involved
    ckpt.parallel.ray.spmd_save(config["root"], state, step=2, rank=rank, world_size=world,
                           plain_tensors="replicated", timeout_s=120)  # fmt: skip


def test_ray_train_torch_trainer_workers_save(ray_local: None, tmp_path: Any) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    root = str(tmp_path / "train")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"root": root},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(storage_path=str(tmp_path / "ray_results"), name="ckpt-test"),
    )
    trainer.fit()
    assert ckpt.list_steps(root) == [1, 2]
    for step in (1, 2):
        m = ckpt.read_manifest(root, step)
        assert len(m.tensors["bias"].shards) == 1  # replicated plain tensor written once
        back = ckpt.restore(root, step)
        assert torch.equal(back["w"], full_weight())
        assert (back["rank0"], back["rank1"]) == (0, 1)
