"""Lightning's ModelParallelStrategy (FSDP2) checkpointed with ckpt: ``CkptModelParallelStrategy``.

    python examples/lightning_fsdp2.py [--root DIR_OR_URL] [--epochs 2]     # 2 CPU processes

A ``Trainer`` on 2 CPU processes (Lightning launches the second) trains a small MLP that shards
itself with ``fully_shard`` in ``configure_model``; a ``ModelCheckpoint`` saves ``last.ckpt``
every epoch. The only change from Lightning's own FSDP2 setup is the strategy class: each rank
writes its shards through ``ckpt.dcp``, the loops, callbacks and schedulers land in the same
commit as typed values (no ``meta.pt`` pickle), and a ``s3://`` or ``gs://`` root works like a
directory. Run it again with the same ``--root`` and ``--epochs`` higher: it resumes from
``last.ckpt``. ``ckpt ls ROOT/last.ckpt`` and ``ckpt verify`` read what it wrote.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from typing import Any

import lightning as L
import torch

import ckpt
from ckpt.integrations.lightning import CkptModelParallelStrategy


class Net(L.LightningModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, _idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def params_digest(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "ckpt-lightning-fsdp2"))
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    last = args.root.rstrip("/") + "/last.ckpt"
    resume = last if ckpt.list_steps(last) else None

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=16)
    trainer = L.Trainer(
        strategy=CkptModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        accelerator="cpu", devices=2, max_epochs=args.epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=args.root, save_last=True, every_n_epochs=1)],
    )  # fmt: skip
    trainer.fit(Net(), data, ckpt_path=resume)

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    trained = get_model_state_dict(trainer.strategy.model, options=full)  # every rank takes part
    if trainer.is_global_zero:
        back, m = ckpt.restore(last), ckpt.read_manifest(last)
        print(f"resumed from {last}" if resume else "started fresh", flush=True)
        print(f"last.ckpt: step {m.step}, epoch {back['epoch']}, global_step {back['global_step']}, "
              f"{len(m.tensors)} tensors written by {m.world_size} ranks", flush=True)  # fmt: skip
        print(f"ckpt verify last.ckpt: {'ok' if ckpt.verify(last).ok else 'FAILED'}", flush=True)
        print(f"trained parameters sha256 {params_digest(trained)}", flush=True)
        print(f"last.ckpt parameters sha256 {params_digest(back['state_dict'])}", flush=True)

if __name__ == "__main__":
    main()
