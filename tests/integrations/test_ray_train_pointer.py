"""ckpt.integrations.ray_train without a cluster: the pointer checkpoint's record, and the two
manager hooks the Reporter uses (request_save, committed_step). The Reporter itself runs under a
real TorchTrainer in tests/parallel/test_ray_train.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray.train")

import ray.train

import ckpt
from ckpt.integrations.ray_train import POINTER, Pointer, read_pointer, write_pointer


def test_a_pointer_round_trips_through_a_ray_checkpoint(tmp_path: Path) -> None:
    write_pointer(str(tmp_path), Pointer("s3://bucket/run", 42))
    assert [p.name for p in tmp_path.iterdir()] == [POINTER]  # the data stays in ckpt's root
    assert read_pointer(ray.train.Checkpoint.from_directory(str(tmp_path))) == Pointer("s3://bucket/run", 42)


def test_other_checkpoints_are_ignored_and_a_bad_pointer_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.warns(ckpt.CkptWarning, match="not a ckpt pointer"):
        assert read_pointer(ray.train.Checkpoint.from_directory(str(tmp_path))) is None
    (tmp_path / POINTER).write_text(json.dumps({"format": "ckpt-pointer/1", "root": "r", "step": "7"}))
    with pytest.raises(ckpt.ManifestError, match="is not a ckpt-pointer/1 record"):
        read_pointer(ray.train.Checkpoint.from_directory(str(tmp_path)))


def test_request_save_makes_the_next_save_happen_and_committed_step_follows(tmp_path: Path) -> None:
    mgr = ckpt.CheckpointManager(tmp_path / "run", ckpt.ManagerOptions(save_every=100))
    state = {"w": torch.ones(3)}
    assert mgr.committed_step is None
    assert not mgr.save(7, state)  # not a save step
    mgr.request_save()
    assert mgr.save(8, state)  # saved although 8 % 100 != 0
    assert not mgr.save(9, state)  # once
    mgr.wait()
    assert mgr.committed_step == 8
    assert ckpt.list_steps(tmp_path / "run") == [8]
    mgr.close()
