"""Ray Train example: DDP training on Ray workers that checkpoint through ckpt.CheckpointManager
and resume after a worker is killed.

    python examples/ray_train.py [--root DIR_OR_URL] [--workers 2] [--steps 40] [--kill-at 17]

A ``TorchTrainer`` runs ``--workers`` workers (DDP over gloo on CPU). Every worker builds the
same ``CheckpointManager`` on ``--root`` and saves every ``--save-every`` steps asynchronously:
rank 0 commits one checkpoint per step holding the replicated model and optimizer once, each
rank's own RNG state under its rank, and the data-loader position. With ``--kill-at N`` the last
worker SIGKILLs itself at step N the first time round; Ray Train (``FailureConfig``) restarts the
worker group, and the train loop resumes from the newest committed checkpoint. Steps computed
again after the resume produce bit-identical losses, which the example checks at the end.

Ray Train keeps none of the checkpoint data: ckpt writes it to ``--root`` (a local directory or
any fsspec URL, e.g. ``s3://bucket/run``; credentials come from each worker's environment).
Pass non-secret fsspec settings with ``--storage-option key=value`` (e.g.
``endpoint_url=http://minio:9000``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

SAMPLES, BATCH = 256, 16  # BATCH per worker


def _model(seed: int) -> Any:
    import torch

    torch.manual_seed(seed)  # every worker builds the same initial model
    return torch.nn.Sequential(
        torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1)
    )


def _data() -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(1234)
    x = torch.randn(SAMPLES, 8, generator=g)
    return x, (x[:, :4].sum(dim=1, keepdim=True) * 0.5).tanh()


def _order(seed: int, epoch: int) -> Any:
    import torch

    return torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (torch.distributed is initialized by the trainer)."""
    import ray.train
    import torch
    from torch.nn.parallel import DistributedDataParallel

    import ckpt
    from ckpt.integrations.ray_train import Reporter

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = _model(config["seed"])
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.8)
    torch.manual_seed(config["seed"] * 100 + rank)  # each rank's own dropout stream
    x, y = _data()
    loader = {"epoch": 0, "pos": 0}

    mgr = ckpt.CheckpointManager(
        config["root"],
        ckpt.ManagerOptions(save_every=config["save_every"], retention=ckpt.RetentionPolicy(keep_last=3)),
        storage_options=config["storage_options"] or None,
    )
    # Replicated values (model, optimizer, loader) are stored once; per-rank values need
    # per-rank keys (the RNG state). A restore target holds only this rank's key.
    target: dict[str, Any] = {"model": model.state_dict(), "optimizer": None, "scheduler": None,
                              "rng": {str(rank): None}, "loader": None, "step": None}  # fmt: skip
    # Ray Train's side: each committed save is reported as a pointer checkpoint (Result.checkpoint,
    # CheckpointConfig), and a restarted worker group restores the step Ray reported last.
    reporter = Reporter(mgr)
    start, last = 0, float("nan")
    if reporter.restore(target) is not None:
        opt.load_state_dict(target["optimizer"])
        sched.load_state_dict(target["scheduler"])
        torch.set_rng_state(target["rng"][str(rank)])
        loader = target["loader"]
        start = target["step"] + 1
    # The loss log (to check the resume) needs a directory every worker and the driver share:
    # a local run's temp dir; on a cluster, only if --log-dir names shared storage.
    log_dir = Path(config["log_dir"]) if config["log_dir"] else None
    with (log_dir / f"losses-{rank}.txt").open("a") if log_dir else contextlib.nullcontext() as out:
        _log(out, f"start {start}")
        for step in range(start, config["steps"]):
            if step == config["kill_at"] and rank == world - 1 and log_dir and not (log_dir / "killed").exists():
                (log_dir / "killed").touch()
                os.kill(os.getpid(), signal.SIGKILL)  # a worker lost mid-run (OOM kill, node loss)
            if loader["pos"] + BATCH * world > SAMPLES:
                loader = {"epoch": loader["epoch"] + 1, "pos": 0}
            rows = _order(config["seed"], loader["epoch"])[loader["pos"] : loader["pos"] + BATCH * world][rank::world]
            loader = {**loader, "pos": loader["pos"] + BATCH * world}
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(ddp(x[rows]), y[rows])
            loss.backward()  # DDP averages the gradients over the training process group
            opt.step()
            sched.step()
            _log(out, f"{step} {loss.item().hex()}")
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "rng": {str(rank): torch.get_rng_state()}, "loader": loader, "step": step}  # fmt: skip
            mgr.save(step, state, force=step == config["steps"] - 1)  # and the last step
            last = loss.item()
            if mgr.should_save(step):  # every worker alike (a barrier): each report hands Ray the newest commit
                reporter.report({"loss": last}, step)
    mgr.wait()  # the last save committed: report it, so that Result.checkpoint names it
    reporter.report({"loss": last}, config["steps"] - 1)
    mgr.close()


def _log(out: Any, line: str) -> None:
    if out is not None:
        out.write(line + "\n")
        out.flush()


