"""CheckpointManager in one process: every-N saves, async staging, errors of background saves,
retention with real deletion, resume. Real backends (local disk, memory, moto S3)."""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

import numpy as np
import pytest
import torch

import ckpt
from ckpt.testing import Recorder, Rule
from tests.conftest import Store, make_state


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return bool(a == b) or (a != a and b != b)


def _zeros_like(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return type(state)((k, _zeros_like(v)) for k, v in state.items())
    if isinstance(state, list):
        return [_zeros_like(v) for v in state]
    return None if not isinstance(state, tuple) else state


@pytest.mark.parametrize("async_save", [True, False])
def test_saves_every_n_and_resumes_from_the_newest(store: Store, async_save: bool) -> None:
    opts = ckpt.ManagerOptions(save_every=3, async_save=async_save, retention=ckpt.RetentionPolicy(keep_last=None))
    state = make_state()
    with ckpt.CheckpointManager(store.root, opts, storage_options=store.opts) as mgr:
        assert mgr.restore(_zeros_like(state)) is None  # nothing yet
        made = [s for s in range(8) if mgr.save(s, {**state, "step": s})]
    assert made == [0, 3, 6]
    assert ckpt.list_steps(store.root, storage_options=store.opts) == [0, 3, 6]
    target = _zeros_like(state)
    mgr2 = ckpt.CheckpointManager(store.root, opts, storage_options=store.opts)
    assert mgr2.latest_step() == 6
    assert mgr2.restore(target) == 6
    assert _equal(target, {**state, "step": 6})  # tensors in place, values (rng, step...) assigned
    mgr2.close()


def test_async_save_is_a_snapshot_of_the_moment_save_returned(tmp_path: Any) -> None:
    root = str(tmp_path / "run")
    state = {"w": torch.arange(1 << 16, dtype=torch.float32), "b": torch.ones(7), "meta": {"epoch": 1}}
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, state)
        state["w"].add_(1.0)  # the training loop goes on at once
        state["b"].zero_()
        state["meta"]["epoch"] = 2
    back = ckpt.restore(root, 0)
    assert torch.equal(back["w"], torch.arange(1 << 16, dtype=torch.float32))
    assert torch.equal(back["b"], torch.ones(7))
    assert back["meta"] == {"epoch": 1}


def test_staging_buffers_are_allocated_once(tmp_path: Any) -> None:
    state = make_state()
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(state))
    with ckpt.CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.save(0, state)
        first = mgr._staging.last
        mgr.save(1, state)
        second = mgr._staging.last
        assert mgr.staging_bytes == nbytes
    assert first is not None
    assert second is not None
    assert first.buffers_allocated == len(_tensors(state))
    assert first.bytes_copied == nbytes
    assert second.buffers_allocated == 0
    assert second.bytes_copied == nbytes


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, np.ndarray):  # saved as tensors too (the numpy RNG state)
        return [torch.from_numpy(x)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, list | tuple):
        return [t for v in x for t in _tensors(v)]
    return []


def test_a_background_failure_is_raised_by_the_next_call(tmp_path: Any) -> None:
    root = str(tmp_path / "run")
    ckpt.save(root, {"x": torch.ones(2)}, step=5)  # another writer committed step 5
    mgr = ckpt.CheckpointManager(root)
    assert mgr.save(5, {"x": torch.zeros(2)}) is True  # started: the failure is in the background
    with pytest.raises(ckpt.CheckpointExistsError, match="step 5") as info:
        mgr.save(6, {"x": torch.zeros(2)})
    assert any("background save" in n for n in getattr(info.value, "__notes__", []))
    assert ckpt.list_steps(root) == [5]  # and step 6 was not started behind the error
    mgr.save(6, {"x": torch.zeros(2)})  # the error was reported once; the manager goes on
    mgr.close()
    assert ckpt.list_steps(root) == [5, 6]
    assert torch.equal(ckpt.restore(root, 5)["x"], torch.ones(2))  # nothing committed was touched


def test_close_raises_the_error_of_the_last_save(tmp_path: Any) -> None:
    root = str(tmp_path / "run")
    ckpt.save(root, {"x": torch.ones(2)}, step=1)
    mgr = ckpt.CheckpointManager(root)
    mgr.save(1, {"x": torch.zeros(2)})
    with pytest.raises(ckpt.CheckpointExistsError):
        mgr.close()
    with pytest.raises(ckpt.PlanError, match="closed"):
        mgr.save(2, {"x": torch.zeros(2)})


def test_when_busy_skip_skips_while_a_save_is_in_flight() -> None:
    gate = threading.Event()
    rec = Recorder(rules=[Rule("*", path_contains="manifest.json", gate=gate, times=1)])
    root = f"faulty://mgr-{uuid.uuid4().hex[:8]}/run"
    opts = ckpt.ManagerOptions(when_busy="skip")
    mgr = ckpt.CheckpointManager(root, opts, storage_options={"target_protocol": "memory", "recorder": rec})
    try:
        assert mgr.save(0, {"x": torch.ones(3)}) is True
        assert mgr.save(1, {"x": torch.ones(3)}) is False  # step 0 is held at its commit
        assert mgr.skipped == 1
    finally:
        gate.set()
        mgr.close()
    assert ckpt.list_steps(root, storage_options={"target_protocol": "memory", "recorder": rec}) == [0]


