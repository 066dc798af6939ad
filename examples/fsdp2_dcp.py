"""FSDP2 (``fully_shard``) checkpointed with torch.distributed.checkpoint (DCP) into ckpt's format.

    python examples/fsdp2_dcp.py [--root DIR_OR_URL] [--steps 6]          # spawns 2 CPU ranks
    torchrun --nproc_per_node 2 examples/fsdp2_dcp.py --root DIR_OR_URL [--steps 6]

Two processes (gloo, CPU) train a small MLP sharded with ``fully_shard``. Halfway the state
(``get_state_dict(model, optimizer)``) is saved with ``dcp.save``, at the end with
``dcp.async_save``: DCP's own calls, with ``storage_writer=ckpt.dcp.StorageWriter(root, step)``
the only change. Then a fresh model loads the newest step with ``dcp.load`` +
``set_state_dict`` and is compared with the trained one. Run it again with the same ``--root``
and it resumes from the newest step. What lands is an ordinary ckpt checkpoint: ``ckpt ls``,
``ckpt verify``, ``ckpt.restore`` read it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import ckpt
import ckpt.dcp


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 31), torch.nn.GELU(),
                                torch.nn.Linear(31, 1))  # fmt: skip
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())  # each rank its own batch
    x = torch.randn(32, 16, generator=g)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True).sin())
    loss.backward()
    opt.step()
    return float(loss.detach())


def state(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "step": step}


def load(root: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """The newest step of ``root`` into ``model`` and ``opt`` (any world size saved it)."""
    sd = state(model, opt, -1)
    dcp.load(sd, storage_reader=ckpt.dcp.StorageReader(root), planner=ckpt.dcp.LoadPlanner())
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return int(sd["step"])


def digest(model: torch.nn.Module) -> str:
    """sha256 of every full parameter, by name (gathered: every rank calls it)."""
    full = {name: p.full_tensor() if isinstance(p, DTensor) else p for name, p in model.state_dict().items()}
    return params_digest(full)


def params_digest(params: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def worker(root: str, steps: int) -> None:
    rank = dist.get_rank()

    def say(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    model, opt = build(seed=0)
    start = 0
    if ckpt.list_steps(root):
        start = load(root, model, opt)
        say(f"resumed from step {start}")
    middle, end = start + steps // 2, start + steps
    async_group = dist.new_group(backend="gloo")  # the background save's collectives, apart from training's
    pending = None
    for step in range(start, end):
        loss = train_step(model, opt, step)
        say(f"step {step} loss {loss:.6f}")
        done = step + 1
        if done == middle:
            dcp.save(state(model, opt, done), storage_writer=ckpt.dcp.StorageWriter(root, step=done),
                     planner=ckpt.dcp.SavePlanner())  # fmt: skip
            say(f"saved step {done} with dcp.save")
        elif done == end:  # the state is copied before async_save returns; training could go on
            pending = dcp.async_save(state(model, opt, done), storage_writer=ckpt.dcp.StorageWriter(root, step=done),
                                     planner=ckpt.dcp.SavePlanner(), process_group=async_group)  # fmt: skip
    if pending is not None:
        pending.result()  # type: ignore[union-attr]
        say(f"saved step {end} with dcp.async_save")
    trained = digest(model)

    fresh, fresh_opt = build(seed=1)
    loaded = load(root, fresh, fresh_opt)
    same = digest(fresh) == trained
    say(f"loaded step {loaded} into a fresh model: parameters identical: {same}")
    say(f"final parameters sha256 {trained}")
    if rank == 0:
        for s in ckpt.list_steps(root):
            print(f"ckpt verify step {s}: {'ok' if ckpt.verify(root, s).ok else 'FAILED'}")
    if not same:
        raise SystemExit("the loaded model differs from the trained one")


def _spawned(rank: int, world: int, init_file: str, root: str, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        worker(root, steps)
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="checkpoint root (default: a new temporary directory)")
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    if "RANK" in os.environ:  # started by torchrun: every rank must name the same root
        if args.root is None:
            p.error("under torchrun, pass --root (each rank would make a temporary directory of its own)")
        dist.init_process_group("gloo")
        try:
            worker(args.root, args.steps)
        finally:
            dist.destroy_process_group()
        return
    root = args.root or tempfile.mkdtemp(prefix="ckpt-fsdp2-")
    print(f"checkpoint root: {root}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        # fork: the children start with torch imported (CPU only; no CUDA was initialised)
        torch.multiprocessing.start_processes(_spawned, args=(2, os.path.join(tmp, "init"), root, args.steps), nprocs=2,
                                              start_method="fork")  # fmt: skip


if __name__ == "__main__":
    main()
