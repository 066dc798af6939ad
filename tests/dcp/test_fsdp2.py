"""FSDP2 (``fully_shard``) through ckpt.dcp, end to end: 2 real gloo ranks train a small MLP
with AdamW, save its ``get_state_dict`` with ``dcp.save`` or ``dcp.async_save`` through
``ckpt.dcp.StorageWriter`` (local disk and S3 on moto), and fresh models load it with
``dcp.load`` + ``set_state_dict``: on 2 ranks training continues bit-identical to a run that
never stopped; on 1 and 3 ranks (resharded) every parameter and optimizer-state value equals the
saved one exactly. The ranks are forked from the fork server (tests/support/forker.py) and run
tests/support/fsdp2_ranks.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ckpt
from tests.conftest import Store
from tests.support.forker import Forker, finished, forker, line_count, run_ranks

SAVE_AT, MORE = 4, 3  # the save after 4 steps, 3 more after it


@pytest.fixture(scope="module")
def fk() -> Iterator[Forker]:
    with forker() as f:
        yield f


def run(fk: Forker, name: str, args: dict[str, Any], world: int, tmp: Path) -> tuple[list[dict[str, Any]], str]:
    """Run scenario ``name`` of fsdp2_ranks on ``world`` forked ranks; what each rank saw, and
    the path prefix of rank 0's value files."""
    seen, outs = run_ranks(fk, "tests.support.fsdp2_ranks:scenario",
                           lambda r, init, out: [name, json.dumps(args), r, world, init, out], world, str(tmp), name)  # fmt: skip
    return seen, outs[0]


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for k, v in want.items():
        assert got[k].dtype == v.dtype, f"{what}: {k} is {got[k].dtype}, not {v.dtype}"
        assert torch.equal(got[k], v), f"{what}: {k} differs"


