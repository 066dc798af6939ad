"""The training loop of the Accelerate tests (a forked child, tests/support/forker.py): a tiny
model with dropout, AdamW, a step scheduler, a prepared DataLoader and a registered counter,
saving every third step with ``ckpt.integrations.accelerate.save_state`` and resuming with
``load_state``. Each step appends ``step loss python+numpy-draw counter`` to the log (floats as
hex), so a resumed run can be compared with one that never stopped, RNG streams included."""

from __future__ import annotations

import json
from typing import Any


class Counter:
    def __init__(self) -> None:
        self.seen = 0

    def state_dict(self) -> dict[str, int]:
        return {"seen": self.seen}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.seen = sd["seen"]


def train(root: str, opts_json: str, total: int, log_path: str) -> None:
    import random

    import numpy as np
    import torch
    from accelerate import Accelerator

    from ckpt.integrations.accelerate import load_state, save_state

    opts: dict[str, Any] | None = json.loads(opts_json) or None
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).tanh())
    # a generator of its own: an epoch's iterator draws its base seed from it, not from the global
    # torch stream the dropout uses (a resumed run makes its iterator at another step)
    loader = torch.utils.data.DataLoader(data, batch_size=8, generator=torch.Generator().manual_seed(2))
    counter = Counter()
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    acc.register_for_checkpointing(counter)
    loaded = load_state(acc, root, storage_options=opts)
    step = 0 if loaded is None else loaded + 1
    per_epoch = len(loader)
    with open(log_path, "a") as log:
        log.write(f"start {step}\n")
        log.flush()
        while step < total:
            pos = step % per_epoch
            for xb, yb in acc.skip_first_batches(loader, pos) if pos else loader:
                loss = torch.nn.functional.mse_loss(model(xb), yb)
                acc.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
                draw = random.random() + float(np.random.rand())  # the Python and NumPy streams too
                counter.seen += 1
                log.write(f"{step} {loss.item().hex()} {draw.hex()} {counter.seen}\n")
                log.flush()
                if step % 3 == 2:
                    save_state(acc, root, step, storage_options=opts)
                step += 1
                if step >= total:
                    break
