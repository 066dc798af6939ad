"""Training loops that crash tests run in forked children (see tests/support/forker.py) and kill with SIGKILL.

Each loop resumes from the newest committed checkpoint under its root, as a restarted job would.
"""

from __future__ import annotations

import json
import random
from typing import Any


def _opts(opts_json: str) -> dict[str, Any] | None:
    return json.loads(opts_json) or None


def expected(step: int) -> dict[str, Any]:
    """The state a checkpoint of ``step`` must hold: every part names the same step."""
    import torch

    return {
        "a": torch.full((256, 1024), float(step)),  # 1 MiB
        "b": torch.full((1000,), 2 * step, dtype=torch.int64),
        "meta": {"step": step},
    }


def saving_loop(root: str, opts_json: str, seed: int) -> None:
    """Save every step asynchronously (keep the last 2) until killed."""
    import ckpt

    _save_forever(root, opts_json, seed, expected(0), ckpt.ManagerOptions(retention=ckpt.RetentionPolicy(keep_last=2)))


def tiered_saving_loop(root: str, fast: str, seed: int) -> None:
    """Save every step asynchronously to the fast tier ``fast`` (keeping its last 2), each drained
    to ``root`` (keeping its last 3) in the background, until killed."""
    import ckpt

    opts = ckpt.ManagerOptions(retention=ckpt.RetentionPolicy(keep_last=3), fast_tier=fast,
                               fast_retention=ckpt.RetentionPolicy(keep_last=2))  # fmt: skip
    _save_forever(root, "null", seed, expected(0), opts)


def expected_incremental(step: int) -> dict[str, Any]:
    """A fine-tune's state at ``step``: a frozen 2 MiB base that never changes (incremental saves
    reference it) and small parts that every step changes."""
    import torch

    g = torch.Generator().manual_seed(7)
    return {
        "frozen": {"w": torch.randn(512, 512, generator=g), "v": torch.randn(512, 512, generator=g)},
        "a": torch.full((64, 64), float(step)),
        "b": torch.full((1000,), 2 * step, dtype=torch.int64),
        "meta": {"step": step},
    }


def incremental_saving_loop(root: str, opts_json: str, seed: int) -> None:
    """Save every step incrementally and asynchronously, keeping the last 2, so that the base of
    the newest steps' references (the first step, which wrote the frozen part) is retired while
    later saves run; until killed."""
    import ckpt

    opts = ckpt.ManagerOptions(retention=ckpt.RetentionPolicy(keep_last=2), save_options=ckpt.SaveOptions(incremental=True))
    _save_forever(root, opts_json, seed, expected_incremental(0), opts)


def _save_forever(root: str, opts_json: str, seed: int, state: dict[str, Any], opts: Any) -> None:
    """Resume from the newest committed step, then change ``a``, ``b`` and ``meta`` and save each
    step asynchronously (manager options ``opts``), waiting for the save now and then, until killed."""
    import ckpt

    mgr = ckpt.CheckpointManager(root, opts, storage_options=_opts(opts_json))
    state["meta"]["step"] = -1
    latest = mgr.restore(state)
    step = -1 if latest is None else latest
    if state["meta"]["step"] != step:
        raise AssertionError(f"restored step {latest} but its state says {state['meta']['step']}")
    rnd = random.Random(seed)
    while True:
        step += 1
        state["a"].fill_(float(step))
        state["b"].fill_(2 * step)
        state["meta"]["step"] = step
        mgr.save(step, state)
        if rnd.random() < 0.3:
            mgr.wait()


# --- a real training run, resumed after kills ---------------------------------------------------

N_SAMPLES, BATCH = 96, 8


def _build(seed: int) -> tuple[Any, Any, Any]:
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)
    return model, opt, sched


def _data() -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(99)
    x = torch.randn(N_SAMPLES, 6, generator=g)
    return x, (x.sum(dim=1, keepdim=True) * 0.3).sin()


def train(root: str, opts_json: str, seed: int, total_steps: int, log_path: str, fast: str = "") -> None:
    """Train ``total_steps`` steps with dropout (torch RNG), AdamW, StepLR and a shuffling data
    loader whose position and generator are part of the state; checkpoint every 3 steps (async),
    resume from the newest checkpoint. Appends ``step loss`` lines to ``log_path``. ``fast``: a
    fast tier the saves commit to, every other one drained to ``root``."""
    import torch

    import ckpt

    model, opt, sched = _build(seed)
    x, y = _data()
    loader = {"epoch": 0, "pos": 0, "perm": torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(seed))}
    tier = {"fast_tier": fast, "drain_every": 2} if fast else {}
    mgr = ckpt.CheckpointManager(root, ckpt.ManagerOptions(save_every=3, **tier), storage_options=_opts(opts_json))
    target: dict[str, Any] = {"model": model.state_dict(), "optimizer": None, "scheduler": None,
                              "rng": None, "loader": None, "step": None}  # fmt: skip
    start = 0
    if mgr.restore(target) is not None:
        opt.load_state_dict(target["optimizer"])
        sched.load_state_dict(target["scheduler"])
        torch.set_rng_state(target["rng"])
        loader = target["loader"]
        start = target["step"] + 1
    with open(log_path, "a") as log:
        for step in range(start, total_steps):
            if loader["pos"] + BATCH > N_SAMPLES:
                g = torch.Generator().manual_seed(seed * 1000 + loader["epoch"] + 1)
                loader = {"epoch": loader["epoch"] + 1, "pos": 0, "perm": torch.randperm(N_SAMPLES, generator=g)}
            idx = loader["perm"][loader["pos"] : loader["pos"] + BATCH]
            loader = {**loader, "pos": loader["pos"] + BATCH}
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            log.write(f"{step} {loss.item().hex()}\n")
            log.flush()
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "rng": torch.get_rng_state(), "loader": loader, "step": step}  # fmt: skip
            mgr.save(step, state)
    mgr.close()
    final = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.save(root + "-final", final, step=total_steps, options=ckpt.SaveOptions(fsync=False),
              storage_options=_opts(opts_json))
