"""ckpt demo: train, checkpoint, "crash", restore into a fresh process state, and continue.

Runs on a local directory (no cloud account needed):

    python examples/single_process.py [--root DIR]

It trains a small MLP for a few steps, saving a checkpoint every 5 steps (model, AdamW state,
LR scheduler, RNG states, step counter), then builds a brand-new model and optimizer, restores
the latest checkpoint into them in place and trains on. The losses after the restore must be
bit-identical to an uninterrupted run with the same seed.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from typing import Any

import numpy as np
import torch

import ckpt

STEPS = 20
CRASH_AT = 13  # the "preemption": everything after the last checkpoint (step 10) is lost
SAVE_EVERY = 5


def make_run(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    return model, opt, sched


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Data that depends on the global RNG, so restoring the RNG state matters."""
    x = torch.randn(64, 32)
    noise = float(np.random.normal()) * 0.01 + random.random() * 0.01
    return x, x[:, :1] * 2.0 - x[:, 1:2] + noise


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, step: int) -> float:
    x, y = batch(step)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


def state_of(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, step: int) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "step": step,
    }


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="checkpoint root (a directory or fsspec URL); default: a temp dir")
    args = parser.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="ckpt-demo-")

    print(f"checkpoint root: {root}")
    print("1) uninterrupted reference run")
    seed_all(0)
    model, opt, sched = make_run(0)
    reference = [train_step(model, opt, sched, s) for s in range(1, STEPS + 1)]

    print(f"2) run that checkpoints every {SAVE_EVERY} steps and dies at step {CRASH_AT}")
    seed_all(0)
    model, opt, sched = make_run(0)
    for step in range(1, CRASH_AT + 1):
        loss = train_step(model, opt, sched, step)
        if step % SAVE_EVERY == 0:
            m = ckpt.save(root, state_of(model, opt, sched, step), step=step)
            print(f"   step {step:2d} loss {loss:.6f}  saved {m.total_bytes / 1024:.1f} KiB in {len(m.files)} file(s)")
    del model, opt, sched

    print(f"3) fresh process state: restore the latest checkpoint (steps on storage: {ckpt.list_steps(root)})")
    seed_all(12345)  # anything: the restore must overwrite it
    model, opt, sched = make_run(999)
    target = state_of(model, opt, sched, 0)
    target["optimizer"] = None  # optimizer state is created lazily: take it whole, then load it
    target["scheduler"] = None
    target["rng"] = None
    back = ckpt.restore(root, target=target)
    model.load_state_dict(back["model"])  # already filled in place; load for buffers/metadata
    opt.load_state_dict(back["optimizer"])
    sched.load_state_dict(back["scheduler"])
    random.setstate(back["rng"]["python"])
    np.random.set_state(back["rng"]["numpy"])
    torch.set_rng_state(back["rng"]["torch"])
    start = back["step"]
    print(f"   restored step {start}")

    resumed = [train_step(model, opt, sched, s) for s in range(start + 1, STEPS + 1)]
    print("4) losses after the restore vs the uninterrupted run")
    for s, (a, b) in enumerate(zip(resumed, reference[start:], strict=True), start=start + 1):
        print(f"   step {s:2d}  resumed {a:.8f}  reference {b:.8f}  {'identical' if a == b else 'DIFFERENT'}")
    ok = resumed == reference[start:]
    if not args.root:
        shutil.rmtree(root)
    if not ok:
        raise SystemExit("FAILED: the resumed run diverged from the reference")
    print("OK: the resumed run is bit-identical to the uninterrupted one")


if __name__ == "__main__":
    main()
