"""Ray Train: the TorchTrainer example (examples/ray_train.py) on a local Ray instance. Two DDP
workers save through the CheckpointManager; one worker is SIGKILLed mid-run; Ray Train restarts
the group and the workers resume from the newest committed checkpoint."""

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
    steps, kill_at = 30, 12
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--root", str(root), "--log-dir", str(logs), "--steps", str(steps),
         "--kill-at", str(kill_at), "--save-every", "5"],
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
    assert result["steps"] == steps
    assert ckpt.list_steps(str(root)) == [20, 25, steps - 1]  # keep_last=3, the last step forced
    m = ckpt.read_manifest(str(root), steps - 1)
    assert m.world_size == 2
    final = ckpt.restore(str(root), steps - 1)
    assert sorted(final["rng"]) == ["0", "1"]  # each rank's own RNG state under its rank
    assert final["step"] == steps - 1
    assert final["loader"]["pos"] > 0
    assert ckpt.verify(str(root), steps - 1).ok
