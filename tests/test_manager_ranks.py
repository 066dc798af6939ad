"""The CheckpointManager across ranks: two real processes over gloo (forked from a fork server
that imported torch and ckpt once), each with its own shard of a state and a replicated tensor."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.manager import PREEMPTED_EXIT_CODE
from tests.support.forker import forker
from tests.support.rank_loops import expected

WORLD = 2


def _run(name: str, root: str, tmp_path: Path) -> tuple[list[int], list[dict[str, Any]]]:
    """Run scenario ``name`` on 2 ranks; return their exit statuses and what each saw."""
    init = str(tmp_path / f"init-{uuid.uuid4().hex}")
    outs = [str(tmp_path / f"{name}-{r}.json") for r in range(WORLD)]
    with forker() as fk:
        pids = [fk.start("tests.support.rank_loops:scenario", name, root, r, WORLD, init, outs[r]) for r in range(WORLD)]
        statuses = [fk.reap(p) for p in pids]
    seen = []
    for o in outs:
        with open(o) as f:
            seen.append(json.load(f))
    return statuses, seen


def test_two_ranks_save_async_keep_the_last_two_and_resume(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    statuses, seen = _run("train", root, tmp_path)
    assert statuses == [0, 0], "a rank failed (its traceback is on stderr)"
    assert [s["world"] for s in seen] == [2, 2]
    assert [s["started"] for s in seen] == [None, None]
    assert ckpt.list_steps(root) == [6, 8]  # saves every 2 steps, the last 2 kept (by rank 0)
    assert [s["resumed"] for s in seen] == [8, 8]
    for s in seen:  # each rank got its own shard of step 8 back, not the values changed after
        assert s["restored_a"] == [8.0]
        assert s["restored_b"] == [24]
        assert s["restored_meta"] == {"step": 8}
    m = ckpt.read_manifest(root, 8)
    assert m.world_size == 2
    for step in (6, 8):
        back = ckpt.restore(root, step)
        want = expected(step)
        assert torch.equal(back["a"], want["a"]), f"step {step}"
        assert torch.equal(back["b"], want["b"]), f"step {step}"
        assert ckpt.verify(root, step).ok


def test_stop_asked_of_one_rank_saves_the_same_step_on_every_rank_and_exits(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    statuses, seen = _run("stop", root, tmp_path)
    assert statuses == [PREEMPTED_EXIT_CODE, PREEMPTED_EXIT_CODE]
    assert [s["last_step"] for s in seen] == [5, 5]
    assert all("not_stopped" not in s for s in seen)
    assert ckpt.list_steps(root) == [0, 4, 5]  # the final save of step 5 was off the every-4 policy
    assert torch.equal(ckpt.restore(root, 5)["a"], expected(5)["a"])


def test_a_failed_rank_fails_the_background_save_on_every_rank(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    statuses, seen = _run("fail", root, tmp_path)
    assert statuses == [0, 0]
    for s in seen:
        assert s["raised"] is not None, f"rank {s['rank']}: the failed background save was not raised"
        assert "rank 1" in s["raised"], s["raised"]
        assert "No space left" in s["raised"], s["raised"]
    assert seen[0]["steps"] == []  # nothing committed


def test_distributed_true_without_a_process_group_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ckpt.PlanError, match=r"initialized torch\.distributed"):
        ckpt.CheckpointManager(str(tmp_path), ckpt.ManagerOptions(distributed=True))


def test_one_process_needs_no_process_group(tmp_path: Path) -> None:
    mgr = ckpt.CheckpointManager(str(tmp_path))
    assert (mgr.rank, mgr.world_size) == (0, 1)
    mgr.close()
    assert os.listdir(tmp_path) == []


def test_a_step_damaged_on_one_rank_only_is_skipped_by_every_rank(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    statuses, seen = _run("fallback", root, tmp_path)
    assert statuses == [0, 0], "a rank failed (its traceback is on stderr)"
    assert [s["resumed"] for s in seen] == [6, 6]  # rank 0's own data of step 8 is intact
    for s in seen:
        assert s["meta"] == {"step": 6}
        assert s["a"] == [6.0]
        assert s["saved8"] is False
        assert s["saved10"] is True
        assert any("skipping damaged step 8" in w for w in s["warnings"]), s["warnings"]
    assert ckpt.list_steps(root) == [6, 8, 10]  # keep_last=3 (rank 0); the damaged 8 not saved over
    assert torch.equal(ckpt.restore(root, 10)["a"], torch.full((512, 256), 10.0))


def test_ranks_resume_with_each_byte_read_once_for_the_job(tmp_path: Path) -> None:
    """ManagerOptions.shared_restore (the default): the replicated 4 MiB is fetched once for the
    job and handed over gloo; without it every rank reads all of it."""
    root = str(tmp_path / "run")
    statuses, seen = _run("shared_resume", root, tmp_path)
    assert statuses == [0, 0], "a rank failed (its traceback is on stderr)"
    replicated = 4 << 20
    for s in seen:
        assert s["resumed_True"] == 4
        assert s["resumed_False"] == 4
        assert s["exact_True"]
        assert s["exact_False"]
        assert s["read_False"] >= replicated  # every rank its own copy
    # once for the job (its one 4 MiB range is one segment: one rank fetches it), plus the rows
    assert sum(s["read_True"] for s in seen) < 1.3 * replicated, [s["read_True"] for s in seen]
