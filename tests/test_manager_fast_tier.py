"""The manager's fast tier (ManagerOptions(fast_tier=...)): saves commit to a root in node memory
or on local disk and are drained, in the background, to the durable root with ckpt.copy; restore
takes the newest intact step of either tier."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt


def state_at(step: int) -> dict[str, Any]:
    return {"w": torch.full((256, 256), float(step)), "meta": {"step": step}}


def test_saves_commit_to_the_fast_tier_and_are_drained_to_the_root(tmp_path: Path) -> None:
    root, fast = str(tmp_path / "durable"), str(tmp_path / "fast")
    opts = ckpt.ManagerOptions(fast_tier=fast, drain_every=2, fast_retention=ckpt.RetentionPolicy(keep_last=2),
                               retention=ckpt.RetentionPolicy(keep_last=None))  # fmt: skip
    with ckpt.CheckpointManager(root, opts) as mgr:
        for s in range(6):
            mgr.save(s, state_at(s))
        assert mgr.wait_durable() == 4
        assert mgr.durable_step == 4
    assert ckpt.list_steps(fast) == [4, 5]  # its last 2
    assert ckpt.list_steps(root) == [0, 2, 4]  # every other step, drained
    for s in (0, 2, 4):
        assert ckpt.verify(root, s).ok
        assert ckpt.read_manifest(root, s).to_json() == ckpt.read_manifest(fast, 4).to_json() or s != 4
    target = state_at(-1)
    with ckpt.CheckpointManager(root, opts) as mgr:
        assert mgr.latest_step() == 5
        assert mgr.restore(target) == 5  # the fast tier is newer
        assert torch.equal(target["w"], state_at(5)["w"])
        assert mgr.restore(target, step=2) == 2  # only in the durable tier
        assert target["meta"] == {"step": 2}
    shutil.rmtree(fast)  # a lost node: its memory is gone
    with ckpt.CheckpointManager(root, opts) as mgr:
        assert mgr.restore(target) == 4
        assert torch.equal(target["w"], state_at(4)["w"])


def test_a_damaged_fast_step_falls_back_to_the_durable_tier(tmp_path: Path) -> None:
    root, fast = str(tmp_path / "durable"), str(tmp_path / "fast")
    opts = ckpt.ManagerOptions(fast_tier=fast)
    with ckpt.CheckpointManager(root, opts) as mgr:
        for s in range(3):
            mgr.save(s, state_at(s))
    m = ckpt.read_manifest(fast, 2)
    victim = Path(fast, next(iter(m.files)))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    target = state_at(-1)
    with ckpt.CheckpointManager(root, opts) as mgr, pytest.warns(ckpt.CkptWarning) as rec:
        assert mgr.restore(target) == 2  # step 2 was drained intact: the durable copy is used
    said = [str(w.message) for w in rec]
    assert any("skipping damaged step 2" in m for m in said)
    assert any("no intact step in the fast tier" in m for m in said)
    assert torch.equal(target["w"], state_at(2)["w"])


def test_a_failed_drain_is_raised_not_dropped(tmp_path: Path) -> None:
    root, fast = tmp_path / "durable", str(tmp_path / "fast")
    root.write_text("not a directory")  # the durable root cannot be written
    mgr = ckpt.CheckpointManager(str(root), ckpt.ManagerOptions(fast_tier=fast, async_save=False))
    mgr.save(0, state_at(0))
    with pytest.raises(ckpt.CkptError) as info:
        mgr.wait_durable()
    assert any("drain" in n for n in getattr(info.value, "__notes__", []))
    assert ckpt.list_steps(fast) == [0]  # committed in the fast tier all the same
    mgr.close()


def test_a_stop_drains_its_step_whatever_drain_every_says(tmp_path: Path) -> None:
    """A preempted job's last save must reach the durable root: its node may be gone next."""
    root, fast = str(tmp_path / "durable"), str(tmp_path / "fast")
    opts = ckpt.ManagerOptions(fast_tier=fast, drain_every=10, exit_on_stop=False)
    with ckpt.CheckpointManager(root, opts) as mgr:
        mgr.save(0, state_at(0))
        mgr.save(1, state_at(1))
        mgr.request_stop()
        assert mgr.save(3, state_at(3))
        assert mgr.durable_step == 3  # drained before save() returned
    assert ckpt.list_steps(root) == [0, 3]
    assert ckpt.list_steps(fast)[-1] == 3


def test_the_fast_tier_option_is_checked() -> None:
    with pytest.raises(ValueError, match="drain_every"):
        ckpt.ManagerOptions(drain_every=0)