@pytest.fixture(scope="module")
def reference(fk: Forker, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The values after SAVE_AT + MORE + 1 steps of a run that never saved."""
    tmp = tmp_path_factory.mktemp("fsdp2-ref")
    total = SAVE_AT + MORE + 1
    _, out = run(fk, "reference", {"at": [total]}, 2, tmp)
    return load_file(f"{out}.{total}")


@pytest.mark.parametrize(
    ("backend", "mode"),
    [("local", "sync"), ("local", "async"), pytest.param("s3", "sync", marks=pytest.mark.s3),
     pytest.param("s3", "async", marks=pytest.mark.s3)],  # ~12 s each on moto
)
def test_fsdp2_saved_through_ckpt_resumes_bit_identical_and_reshards_exactly(
    backend: str, mode: str, fk: Forker, reference: dict[str, torch.Tensor], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    store: Store = request.getfixturevalue(f"{backend}_store")
    total = SAVE_AT + MORE + 1
    args = {"root": store.root, "opts": store.opts, "mode": mode, "save_at": SAVE_AT, "total": total}
    seen, out = run(fk, "train", args, 2, tmp_path)
    saved = load_file(out + ".saved")
    assert_same(load_file(out + ".final"), reference, "the saving run vs one that never saved")
    step = SAVE_AT
    assert ckpt.list_steps(store.root, storage_options=store.opts) == [step]
    assert ckpt.verify(store.root, step, storage_options=store.opts).ok
    m = ckpt.read_manifest(store.root, step, storage_options=store.opts)
    assert m.world_size == 2
    assert len(m.tensors["model/0.weight"].shards) == 2  # each rank wrote its rows
    assert len(m.tensors["optim/state/0.weight/exp_avg"].shards) == 2
    back = ckpt.restore(store.root, storage_options=store.opts)  # whole, in this process, no DCP
    assert back["step"] == step
    assert torch.equal(back["model"]["2.weight"], saved["model/2.weight"])
    assert back["optim"]["param_groups"][0]["lr"] == pytest.approx(1e-2)

    # 2 ranks: a fresh model loads it and trains on, bit-identical to the run that never stopped
    # (async: the checkpoint of SAVE_AT steps was uploaded while the next step trained)
    args = {"root": store.root, "opts": store.opts, "total": total}
    got, out = run(fk, "resume", args, 2, tmp_path)
    assert [s["step"] for s in got] == [step, step]
    assert_same(load_file(out + ".loaded"), saved, "loaded onto 2 ranks vs saved")
    assert got[0]["groups"] == seen[0]["groups"]
    assert_same(load_file(out + ".final"), reference, "resumed vs uninterrupted")

    # 1 and 3 ranks: resharded, every value exact
    for world in (1, 3):
        got, out = run(fk, "resume", {"root": store.root, "opts": store.opts}, world, tmp_path)
        assert [s["step"] for s in got] == [step] * world
        assert_same(load_file(out + ".loaded"), saved, f"loaded onto {world} ranks vs saved")
        assert got[0]["groups"] == seen[0]["groups"]
    assert ckpt.list_steps(store.root, storage_options=store.opts) == [step]  # loads wrote nothing


# --- crash safety --------------------------------------------------------------------------------

TRIALS, STRESS_TRIALS = 5, 30


def _committed(store: Store, seen_before: list[int], trial: int) -> list[int]:
    """The committed steps: none lost, each new one verifies."""
    steps = ckpt.list_steps(store.root, storage_options=store.opts)
    assert set(seen_before) <= set(steps), f"trial {trial}: committed steps vanished: {seen_before} -> {steps}"
    for s in sorted(set(steps) - set(seen_before)):
        report = ckpt.verify(store.root, s, storage_options=store.opts)
        assert report.ok, f"trial {trial}: step {s}: {report}"
    return steps


def _restored_values(store: Store, step: int) -> dict[str, torch.Tensor]:
    back = ckpt.restore(store.root, step, storage_options=store.opts)
    assert back["step"] == step
    out = {f"model/{fqn}": t for fqn, t in back["model"].items()}
    for fqn, per in back["optim"]["state"].items():
        out.update({f"optim/state/{fqn}/{name}": t for name, t in per.items()})
    return out


def _sigkill_trials(fk: Forker, store: Store, mode: str, trials: int, seed: int, tmp: Path) -> None:
    """Each trial: 2 ranks resume from the newest committed step and save every step through
    ckpt.dcp; one rank, chosen at random, is SIGKILLed at a random moment (every other trial: a
    random moment within 30 ms of a rank starting to write a save's data), the other a random
    moment later (as torchrun tears a job down). Then only committed steps are listed, each
    verifies, and (at the end) each holds exactly the state of its step in a run that never
    stopped."""
    import os
    import random
    import signal
    import time

    rnd = random.Random(seed)
    window = (0.5, 1.5) if store.kind == "local" else (1.0, 4.0)
    opts_json = json.dumps(store.opts or None)
    steps: list[int] = []
    for trial in range(trials):
        init = str(tmp / f"init-crash-{trial}")
        progress = str(tmp / f"progress-{trial}")
        pids = [fk.start("tests.support.fsdp2_ranks:saving_loop", store.root, opts_json, mode, progress, r, 2, init)
                for r in range(2)]  # fmt: skip
        if trial % 2:  # at a random moment
            time.sleep(rnd.uniform(*window))
        else:  # a random moment after a rank started writing the data of its n-th save
            n, deadline = rnd.randint(1, 6), time.monotonic() + 30
            while line_count(progress) < n and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(rnd.uniform(0, 0.03))
        first = rnd.randrange(2)
        os.kill(pids[first], signal.SIGKILL)
        time.sleep(rnd.choice([0.0, rnd.uniform(0, 0.3)]))
        if not finished(pids[1 - first]):
            os.kill(pids[1 - first], signal.SIGKILL)
        statuses = [fk.reap(p) for p in pids]
        # a rank that failed on its own (a resume that could not load) exits 1 before the kill
        assert statuses[first] == -signal.SIGKILL, f"trial {trial}: rank {first} exited by itself ({statuses})"
        newest = steps[-1] if steps else None
        steps = _committed(store, steps, trial)
        if newest is not None:
            assert steps[-1] >= newest, f"trial {trial}: the newest step went back from {newest} to {steps[-1]}"
    assert len(steps) >= trials // 2, f"saves made little progress across the kills: {steps}"
    if store.kind == "local":  # the kills hit saves: attempts that never committed are left behind
        committed = {f"{s:012d}-{ckpt.read_manifest(store.root, s).attempt}" for s in steps}
        assert set(os.listdir(os.path.join(store.root, "data"))) - committed, "no kill landed inside a save"

    _, out = run(fk, "reference", {"at": steps}, 2, tmp)
    for s in steps:
        assert_same(_restored_values(store, s), load_file(f"{out}.{s}"), f"committed step {s} vs the uninterrupted run")

    # what the killed saves left is garbage to ckpt gc, and collecting it harms no committed step
    from ckpt.lifecycle.cleanup import collect_garbage
    from ckpt.storage import open_storage

    plan = collect_garbage(open_storage(store.root, store.opts or None), grace_s=0.0)
    assert plan.delete or store.kind != "local"
    assert ckpt.list_steps(store.root, storage_options=store.opts) == steps
    assert all(ckpt.verify(store.root, s, storage_options=store.opts).ok for s in steps)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_ranks_sigkilled_during_fsdp2_saves_leave_only_whole_committed_steps(
    mode: str, fk: Forker, local_store: Store, tmp_path: Path
) -> None:
    _sigkill_trials(fk, local_store, mode, TRIALS, {"sync": 1, "async": 2}[mode], tmp_path)


@pytest.mark.stress
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_ranks_sigkilled_during_fsdp2_saves_stress(
    backend: str, mode: str, fk: Forker, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    store: Store = request.getfixturevalue(f"{backend}_store")
    _sigkill_trials(fk, store, mode, STRESS_TRIALS, {"sync": 11, "async": 12}[mode], tmp_path)