def test_retention_retires_manifests_and_their_data(tmp_path: Any) -> None:
    root = str(tmp_path / "run")
    opts = ckpt.ManagerOptions(retention=ckpt.RetentionPolicy(keep_last=2, keep_every=4))
    with ckpt.CheckpointManager(root, opts) as mgr:
        for s in range(7):
            mgr.save(s, {"w": torch.full((4,), float(s))})
    assert ckpt.list_steps(root) == [0, 4, 5, 6]
    data = sorted(os.listdir(os.path.join(root, "data")))
    assert [d.split("-")[0] for d in data] == [f"{s:012d}" for s in (0, 4, 5, 6)]  # retired data is gone
    assert sorted(os.listdir(os.path.join(root, "steps"))) == [f"{s:012d}" for s in (0, 4, 5, 6)]
    for s in (0, 4, 5, 6):
        assert torch.equal(ckpt.restore(root, s)["w"], torch.full((4,), float(s)))
        assert ckpt.verify(root, s).ok


def test_keep_best_by_a_metric_recorded_with_the_save(store: Store) -> None:
    policy = ckpt.RetentionPolicy(keep_last=1, keep_best=2, metric="loss")
    losses = [0.9, 0.2, 0.5, 0.1, 0.7, 0.8]
    with ckpt.CheckpointManager(store.root, ckpt.ManagerOptions(retention=policy), storage_options=store.opts) as mgr:
        for s, loss in enumerate(losses):
            mgr.save(s, {"w": torch.full((2,), loss)}, metrics={"loss": loss})
    assert ckpt.list_steps(store.root, storage_options=store.opts) == [1, 3, 5]
    m = ckpt.read_manifest(store.root, 3, storage_options=store.opts)
    assert float(dict(m.user_metadata)["ckpt.metric.loss"]) == 0.1


_LOOP = """
import sys, time, torch, ckpt
root = sys.argv[1]
mgr = ckpt.CheckpointManager(root, ckpt.ManagerOptions(save_every=1000))
mgr.install_signal_handlers()
state = {"w": torch.zeros(1000), "step": -1}
resumed = mgr.restore(state)
print("resumed", resumed, state["step"], flush=True)
for step in range(state["step"] + 1, 10**9):
    state["w"].fill_(float(step))
    state["step"] = step
    print("step", step, flush=True)
    time.sleep(0.005)
    mgr.save(step, state)
"""


def _run_until_sigterm(root: str, tmp_path: Any, after_steps: int) -> tuple[int, list[str]]:
    import signal
    import subprocess
    import sys

    script = tmp_path / "loop.py"
    script.write_text(_LOOP)
    proc = subprocess.Popen([sys.executable, str(script), root], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        lines = [proc.stdout.readline().strip()]
        seen = 0
        while seen < after_steps:
            line = proc.stdout.readline().strip()
            assert line, "the loop died"
            lines.append(line)
            seen += line.startswith("step")
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    return proc.returncode, lines + rest.splitlines()


def test_sigterm_saves_at_the_next_step_boundary_and_exits_75(tmp_path: Any) -> None:
    from ckpt.manager import PREEMPTED_EXIT_CODE

    root = str(tmp_path / "run")
    code, lines = _run_until_sigterm(root, tmp_path, after_steps=20)
    assert code == PREEMPTED_EXIT_CODE == 75
    assert lines[0] == "resumed None -1"
    last = max(int(line.split()[1]) for line in lines if line.startswith("step "))
    assert ckpt.list_steps(root) == [0, last]  # the periodic save of step 0, then the final one
    back = ckpt.restore(root)
    assert back["step"] == last
    assert torch.equal(back["w"], torch.full((1000,), float(last)))
    code, lines = _run_until_sigterm(root, tmp_path, after_steps=5)  # resume, preempted again
    assert code == 75
    assert lines[0] == f"resumed {last} {last}"
    assert lines[1] == f"step {last + 1}"
    assert ckpt.latest_step(root) > last + 4


def test_async_saves_bound_upload_buffers_to_an_eighth_of_the_state(tmp_path: Any) -> None:
    MiB = 1 << 20
    mgr = ckpt.CheckpointManager(str(tmp_path))
    assert mgr._async_save_options(1024 * MiB).max_inflight_bytes == 128 * MiB
    assert mgr._async_save_options(256 * MiB).max_inflight_bytes == 32 * MiB
    assert mgr._async_save_options(1 * MiB).max_inflight_bytes == 32 * MiB  # two 16 MiB parts at least
    assert mgr._async_save_options(1 << 40).max_inflight_bytes == 256 * MiB  # the SaveOptions cap
    mgr.close()
