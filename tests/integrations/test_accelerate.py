"""Accelerate's save_state / load_state through ckpt: a training process is SIGKILLed mid-run
(real signal, real child process), the next one resumes from the newest committed step, and every
step's loss, Python/NumPy draw and registered counter equal those of a run that never stopped;
local disk and S3 (moto). What lands is an ordinary ckpt checkpoint with no pickle."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

import ckpt
from tests.conftest import Store
from tests.support.forker import Forker, forker

TOTAL = 20


@pytest.fixture(scope="module")
def fk() -> Iterator[Forker]:
    with forker() as f:
        yield f


def _run(fk: Forker, store: Store, log: Path, *, kill_after: int | None = None) -> int:
    pid = fk.start("tests.support.accelerate_loop:train", store.root, json.dumps(store.opts), TOTAL, str(log))
    if kill_after is not None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            lines = log.read_text().splitlines() if log.exists() else []
            if sum(1 for ln in lines if not ln.startswith("start")) >= kill_after:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    return fk.reap(pid)


def _steps(log: Path) -> tuple[list[int], dict[int, str]]:
    starts, rows = [], {}
    for line in log.read_text().splitlines():
        a, rest = line.split(" ", 1)
        if a == "start":
            starts.append(int(rest))
        else:
            rows[int(a)] = rest  # a step computed again replaces the killed run's
    return starts, rows


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_killed_accelerate_run_resumes_identically(
    backend: str, fk: Forker, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    ref_store = Store("local", str(tmp_path / "ref"))
    assert _run(fk, ref_store, tmp_path / "ref.log") == 0
    ref_starts, reference = _steps(tmp_path / "ref.log")
    assert ref_starts == [0]
    assert sorted(reference) == list(range(TOTAL))

    store: Store = request.getfixturevalue(f"{backend}_store")
    log = tmp_path / "run.log"
    assert _run(fk, store, log, kill_after=10) == -signal.SIGKILL
    before = ckpt.list_steps(store.root, storage_options=store.opts)
    assert before  # at least one save committed before the kill
    assert all(s % 3 == 2 for s in before)
    assert _run(fk, store, log) == 0
    starts, rows = _steps(log)
    assert starts == [0, max(before) + 1]  # resumed right after the newest committed step
    for step in range(TOTAL):  # loss, RNG draws and the registered counter: as if never stopped
        assert rows[step] == reference[step], f"step {step}: {rows[step]} != {reference[step]}"

    last = max(ckpt.list_steps(store.root, storage_options=store.opts))
    assert last == 17
    assert ckpt.verify(store.root, last, storage_options=store.opts).ok
    saved = ckpt.restore(store.root, last, storage_options=store.opts)
    assert sorted(saved) == ["accelerator_step", "custom", "dataloaders", "models", "optimizers", "rng", "schedulers"]
    assert saved["custom"]["0"] == {"seen": 18}
    assert saved["schedulers"]["0"]["last_epoch"] == 18
    assert set(saved["rng"]["0"]) == {"python", "numpy", "torch"}
