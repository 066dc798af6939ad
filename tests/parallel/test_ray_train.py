"""Ray Train: the TorchTrainer example (examples/ray_train.py) on a local Ray instance. Two DDP
workers save through the CheckpointManager and report each commit to Ray as a pointer checkpoint
(ckpt.integrations.ray_train); one worker is SIGKILLed mid-run; Ray Train restarts the group and
the workers resume from the step ``ray.train.get_checkpoint()`` names, bit-identically. The
``Result.checkpoint`` names the last committed step, ``CheckpointConfig(num_to_keep=1)`` leaves
ckpt's steps alone, and a second ``fit()`` with ``resume_from_checkpoint`` goes on from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import ckpt

pytestmark = [pytest.mark.ray, pytest.mark.slow]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ray_train.py"


def test_ray_train_workers_resume_after_a_worker_is_killed(tmp_path: Path) -> None:
    root, logs = tmp_path / "ckpt", tmp_path / "logs"
    logs.mkdir()
    steps, kill_at, then = 20, 9, 24  # saves every 5 steps; keep_last=3
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--root", str(root), "--log-dir", str(logs), "--steps", str(steps),
         "--kill-at", str(kill_at), "--save-every", "5", "--then-steps", str(then)],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-2])
    assert result["killed"], "the worker was never killed"
    starts = result["starts"]
    assert len(starts) == 2, f"expected one restart, got starts {starts}"
    assert starts[0] == 0
    assert 0 < starts[1] <= kill_at, f"the restarted workers did not resume from a checkpoint: {starts}"
    assert result["recomputed"] == kill_at - starts[1]  # the steps after the checkpoint, again
    assert result["mismatches"] == [], "a recomputed step gave another loss: the resume was not exact"
    # Ray's side: the run's Result.checkpoint is a pointer to the last committed step, and Ray
    # keeping one pointer (num_to_keep=1) deleted none of ckpt's steps (keep_last=3 did)
    assert result["reported_step"] == steps - 1
    assert result["steps_after_first"] == [steps - 10, steps - 5, steps - 1]  # keep_last=3, the last step forced
    # what Ray keeps is a few small pointer files (num_to_keep=1 deleted the superseded ones of
    # the second attempt; the one the restart resumed from stays), never ckpt's data
    pointers = [json.loads(p.read_text()) for p in (logs / "ray-results").rglob("ckpt-pointer.json")]
    assert pointers
    assert {p["root"] for p in pointers} == {str(root)}
    assert max(p["step"] for p in pointers) == then - 1
    # a second fit() resumed from that Result.checkpoint: it started right after step 29
    assert result["second"]["starts"] == [steps]
    assert result["second"]["reported_step"] == then - 1
    # killed, restarted, fit() again: every step's loss equals that of one
    # uninterrupted fit() of the same training
    assert result["second"]["differs_from_uninterrupted"] == []
    assert ckpt.list_steps(str(root)) == [steps - 1, steps, then - 1]
    m = ckpt.read_manifest(str(root), steps - 1)
    assert m.world_size == 2
    final = ckpt.restore(str(root), steps - 1)
    assert sorted(final["rng"]) == ["0", "1"]  # each rank's own RNG state under its rank
    assert final["step"] == steps - 1
    assert final["loader"]["pos"] > 0
    assert ckpt.verify(str(root), steps - 1).ok
