"""Lightning's sharded strategies through ckpt.dcp: a real ``Trainer`` with
``CkptModelParallelStrategy`` (FSDP2 ``fully_shard`` in ``configure_model``) on 2 gloo CPU ranks
saves through ``Trainer.save_checkpoint`` and a ``ModelCheckpoint`` callback, resumes with
``fit(ckpt_path=...)`` bit-identical to a run that never stopped, on local disk and S3 (moto,
with the ``storage_options`` given to ``save_checkpoint``), and the checkpoint restores whole in
one process with ``ckpt.restore`` (2 -> 1 ranks). The ranks are forked from the fork server and
run tests/support/lightning_ranks.py.

``CkptFSDPStrategy`` (FSDP1) is not run here: torch 2.13's FSDP1 refuses a machine without an
accelerator."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")
pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning:lightning"
)

from safetensors.torch import load_file  # noqa: E402

import ckpt  # noqa: E402
from ckpt.errors import PlanError  # noqa: E402
from tests.conftest import Store  # noqa: E402
from tests.support.forker import Forker, forker, run_ranks  # noqa: E402

EPOCHS, MORE = 2, 1  # 6 steps an epoch on each rank


@pytest.fixture(scope="module")
def fk() -> Iterator[Forker]:
    with forker() as f:
        yield f


def run(fk: Forker, name: str, args: dict[str, Any], tmp: Path, world: int = 2) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Scenario ``name`` of lightning_ranks on ``world`` forked ranks: what each saw, and the
    full values rank 0 ended with."""
    args = dict(args, tmp=str(tmp / f"trainer-{name}-{uuid.uuid4().hex[:8]}"))
    seen, outs = run_ranks(fk, "tests.support.lightning_ranks:scenario",
                           lambda r, init, out: [name, json.dumps(args), r, world, init, out], world, str(tmp), name)  # fmt: skip
    return seen, load_file(f"{outs[0]}.safetensors")


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for k, v in want.items():
        assert torch.equal(got[k], v), f"{what}: {k} differs"


@pytest.fixture(scope="module")
def reference(fk: Forker, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The values after EPOCHS + MORE epochs of a run that never saved."""
    _, values = run(fk, "train", {"strategy": "model_parallel", "epochs": EPOCHS + MORE}, tmp_path_factory.mktemp("ref"))
    return values


def _no_pickles(root: Path) -> None:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    odd = [p for p in files if p.suffix not in (".safetensors", ".json") and p.name != "LATEST"]
    assert not odd, f"files that are neither shards nor manifests: {odd}"


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_model_parallel_strategy_saves_through_ckpt_and_resumes_bit_identical(
    backend: str, fk: Forker, reference: dict[str, torch.Tensor], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    store: Store = request.getfixturevalue(f"{backend}_store")
    root = store.root.rstrip("/") + "/run/last.ckpt"  # a Lightning checkpoint path is a ckpt root
    train: dict[str, Any] = {"strategy": "model_parallel", "epochs": EPOCHS, "root": root}
    if backend == "s3":  # the options reach the save through Trainer.save_checkpoint(..., storage_options=)
        train["save_opts"] = store.opts
    else:
        train["dirpath"] = str(tmp_path / "ck")  # and through a ModelCheckpoint callback
    seen, saved = run(fk, "train", train, tmp_path)
    assert [s["global_step"] for s in seen] == [EPOCHS * 6] * 2
    assert ckpt.list_steps(root, storage_options=store.opts) == [0]
    assert ckpt.verify(root, storage_options=store.opts).ok
    m = ckpt.read_manifest(root, storage_options=store.opts)
    assert m.world_size == 2
    assert len(m.tensors["state_dict/net.2.weight"].shards) == 2  # each rank wrote its rows

    # one process, no DCP, no Lightning: the whole checkpoint, as Lightning's dict
    back = ckpt.restore(root, storage_options=store.opts)
    assert back["global_step"] == EPOCHS * 6
    assert back["epoch"] == EPOCHS
    assert back["hyper_parameters"] == {"hidden": 13, "lr": 0.01}  # an AttributeDict, stored as a dict
    assert back["lr_schedulers"][0]["last_epoch"] == EPOCHS
    assert back["optimizer_0"]["param_groups"][0]["lr"] == pytest.approx(0.005)
    for k, v in saved.items():
        kind, rest = k.split("/", 1)
        if kind == "model":
            assert torch.equal(back["state_dict"][rest], v), k
        else:
            fqn, name = rest.rsplit("/", 1)
            assert torch.equal(back["optimizer_0"]["state"][fqn][name], v), k

    if backend == "local":
        ck = tmp_path / "ck"
        kept = sorted(p.name for p in ck.iterdir())
        assert kept == [f"epoch={EPOCHS - 1}-step={EPOCHS * 6}.ckpt", "last.ckpt"]  # epoch 0's was removed
        for name in kept:
            assert len(ckpt.list_steps(str(ck / name))) == 1  # rewritten paths keep their newest commit
            assert ckpt.verify(str(ck / name)).ok
        _no_pickles(ck)
        _no_pickles(Path(root))

    # a fresh model (another seed, another learning rate) resumes from it on 2 ranks
    resume = {"strategy": "model_parallel", "epochs": EPOCHS + MORE, "ckpt_path": root, "opts": store.opts}
    got, final = run(fk, "resume", resume, tmp_path)
    assert [s["global_step"] for s in got] == [(EPOCHS + MORE) * 6] * 2  # it went on from the saved step
    assert [s["scheduler_last_epoch"] for s in got] == [EPOCHS + MORE] * 2
    assert_same(final, reference, "resumed vs uninterrupted")
    assert ckpt.list_steps(root, storage_options=store.opts) == [0]  # the resume wrote nothing


def test_saving_the_same_path_again_commits_a_new_step_and_retires_the_old(fk: Forker, tmp_path: Path) -> None:
    root = str(tmp_path / "again.ckpt")
    run(fk, "train", {"strategy": "model_parallel", "epochs": 1, "root": root}, tmp_path)
    first = ckpt.restore(root)
    run(fk, "train", {"strategy": "model_parallel", "epochs": 2, "root": root}, tmp_path)
    assert ckpt.list_steps(root) == [1]
    assert first["global_step"] == 6
    assert ckpt.restore(root)["global_step"] == 12


def test_strategies_refuse_full_state_dicts() -> None:
    from ckpt.integrations.lightning import CkptFSDPStrategy, CkptModelParallelStrategy

    with pytest.raises(PlanError, match="state_dict_type='sharded'"):
        CkptFSDPStrategy(state_dict_type="full")
    with pytest.raises(PlanError, match="save_distributed_checkpoint=True"):
        CkptModelParallelStrategy(save_distributed_checkpoint=False)
    assert CkptFSDPStrategy()._state_dict_type == "sharded"


def test_resuming_an_empty_root_is_a_clear_error(fk: Forker, tmp_path: Path) -> None:
    os.makedirs(tmp_path / "empty.ckpt")
    with pytest.raises(AssertionError, match="no committed checkpoint"):
        run(fk, "resume", {"strategy": "model_parallel", "epochs": 1, "ckpt_path": str(tmp_path / "empty.ckpt")}, tmp_path)
