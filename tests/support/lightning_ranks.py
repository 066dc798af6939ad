"""What each rank runs in the Lightning sharded-strategy tests (forked children,
tests/support/forker.py): a gloo process group from a file store, Lightning told it runs under
an external launcher (``LOCAL_RANK``, ``WORLD_SIZE``), a small LightningModule with AdamW and a
step scheduler, trained by a ``Trainer`` whose strategy is ``CkptModelParallelStrategy`` (the
module shards itself with ``fully_shard`` in ``configure_model``) or ``CkptFSDPStrategy``.

Scenarios: ``train`` fits ``epochs`` epochs and saves (``Trainer.save_checkpoint``, and through a
``ModelCheckpoint`` callback on local roots); ``resume`` fits to ``epochs`` from ``ckpt_path``;
both write the full (gathered) parameters and optimizer state rank 0 ends with to
``out.safetensors`` and what every rank saw to ``out`` (JSON)."""

from __future__ import annotations

import json
import os
from typing import Any

from tests.support.forker import rank_scenario

SIZES = (6, 13, 7, 2)  # 13 and 7 rows: uneven shards on 2 ranks


def _module(strategy: str) -> Any:
    import lightning as L
    import torch

    class Net(L.LightningModule):  # type: ignore[misc]
        def __init__(self, hidden: int = SIZES[1], lr: float = 1e-2) -> None:
            super().__init__()
            self.save_hyperparameters()
            a, b, c, d = SIZES
            self.net = torch.nn.Sequential(torch.nn.Linear(a, b), torch.nn.ReLU(), torch.nn.Linear(b, c),
                                           torch.nn.Tanh(), torch.nn.Linear(c, d))  # fmt: skip

        def configure_model(self) -> None:
            if strategy != "model_parallel":
                return
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch: Any, _idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}

    return Net


def _loader() -> Any:
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, SIZES[0], generator=g)
    data = torch.utils.data.TensorDataset(x, x[:, : SIZES[-1]].sin())
    return torch.utils.data.DataLoader(data, batch_size=4)  # Lightning adds a DistributedSampler (no shuffle)


def _trainer(args: dict[str, Any], epochs: int, callbacks: list[Any]) -> Any:
    import lightning as L

    from ckpt.integrations.lightning import CkptFSDPStrategy, CkptModelParallelStrategy

    opts = args.get("opts") or None
    if args["strategy"] == "model_parallel":
        strategy: Any = CkptModelParallelStrategy(data_parallel_size=args["world"], tensor_parallel_size=1,
                                                  storage_options=opts)  # fmt: skip
    else:
        strategy = CkptFSDPStrategy(storage_options=opts)
    return L.Trainer(
        strategy=strategy, accelerator="cpu", devices=args["world"], max_epochs=epochs, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, deterministic=True,
        default_root_dir=args["tmp"],
    )  # fmt: skip


def _write(trainer: Any, out: str, rank: int, seen: dict[str, Any]) -> None:
    """The full values rank 0 ends with (collective: every rank calls it)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model, opt = trainer.strategy.model, trainer.strategy.optimizers[0]
    values = {f"model/{k}": v for k, v in get_model_state_dict(model, options=full).items()}
    osd = get_optimizer_state_dict(model, opt, options=full)
    for fqn, st in osd.get("state", {}).items():  # full values: rank 0 only
        for name, v in st.items():
            values[f"optim/{fqn}/{name}"] = v
    seen["global_step"] = trainer.global_step
    seen["epoch"] = trainer.current_epoch
    seen["lr"] = opt.param_groups[0]["lr"]
    seen["scheduler_last_epoch"] = trainer.lr_scheduler_configs[0].scheduler.last_epoch
    if rank == 0:
        save_file({k: v.detach().contiguous() for k, v in values.items()}, f"{out}.safetensors")


def scenario(name: str, args_json: str, rank: int, world: int, init_file: str, out: str) -> None:
    import datetime
    import warnings

    import torch.distributed as dist

    warnings.simplefilter("ignore")
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world), RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # fmt: skip  (the group exists already)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    args = dict(json.loads(args_json), world=world)
    rank_scenario(rank, out, lambda seen: globals()[f"_{name}"](args, rank, out, seen))


def _train(args: dict[str, Any], rank: int, out: str, seen: dict[str, Any]) -> None:
    import lightning as L
    import torch

    torch.manual_seed(0)
    callbacks = []
    if args.get("dirpath"):  # every epoch, keeping the newest (the older one is removed) and last.ckpt
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=args["dirpath"], save_last=True, save_top_k=1,
                                                             every_n_epochs=1))  # fmt: skip
    trainer = _trainer(args, args["epochs"], callbacks)
    trainer.fit(_module(args["strategy"])(), _loader())
    if args.get("root"):
        trainer.save_checkpoint(args["root"], storage_options=args.get("save_opts") or None)
    _write(trainer, out, rank, seen)


def _resume(args: dict[str, Any], rank: int, out: str, seen: dict[str, Any]) -> None:
    import torch

    torch.manual_seed(1)  # another initialisation: everything must come from the checkpoint
    trainer = _trainer(args, args["epochs"], [])
    trainer.fit(_module(args["strategy"])(lr=0.5), _loader(), ckpt_path=args["ckpt_path"])
    _write(trainer, out, rank, seen)
