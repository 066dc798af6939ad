"""Crash tests of the CheckpointManager with real processes and real signals.

A child process (forked from a fork server that imported torch and ckpt once) saves
asynchronously every step and is SIGKILLed at a random moment: while staging, writing shard
files, committing, retiring old checkpoints or restoring. After every kill, every committed
checkpoint must restore to the state of exactly one step (never a mix), pass ``ckpt.verify``,
and the newest committed step never goes back. The next trial resumes from it.

A real training run (dropout, AdamW, StepLR, a shuffling loader) killed and resumed several
times must end bit-identical to an uninterrupted run of the same seed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from typing import Any

import pytest
import torch

import ckpt
from tests.conftest import Store
from tests.support import rank_loops
from tests.support.crash_loops import expected, expected_incremental, train
from tests.support.forker import finished, forker, line_count

TRIALS = 50
TRIALS_NEW_BACKENDS = 10  # GCS and Azure (emulators): a shorter set


def _child_env(store: Store) -> tuple[dict[str, str], str]:
    """Credentials go to the children by environment; the options carry no secret."""
    if store.kind == "gcs":  # anonymous against the emulator: nothing secret
        return {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}, json.dumps(store.opts)
    if store.kind == "azure":  # adlfs reads the connection string from the environment
        return {"AZURE_STORAGE_CONNECTION_STRING": store.opts["connection_string"]}, json.dumps(None)
    if store.kind != "s3":
        return {}, json.dumps(store.opts or None)
    env = {"AWS_ACCESS_KEY_ID": store.opts["key"], "AWS_SECRET_ACCESS_KEY": store.opts["secret"]}
    return env, json.dumps({"endpoint_url": store.opts["endpoint_url"], "skip_instance_cache": True})


def _check_every_committed_step(store: Store, expected: Any = expected) -> list[int]:
    opts = {k: v for k, v in store.opts.items() if k != "skip_instance_cache"}  # one client for all checks
    steps = ckpt.list_steps(store.root, storage_options=opts)
    for s in steps:
        back = ckpt.restore(store.root, s, storage_options=opts)
        want = expected(s)
        assert back["meta"] == want["meta"], f"step {s}: {back['meta']}"
        assert torch.equal(back["a"], want["a"]), f"step {s}: tensor a holds another step's values"
        assert torch.equal(back["b"], want["b"]), f"step {s}: tensor b holds another step's values"
        report = ckpt.verify(store.root, s, storage_options=opts)
        assert report.ok, f"step {s}: {report}"
    return steps


@pytest.mark.parametrize(
    "backend",
    ["local", pytest.param("s3", marks=pytest.mark.s3), pytest.param("gcs", marks=pytest.mark.gcs),
     pytest.param("azure", marks=pytest.mark.azure)],
)
def test_sigkill_at_random_moments_of_async_saves(backend: str, request: pytest.FixtureRequest) -> None:
    store: Store = request.getfixturevalue(f"{backend}_store")
    env, opts_json = _child_env(store)
    rnd = random.Random(20261126)
    window = (0.05, 0.8) if backend == "local" else (0.2, 2.5)  # a save on moto takes ~0.5-1 s
    trials = TRIALS if backend in ("local", "s3") else TRIALS_NEW_BACKENDS
    newest: int | None = None
    kills = 0
    with forker(env) as fk:
        for trial in range(trials):
            pid = fk.start("tests.support.crash_loops:saving_loop", store.root, opts_json, trial)
            time.sleep(rnd.uniform(*window))
            os.kill(pid, signal.SIGKILL)
            status = fk.reap(pid)
            assert status == -signal.SIGKILL, f"trial {trial}: the loop exited by itself ({status}) before the kill"
            kills += 1
            steps = _check_every_committed_step(store)
            if newest is not None:
                assert steps, f"trial {trial}: every checkpoint is gone"
                assert steps[-1] >= newest, f"trial {trial}: the newest step went back from {newest} to {steps[-1]}"
            newest = steps[-1] if steps else None
    assert kills == trials
    assert newest is not None
    assert newest >= {"local": 20, "s3": 5}.get(backend, 2)  # saves made progress across the kills


TRIALS_INCREMENTAL = 10  # stress: 30


@pytest.mark.parametrize("trials", [TRIALS_INCREMENTAL, pytest.param(30, marks=pytest.mark.stress)])
def test_sigkill_at_random_moments_of_incremental_saves_and_retention(trials: int, local_store: Store) -> None:
    """Incremental saves (each references the frozen part written once by an older step) with
    retention retiring the older steps as the loop runs, SIGKILLed at random moments: every
    committed step still restores exactly (frozen part included) and passes verify, so no
    retirement ever deleted bytes a committed step references."""
    store = local_store
    rnd = random.Random(20261207)
    newest: int | None = None
    shared = 0
    with forker({}) as fk:
        for trial in range(trials):
            pid = fk.start("tests.support.crash_loops:incremental_saving_loop", store.root, "null", trial)
            time.sleep(rnd.uniform(0.05, 0.8))
            os.kill(pid, signal.SIGKILL)
            assert fk.reap(pid) == -signal.SIGKILL, f"trial {trial}: the loop exited by itself before the kill"
            steps = _check_every_committed_step(store, expected_incremental)
            for s in steps:
                frozen = ckpt.restore(store.root, s, target={"frozen": None})["frozen"]
                want = expected_incremental(s)["frozen"]
                assert all(torch.equal(frozen[k], want[k]) for k in want), f"step {s}: the frozen part changed"
                m = ckpt.read_manifest(store.root, s)
                assert m.format_version == 3
                shared += any(f"{s:012d}-" not in p for p in m.files)  # it references an older step's file
            if newest is not None:
                assert steps, f"trial {trial}: every checkpoint is gone"
                assert steps[-1] >= newest, f"trial {trial}: the newest step went back"
            newest = steps[-1] if steps else None
    assert newest is not None
    assert newest >= 10
    assert shared >= trials // 2  # the steps checked really did share files


TRIALS_FAST_TIER = 10  # stress: 30


@pytest.mark.parametrize("trials", [TRIALS_FAST_TIER, pytest.param(30, marks=pytest.mark.stress)])
def test_sigkill_during_the_drain_of_a_fast_tier(trials: int, tmp_path: Any) -> None:
    """Saves commit to a fast tier and are drained to the durable root in the background; the
    process is SIGKILLed at random moments (often mid-drain). The durable root never shows a
    partial step (every committed step there restores exactly and verifies), the fast tier's do
    too, the manager resumes from the newest of both, and with the fast tier deleted (a lost
    node) from the newest durable step."""
    root, fast = str(tmp_path / "durable"), str(tmp_path / "fast")
    durable_store, fast_store = Store("local", root), Store("local", fast)
    rnd = random.Random(20261208)
    newest: int | None = None
    drained = 0
    with forker({}) as fk:
        for trial in range(trials):
            pid = fk.start("tests.support.crash_loops:tiered_saving_loop", root, fast, trial)
            time.sleep(rnd.uniform(0.05, 0.8))
            os.kill(pid, signal.SIGKILL)
            assert fk.reap(pid) == -signal.SIGKILL, f"trial {trial}: the loop exited by itself before the kill"
            durable = _check_every_committed_step(durable_store)
            in_fast = _check_every_committed_step(fast_store)
            drained += len(durable)
            both = sorted(set(durable) | set(in_fast))
            if newest is not None:
                assert both, f"trial {trial}: every checkpoint is gone"
                assert both[-1] >= newest, f"trial {trial}: the newest step went back"
            newest = both[-1] if both else None
            if newest is not None:
                target = expected(0)
                opts = ckpt.ManagerOptions(fast_tier=fast)
                with ckpt.CheckpointManager(root, opts) as mgr:
                    assert mgr.restore(target) == newest
                assert torch.equal(target["a"], expected(newest)["a"])
    assert newest is not None
    assert newest >= trials // 3  # saves made progress across the kills (6 of 10 seen on a loaded machine)
    assert drained  # the drains ran
    shutil.rmtree(fast)  # a lost node
    target = expected(0)
    with ckpt.CheckpointManager(root, ckpt.ManagerOptions(fast_tier=fast)) as mgr:
        got = mgr.restore(target)
    assert got == ckpt.list_steps(root)[-1]
    assert torch.equal(target["a"], expected(got)["a"])


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_two_ranks_sigkilled_at_random_moments_of_async_saves(
    backend: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    """A 2-rank job (gloo) saving every step asynchronously; one rank, chosen at random, is
    SIGKILLed at a random moment, and the other a random moment later (as torchrun tears down a
    job whose worker died). Every committed checkpoint holds exactly one step's state."""
    store: Store = request.getfixturevalue(f"{backend}_store")
    env, opts_json = _child_env(store)
    rnd = random.Random(20261127)
    window = (0.1, 1.0) if backend == "local" else (0.3, 2.5)
    newest: int | None = None
    stretch = 1.0  # a loaded machine: a trial that committed nothing new gives the next one longer
    with forker(env) as fk:
        for trial in range(TRIALS):
            init = str(tmp_path / f"init-{trial}")
            pids = [fk.start("tests.support.rank_loops:saving_loop", store.root, opts_json, trial, r, 2, init) for r in range(2)]
            time.sleep(rnd.uniform(*window) * stretch)
            first = rnd.randrange(2)
            os.kill(pids[first], signal.SIGKILL)
            time.sleep(rnd.choice([0.0, rnd.uniform(0, 0.3)]))
            if not finished(pids[1 - first]):
                os.kill(pids[1 - first], signal.SIGKILL)
            statuses = [fk.reap(p) for p in pids]
            assert statuses[first] == -signal.SIGKILL, f"trial {trial}: rank {first} exited by itself ({statuses})"
            steps = _check_every_committed_step(store, rank_loops.expected)
            if newest is not None:
                assert steps, f"trial {trial}: every checkpoint is gone"
                assert steps[-1] >= newest, f"trial {trial}: the newest step went back from {newest} to {steps[-1]}"
            progressed = bool(steps) and (newest is None or steps[-1] > newest)
            stretch = 1.0 if progressed else min(8.0, stretch * 2)
            newest = steps[-1] if steps else None
            if steps:
                assert ckpt.read_manifest(store.root, steps[-1], storage_options=store.opts).world_size == 2
    assert newest is not None
    assert newest >= (20 if backend == "local" else 5)  # saves made progress across the kills


