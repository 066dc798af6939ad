"""The Hugging Face Trainer through ckpt (``CkptTrainer``): a training process SIGKILLed mid-run
(a real signal) resumes with ``resume_from_checkpoint=True`` from the newest committed step, and
every later step's loss equals that of a run that never stopped; local disk and S3 (moto).
Nothing is written to the output directory's ``checkpoint-N`` folders, nothing is pickled."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import ckpt
from tests.conftest import Store
from tests.support.forker import Forker, forker

TOTAL = 16


@pytest.fixture(scope="module")
def fk() -> Iterator[Forker]:
    with forker() as f:
        yield f


def _run(fk: Forker, store: Store, tmp: Path, log: Path, *, resume: bool, kill_after: int | None = None) -> int:
    pid = fk.start("tests.support.hf_trainer_loop:train", store.root, json.dumps(store.opts), TOTAL, str(log),
                   str(tmp / "out"), resume)  # fmt: skip
    if kill_after is not None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            lines = log.read_text().splitlines() if log.exists() else []
            if sum(1 for ln in lines if ln != "start") >= kill_after:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    return fk.reap(pid)


def _losses(log: Path) -> tuple[int, dict[int, str]]:
    starts, rows = 0, {}
    for line in log.read_text().splitlines():
        if line == "start":
            starts += 1
            continue
        step, loss = line.split()
        rows[int(step)] = loss  # a step computed again replaces the killed run's
    return starts, rows


@pytest.fixture(scope="module")
def reference(fk: Forker, tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    tmp = tmp_path_factory.mktemp("hf-ref")
    assert _run(fk, Store("local", str(tmp / "ref")), tmp, tmp / "ref.log", resume=False) == 0
    _, rows = _losses(tmp / "ref.log")
    assert sorted(rows) == list(range(1, TOTAL + 1))
    return rows


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_killed_trainer_resumes_from_the_newest_committed_step_identically(
    backend: str, fk: Forker, reference: dict[int, str], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    store: Store = request.getfixturevalue(f"{backend}_store")
    log = tmp_path / "run.log"
    assert _run(fk, store, tmp_path, log, resume=False, kill_after=8) == -signal.SIGKILL
    before = ckpt.list_steps(store.root, storage_options=store.opts)
    assert before
    assert all(s % 3 == 0 for s in before)
    assert len(before) <= 2  # save_total_limit=2, through ckpt's retention
    assert _run(fk, store, tmp_path, log, resume=True) == 0
    starts, rows = _losses(log)
    assert starts == 2
    for step in range(1, TOTAL + 1):
        assert rows[step] == reference[step], f"step {step}: {rows[step]} != {reference[step]}"
    assert ckpt.list_steps(store.root, storage_options=store.opts) == [15, TOTAL]  # the last save at the end
    assert ckpt.verify(store.root, TOTAL, storage_options=store.opts).ok
    saved = ckpt.restore(store.root, TOTAL, storage_options=store.opts)
    assert saved["trainer_state"]["global_step"] == TOTAL
    assert {"model", "optimizer", "scheduler", "rng", "trainer_state"} <= set(saved)
    out = tmp_path / "out"
    assert not out.exists() or not any(p.name.startswith("checkpoint-") for p in out.iterdir())


def test_resuming_an_empty_root_names_it(tmp_path: Path) -> None:
    import torch
    from transformers import TrainingArguments

    from ckpt.integrations.transformers import CkptTrainer

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": (self.w(x) - labels).pow(2).mean()}

    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True)
    trainer = CkptTrainer(model=Net(), args=args, train_dataset=[{"x": torch.ones(2), "labels": torch.ones(1)}],
                          ckpt_root=tmp_path / "empty")  # fmt: skip
    with pytest.raises(ckpt.CheckpointNotFoundError, match="empty: no committed checkpoint"):
        trainer.train(resume_from_checkpoint=True)
