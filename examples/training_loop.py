"""A plain PyTorch training loop checkpointed by ckpt.CheckpointManager, preempted and resumed.

    python examples/training_loop.py [--root DIR_OR_URL] [--steps 30] [--save-every 5]
                                     [--preempt-at N]

Three lines hook the manager in (build it, ``restore`` before the loop, ``save`` every step);
``install_signal_handlers`` turns SIGTERM into a final save at the next step and exit code 75.
With ``--preempt-at N`` the program sends itself a real SIGTERM during step N, as a cluster
scheduler would; run it again with the same ``--root`` and it resumes where it stopped. Each
step prints ``step <n> loss <float.hex()>``, so runs can be compared bit for bit.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
from typing import Any

import torch

import ckpt


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    return model, opt, sched


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="checkpoint root (default: a new temporary directory)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--preempt-at", type=int, default=-1, help="send ourselves SIGTERM during this step")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="ckpt-loop-")

    model, opt, sched = build(args.seed)
    mgr = ckpt.CheckpointManager(root, ckpt.ManagerOptions(save_every=args.save_every))
    mgr.install_signal_handlers()  # SIGTERM -> save at the next step, exit 75
    target = {"model": model.state_dict(), "optimizer": None, "scheduler": None, "rng": None, "step": None}
    start = 0
    if mgr.restore(target) is not None:  # resume: model filled in place, the rest assigned
        opt.load_state_dict(target["optimizer"])
        sched.load_state_dict(target["scheduler"])
        torch.set_rng_state(target["rng"])
        start = target["step"] + 1
        print(f"resumed at step {start}", flush=True)
    for step in range(start, args.steps):
        x = torch.randn(32, 16)  # the data comes from the RNG: restoring it matters
        y = x[:, :4].sum(dim=1, keepdim=True).sin()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        print(f"step {step} loss {loss.item().hex()}", flush=True)
        if step == args.preempt_at:
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's notice
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng": torch.get_rng_state(), "step": step}  # fmt: skip
        # on SIGTERM: saves this step, exits 75; the final step is saved whatever --save-every says,
        # so a rerun of a finished job has nothing left to compute
        mgr.save(step, state, metrics={"loss": loss.item()}, force=step == args.steps - 1)
    mgr.close()
    print(f"done: {len(ckpt.list_steps(root))} checkpoints kept under {root}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