def test_killed_and_resumed_training_with_a_fast_tier_is_bit_identical(tmp_path: Any) -> None:
    """The same training run saving to a fast tier drained to the durable root, killed 4 times;
    before the third restart the fast tier is deleted (a lost node), so that run resumes from the
    durable root. Every loss and the final weights equal the uninterrupted run's."""
    seed, total = 7, 40
    ref_losses, ref_params = _reference(seed, total, tmp_path)
    root, fast = str(tmp_path / "durable"), str(tmp_path / "fast")
    log = str(tmp_path / "run.log")
    rnd = random.Random(4)
    with forker({}) as fk:

        def start(kills: int) -> int:
            if kills == 2:
                shutil.rmtree(fast, ignore_errors=True)
            return fk.start("tests.support.crash_loops:train", root, "null", seed, total, log, fast)

        _kill_and_resume(fk, start, log, rnd, (4, 12))
    assert line_count(log) > total, "no run resumed from a checkpoint"
    assert _losses(log) == ref_losses
    final = ckpt.restore(root + "-final")
    for k, v in ref_params.items():
        assert torch.equal(final[k], v), f"parameter {k} differs from the uninterrupted run"
    assert ckpt.list_steps(root)  # the drains ran


def _kill_and_resume(fk: Any, start: Any, log: str, rnd: random.Random, steps: tuple[int, int]) -> None:
    """Start the training run (``start(kills so far)`` gives its pid), SIGKILL it after a random
    number of training steps (``steps``), four times, then let the fifth run finish."""
    kills = 0
    while True:
        seen = line_count(log)
        pid = start(kills)
        goal = seen + rnd.randint(*steps)  # kill after a random number of training steps
        deadline = time.monotonic() + 60
        while line_count(log) < goal and time.monotonic() < deadline and not finished(pid):
            time.sleep(0.002)
        time.sleep(rnd.uniform(0, 0.02))
        if kills < 4 and not finished(pid):
            os.kill(pid, signal.SIGKILL)
            assert fk.reap(pid) == -signal.SIGKILL
            kills += 1
            continue
        assert fk.reap(pid) == 0, "the training run failed (its traceback is on stderr)"
        break
    assert kills == 4


