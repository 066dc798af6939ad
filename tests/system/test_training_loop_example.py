"""examples/training_loop.py: a plain PyTorch loop on the CheckpointManager, sent a real SIGTERM
mid-run, resumed, and compared bit for bit with an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ckpt
from ckpt.manager import PREEMPTED_EXIT_CODE

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "training_loop.py"


def _run(root: Path, *extra: str) -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--root", str(root), "--steps", "20", *extra],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode in (0, PREEMPTED_EXIT_CODE), done.stderr[-3000:]
    return done.returncode, done.stdout.splitlines()


def _losses(lines: list[str]) -> dict[int, str]:
    return {int(ln.split()[1]): ln.split()[3] for ln in lines if ln.startswith("step ")}


def test_preempted_and_resumed_loop_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    code, ref = _run(tmp_path / "ref")
    assert code == 0
    code, first = _run(tmp_path / "run", "--preempt-at", "12")
    assert code == PREEMPTED_EXIT_CODE  # SIGTERM -> the step was saved, exit 75
    assert max(_losses(first)) == 12
    assert ckpt.latest_step(str(tmp_path / "run")) == 12  # saved although 12 is off the every-5 policy
    code, second = _run(tmp_path / "run")
    assert code == 0
    assert "resumed at step 13" in second
    assert {**_losses(first), **_losses(second)} == _losses(ref)  # every loss bit-identical
    assert sorted(_losses(ref)) == list(range(20))


def test_a_finished_run_saves_its_final_step_and_a_rerun_computes_nothing(tmp_path: Path) -> None:
    # 23 steps, saved every 5: the last policy save is step 20; the final step 22 is saved too
    code, first = _run(tmp_path / "run", "--steps", "23")
    assert code == 0
    assert sorted(_losses(first)) == list(range(23))
    assert ckpt.latest_step(str(tmp_path / "run")) == 22
    code, again = _run(tmp_path / "run", "--steps", "23")
    assert code == 0
    assert "resumed at step 23" in again
    assert _losses(again) == {}  # nothing recomputed
