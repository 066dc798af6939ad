"""examples/lightning_fsdp2.py: Lightning launches 2 CPU processes with CkptModelParallelStrategy
(FSDP2), ModelCheckpoint saves last.ckpt through ckpt every epoch, and a second run resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ckpt

pytest.importorskip("lightning")
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "lightning_fsdp2.py"


def _run(root: Path, epochs: int) -> list[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(EXAMPLE), "--root", str(root), "--epochs", str(epochs)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=root.parent)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def _digests(lines: list[str]) -> tuple[str, str]:
    trained = next(ln.split()[-1] for ln in lines if ln.startswith("trained parameters sha256"))
    stored = next(ln.split()[-1] for ln in lines if ln.startswith("last.ckpt parameters sha256"))
    return trained, stored


def test_lightning_example_saves_through_ckpt_and_resumes(tmp_path: Path) -> None:
    root = tmp_path / "run"
    first = _run(root, 2)
    assert "started fresh" in first
    assert "last.ckpt: step 1, epoch 1, global_step 16, 17 tensors written by 2 ranks" in first, first
    assert "ckpt verify last.ckpt: ok" in first
    trained, stored = _digests(first)
    assert trained == stored  # last.ckpt holds what the ranks ended with

    second = _run(root, 3)
    assert f"resumed from {root}/last.ckpt" in second, second
    assert "last.ckpt: step 2, epoch 2, global_step 24, 17 tensors written by 2 ranks" in second, second
    trained2, stored2 = _digests(second)
    assert trained2 == stored2 != stored
    assert ckpt.list_steps(str(root / "last.ckpt")) == [2]  # the older steps of the rewritten path retired
    assert ckpt.verify(str(root / "last.ckpt")).ok
