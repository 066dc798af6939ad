"""The Lightning CheckpointIO plugin: a real Trainer saves through ckpt and resumes from it."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

L = pytest.importorskip("lightning")
# Lightning's own deprecation and advice warnings (dataloader workers, ...) are not ours to fail on.
pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning:lightning"
)

import ckpt  # noqa: E402
from ckpt.integrations.lightning import CkptCheckpointIO  # noqa: E402


class _Model(L.LightningModule):  # type: ignore[misc,name-defined]
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch: Any, _idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3)}


def _loader() -> Any:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    return torch.utils.data.DataLoader(data, batch_size=8)


def _trainer(tmp: Any, epochs: int) -> Any:
    return L.Trainer(
        default_root_dir=str(tmp), max_epochs=epochs, plugins=[CkptCheckpointIO()], accelerator="cpu",
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp / "ck"), save_last=True, every_n_epochs=1)],
    )  # fmt: skip


def test_a_trainer_saves_through_ckpt_and_resumes(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = _Model()
    _trainer(tmp_path, epochs=2).fit(model, _loader())
    last = tmp_path / "ck" / "last.ckpt"
    assert last.is_dir()  # a ckpt root, not a pickle file
    steps = ckpt.list_steps(str(last))
    assert len(steps) == 1  # rewritten paths keep only the newest commit
    m = ckpt.read_manifest(str(last))
    assert ckpt.verify(str(last)).ok
    assert "state_dict/net~10.weight" not in m.tensors  # keys are the real names, escaped only for "/"
    assert "state_dict/net.0.weight" in m.tensors
    saved = ckpt.restore(str(last))
    assert saved["global_step"] == 16
    for k, v in model.state_dict().items():
        assert torch.equal(saved["state_dict"][k], v)
    assert not any(p.suffix == ".ckpt" and p.is_file() for p in (tmp_path / "ck").iterdir())  # no pickles anywhere

    resumed = _Model()
    trainer = _trainer(tmp_path / "again", epochs=3)
    trainer.fit(resumed, _loader(), ckpt_path=str(last))
    assert trainer.global_step == 24  # it went on from step 16, not from 0
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3  # per epoch: 2 restored + 1


def test_remove_checkpoint_retires_it(tmp_path: Any) -> None:
    io = CkptCheckpointIO()
    root = tmp_path / "x.ckpt"
    io.save_checkpoint({"w": torch.ones(2), "epoch": 1}, root)
    io.save_checkpoint({"w": torch.zeros(2), "epoch": 2}, root)
    assert ckpt.list_steps(str(root)) == [1]
    assert io.load_checkpoint(root)["epoch"] == 2
    io.remove_checkpoint(root)
    assert not os.path.exists(root)