def run(root: str, *, workers: int = 2, steps: int = 40, save_every: int = 5, kill_at: int = -1, seed: int = 0,
        log_dir: str | None = None, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train under Ray Train; return what happened (resumes, recomputed steps, final step)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    config = {"root": root, "steps": steps, "save_every": save_every, "kill_at": kill_at, "seed": seed,
              "log_dir": log_dir, "storage_options": storage_options or {}}  # fmt: skip
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False),
        run_config=ray.train.RunConfig(
            name="ckpt-ray-train",
            storage_path=os.path.join(log_dir or tempfile.mkdtemp(prefix="ckpt-ray-train-"), "ray-results"),  # Ray Train's own bookkeeping only (written by the controller, on the driver's node)
            failure_config=ray.train.FailureConfig(max_failures=2),
            # Ray keeps its newest pointer only; ckpt's own retention decides which steps stay
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    from ckpt.integrations.ray_train import read_pointer

    pointer = read_pointer(result.checkpoint) if result.checkpoint is not None else None
    out = summarize(log_dir) if log_dir else {}
    return {**out, "reported_step": None if pointer is None else pointer.step, "checkpoint": result.checkpoint}


def losses_of(log_dir: str) -> dict[int, str]:
    """Each step's (last) loss in rank 0's log, as hex."""
    out: dict[int, str] = {}
    for line in (Path(log_dir) / "losses-0.txt").read_text().splitlines():
        a, b = line.split()
        if a != "start":
            out[int(a)] = b
    return out


def summarize(log_dir: str) -> dict[str, Any]:
    """Read the loss logs: every step computed more than once must have had the same loss."""
    out: dict[str, Any] = {"starts": [], "recomputed": 0, "mismatches": [], "steps": 0}
    losses: dict[int, str] = {}
    for line in (Path(log_dir) / "losses-0.txt").read_text().splitlines():
        a, b = line.split()
        if a == "start":
            out["starts"].append(int(b))
            continue
        step = int(a)
        if step in losses:
            out["recomputed"] += 1
            if losses[step] != b:
                out["mismatches"].append(step)
        losses[step] = b
    out["steps"] = len(losses)
    out["killed"] = (Path(log_dir) / "killed").exists()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="checkpoint root (default: a new temporary directory)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--kill-at", type=int, default=17, help="the last worker SIGKILLs itself at this step once (-1: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--then-steps", type=int, default=0, help="then a second fit() of the same run (same "
                   "RunConfig name and storage path) to this many steps: it resumes from the first one's checkpoint")
    p.add_argument("--log-dir", help="where the workers log their losses, shared by every node (default: a "
                   "temporary directory when Ray runs locally; none when joining a cluster)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a non-secret fsspec option for the root (repeatable)")  # fmt: skip
    p.add_argument("--address", help="a running Ray cluster to join (default: start a local one)")
    args = p.parse_args()

    import ray

    opts = dict(kv.split("=", 1) for kv in args.storage_option)
    root = args.root or tempfile.mkdtemp(prefix="ckpt-ray-train-root-")
    joining = bool(args.address or os.environ.get("RAY_ADDRESS"))
    log_dir = args.log_dir or (None if joining else tempfile.mkdtemp(prefix="ckpt-ray-train-"))
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    try:
        result = run(root, workers=args.workers, steps=args.steps, save_every=args.save_every, kill_at=args.kill_at,
                     seed=args.seed, log_dir=log_dir, storage_options=opts)  # fmt: skip
        import ckpt

        result["steps_after_first"] = ckpt.list_steps(root, storage_options=opts or None)
        if args.then_steps:
            again = run(root, workers=args.workers, steps=args.then_steps, save_every=args.save_every, seed=args.seed,
                        log_dir=log_dir, storage_options=opts)  # fmt: skip
            result["second"] = {"starts": again.get("starts", [])[len(result.get("starts", [])):],
                                "reported_step": again["reported_step"], "mismatches": again.get("mismatches")}  # fmt: skip
            if log_dir:  # the same training in one uninterrupted fit(): every step's loss must match
                ref_dir = tempfile.mkdtemp(prefix="ckpt-ray-train-ref-")
                run(tempfile.mkdtemp(prefix="ckpt-ray-train-ref-root-"), workers=args.workers, steps=args.then_steps,
                    save_every=args.save_every, seed=args.seed, log_dir=ref_dir)  # fmt: skip
                mine, ref = losses_of(log_dir), losses_of(ref_dir)
                result["second"]["differs_from_uninterrupted"] = sorted(s for s in ref if mine.get(s) != ref[s])
    finally:
        ray.shutdown()
    result.pop("checkpoint")
    final = args.then_steps or args.steps
    result["latest_step"] = ckpt.latest_step(root, storage_options=opts or None)
    print(json.dumps({"root": root, **result}))
    ok = not result.get("mismatches") and result["latest_step"] == final - 1
    second = result.get("second") or {}
    ok = ok and not second.get("mismatches") and not second.get("differs_from_uninterrupted")
    print("ok: resumed runs recomputed identical losses" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