def _reference(seed: int, steps: int, tmp: Any) -> tuple[dict[int, str], dict[str, torch.Tensor]]:
    root, log = str(tmp / "ref"), str(tmp / "ref.log")
    train(root, "null", seed, steps, log)
    return _losses(log), ckpt.restore(root + "-final")


def _losses(log: str) -> dict[int, str]:
    out: dict[int, str] = {}
    with open(log) as f:
        for line in f:
            step, loss = line.split()
            assert out.setdefault(int(step), loss) == loss, f"step {step} computed twice with different losses"
    return out


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_killed_and_resumed_training_is_bit_identical(backend: str, request: pytest.FixtureRequest, tmp_path: Any) -> None:
    seed, total = 7, 40
    ref_losses, ref_params = _reference(seed, total, tmp_path)
    store: Store = request.getfixturevalue(f"{backend}_store")
    env, opts_json = _child_env(store)
    log = str(tmp_path / "run.log")
    rnd = random.Random(3)
    with forker(env) as fk:
        start = lambda kills: fk.start("tests.support.crash_loops:train", store.root, opts_json, seed, total, log)  # noqa: E731
        _kill_and_resume(fk, start, log, rnd, (2, 12))
    assert line_count(log) > total, "no run resumed from a checkpoint"  # steps after one were recomputed
    losses = _losses(log)  # every step's loss, whichever run computed it, equals the reference
    assert losses == ref_losses
    final = ckpt.restore(store.root + "-final", storage_options=store.opts)
    assert final.keys() == ref_params.keys()
    for k, v in ref_params.items():
        assert torch.equal(final[k], v), f"parameter {k} differs from the uninterrupted run"
