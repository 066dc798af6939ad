"""FSDP2 (``fully_shard``) through ckpt.dcp, end to end: 2 real gloo ranks train a small MLP
with AdamW, save its ``get_state_dict`` with ``dcp.save`` or ``dcp.async_save`` through
``ckpt.dcp.StorageWriter`` (local disk and S3 on moto), and fresh models load it with
``dcp.load`` + ``set_state_dict``: on 2 ranks training continues bit-identical to a run that
never stopped; on 1 and 3 ranks (resharded) every parameter and optimizer-state value equals the
saved one exactly. The ranks are forked from the fork server (tests/support/forker.py) and run
tests/support/fsdp2_ranks.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ckpt
from tests.conftest import Store
from tests.support.forker import Forker, forker

SAVE_AT, MORE = 4, 3  # the save after 4 steps, 3 more after it


@pytest.fixture(scope="module")
def fk() -> Iterator[Forker]:
    with forker() as f:
        yield f


def run(fk: Forker, name: str, args: dict[str, Any], world: int, tmp: Path) -> tuple[list[dict[str, Any]], str]:
    """Run scenario ``name`` of fsdp2_ranks on ``world`` forked ranks; what each rank saw, and
    the path prefix of rank 0's value files."""
    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    init, out = str(tmp / f"init-{tag}"), str(tmp / tag)
    outs = [f"{out}-{r}.json" for r in range(world)]
    pids = [fk.start("tests.support.fsdp2_ranks:scenario", name, json.dumps(args), r, world, init, outs[r]) for r in range(world)]
    statuses = [fk.reap(p) for p in pids]
    seen = []
    for o in outs:
        try:
            with open(o) as f:
                seen.append(json.load(f))
        except FileNotFoundError:
            seen.append({"error": "no output"})
    errors = [s["error"] for s in seen if "error" in s]
    assert statuses == [0] * world, "\n".join(errors) or "a rank died (its traceback is on stderr)"
    return seen, f"{out}-0.json"


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
     pytest.param("s3", "async", marks=[pytest.mark.s3, pytest.mark.stress])],  # ~12 s each on moto
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
    # (async: the save was of step SAVE_AT, taken while step SAVE_AT + 1 trained)
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
