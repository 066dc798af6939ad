"""What each rank runs in the FSDP2 tests (forked children, tests/support/forker.py): a gloo
process group from a file store, a small MLP sharded with ``fully_shard`` on a CPU device mesh,
AdamW, and one scenario of training, ``dcp.save`` / ``dcp.async_save`` / ``dcp.load`` through
ckpt.dcp. Rank 0 writes the full (gathered) values it saw to safetensors files next to ``out``;
every rank writes what it saw to ``out`` (JSON).

Training is deterministic: step ``i`` of rank ``r`` trains on ``batch(i, r)``, so a run resumed
from a checkpoint of step ``s`` (``s`` steps done) continues with step ``s``."""

from __future__ import annotations

import json
from typing import Any

from tests.support.forker import rank_scenario

# 13, 7 and 2 rows: uneven shards on 2 and 3 ranks, and an empty shard on the third of 3 ranks
SIZES = (8, 13, 7, 2)
LR = 1e-2


def _init(rank: int, world: int, init_file: str) -> Any:
    import datetime
    import warnings

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    return init_device_mesh("cpu", (world,))


def build(mesh: Any, seed: int, lr: float = LR) -> tuple[Any, Any]:
    """The model (every Linear its own FSDP2 unit, then the root) and its AdamW."""
    import torch
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    a, b, c, d = SIZES
    model = torch.nn.Sequential(torch.nn.Linear(a, b), torch.nn.ReLU(), torch.nn.Linear(b, c), torch.nn.Tanh(),
                                torch.nn.Linear(c, d))  # fmt: skip
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    return model, opt


def batch(step: int, rank: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(6, SIZES[0], generator=g)
    return x, x[:, : SIZES[-1]].sin()


def train(model: Any, opt: Any, start: int, stop: int, rank: int) -> None:
    import torch

    for i in range(start, stop):
        x, y = batch(i, rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def state_of(model: Any, opt: Any, step: int) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "step": step}


def full_values(model: Any, opt: Any) -> tuple[dict[str, Any], Any]:
    """Every tensor of the model's and optimizer's state dicts, gathered whole (a collective: every
    rank calls it), keyed ``model/<fqn>`` and ``optim/state/<fqn>/<name>``; and the param groups."""
    import torch
    from torch.distributed.tensor import DTensor

    s = state_of(model, opt, 0)
    out: dict[str, Any] = {}
    for fqn, t in s["model"].items():
        out[f"model/{fqn}"] = t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()
    for fqn, per in s["optim"]["state"].items():
        for name, t in per.items():
            assert isinstance(t, torch.Tensor), (fqn, name)
            out[f"optim/state/{fqn}/{name}"] = t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()
    return out, s["optim"]["param_groups"]


def _write(path: str, model: Any, opt: Any, rank: int) -> Any:
    from safetensors.torch import save_file

    values, groups = full_values(model, opt)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in values.items()}, path)
    return json.loads(json.dumps(groups))  # tuples (betas) as lists


def scenario(name: str, args_json: str, rank: int, world: int, init_file: str, out: str) -> None:

    mesh = _init(rank, world, init_file)
    rank_scenario(rank, out, lambda seen: globals()[f"_{name}"](json.loads(args_json), mesh, rank, world, out, seen))


def _opts(args: dict[str, Any]) -> dict[str, Any] | None:
    return args.get("opts") or None


def _train(args: dict[str, Any], mesh: Any, rank: int, world: int, out: str, seen: dict[str, Any]) -> None:
    """Train ``total`` steps from seed 0; with ``mode`` "sync" or "async", save step ``save_at``
    on the way (async: the save runs while the next step trains; its future is waited on after).
    Writes ``out.saved`` (the values at the save) and ``out.final`` (after ``total`` steps)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import ckpt.dcp

    model, opt = build(mesh, seed=0)
    mode, save_at, total = args["mode"], args["save_at"], args["total"]
    train(model, opt, 0, save_at, rank)
    if mode != "none":
        seen["groups"] = _write(out + ".saved", model, opt, rank)
        writer = ckpt.dcp.StorageWriter(args["root"], step=save_at, storage_options=_opts(args))
        state = state_of(model, opt, save_at)
        if mode == "sync":
            dcp.save(state, storage_writer=writer, planner=ckpt.dcp.SavePlanner())
        else:  # as torchtitan does: the background save gets a gloo group of its own
            fut = dcp.async_save(state, storage_writer=writer, planner=ckpt.dcp.SavePlanner(),
                                 process_group=dist.new_group(backend="gloo"))  # fmt: skip
            train(model, opt, save_at, save_at + 1, rank)  # overlaps the upload
            fut.result(timeout=60)
            save_at += 1
    train(model, opt, save_at, total, rank)
    _write(out + ".final", model, opt, rank)


def _resume(args: dict[str, Any], mesh: Any, rank: int, world: int, out: str, seen: dict[str, Any]) -> None:
    """A fresh model (another seed, another learning rate) on ``world`` ranks; dcp.load of the
    newest step (or ``step``) and set_state_dict; writes ``out.loaded``, trains on to ``total``
    (if given) and writes ``out.final``. dcp.load writes the tensors in place (get_state_dict's
    DTensors are the model's and optimizer's own); the param groups (the learning rate) take
    effect through set_state_dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    import ckpt.dcp

    model, opt = build(mesh, seed=1, lr=3 * LR)
    state = state_of(model, opt, -1)
    dcp.load(state, storage_reader=ckpt.dcp.StorageReader(args["root"], step=args.get("step"), storage_options=_opts(args)),
             planner=ckpt.dcp.LoadPlanner())  # fmt: skip
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    seen["step"] = start = state["step"]
    seen["groups"] = _write(out + ".loaded", model, opt, rank)
    if args.get("total") is not None:
        train(model, opt, start, args["total"], rank)
        _write(out + ".final", model, opt, rank)


def _reference(args: dict[str, Any], mesh: Any, rank: int, world: int, out: str, seen: dict[str, Any]) -> None:
    """Train ``total`` steps from seed 0 without saving; ``out.<s>`` holds the values after ``s``
    steps for each ``s`` in ``at``."""
    model, opt = build(mesh, seed=0)
    done = 0
    for s in sorted(args["at"]):
        train(model, opt, done, s, rank)
        done = s
        _write(f"{out}.{s}", model, opt, rank)


# --- crash trials --------------------------------------------------------------------------------


def _traced_writer(progress: str) -> Any:
    """ckpt.dcp.StorageWriter that appends a line to ``progress`` as each rank starts writing its
    data (for the test to time a kill inside a save); nothing else changes."""
    import ckpt.dcp

    class Traced(ckpt.dcp.StorageWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            with open(progress, "a") as f:
                f.write(f"{self.step}\n")
            return super().write_data(plan, planner)

    return Traced


def saving_loop(root: str, opts_json: str, mode: str, progress: str, rank: int, world: int, init_file: str) -> None:
    """Resume from the newest committed step (if any), then train and save every step with
    dcp.save ("sync") or dcp.async_save ("async", the previous save waited on before the next,
    as torchtitan does) through ckpt.dcp, until killed. Each rank appends a line to ``progress``
    as it starts writing a save's data."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    import ckpt
    import ckpt.dcp

    opts = json.loads(opts_json) or None
    mesh = _init(rank, world, init_file)
    model, opt = build(mesh, seed=0)
    step = 0
    if ckpt.list_steps(root, storage_options=opts):
        state = state_of(model, opt, -1)
        dcp.load(state, storage_reader=ckpt.dcp.StorageReader(root, storage_options=opts), planner=ckpt.dcp.LoadPlanner())
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        step = state["step"]
    group = dist.new_group(backend="gloo") if mode == "async" else None
    fut: Any = None
    writer_type = _traced_writer(progress)
    while True:
        train(model, opt, step, step + 1, rank)
        step += 1
        writer = writer_type(root, step=step, storage_options=opts)
        if mode == "sync":
            dcp.save(state_of(model, opt, step), storage_writer=writer, planner=ckpt.dcp.SavePlanner())
            continue
        if fut is not None:
            fut.result(timeout=60)
        fut = dcp.async_save(state_of(model, opt, step), storage_writer=writer, planner=ckpt.dcp.SavePlanner(),
                             process_group=group)  # fmt: skip
