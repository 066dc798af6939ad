"""The training run of the Trainer tests (a forked child, tests/support/forker.py): a tiny
``nn.Module`` with dropout (Trainer takes any module whose forward returns a loss), AdamW with a
linear schedule, ``CkptTrainer`` saving every 3 steps to ``root`` and resuming with
``resume_from_checkpoint=True`` when ``resume`` is set. A callback appends ``step loss`` (hex)
to the log at every logged step."""

from __future__ import annotations

import json
from typing import Any


def train(root: str, opts_json: str, total: int, log_path: str, out_dir: str, resume: bool) -> None:
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from ckpt.integrations.transformers import CkptTrainer

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                            torch.nn.Linear(32, 1))  # fmt: skip

        def forward(self, x: Any, labels: Any) -> dict[str, Any]:
            return {"loss": torch.nn.functional.mse_loss(self.body(x), labels)}

    class Log(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                with open(log_path, "a") as f:
                    f.write(f"{state.global_step} {float(logs['loss']).hex()}\n")

    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g)
    data = [{"x": x[i], "labels": x[i, :1].tanh()} for i in range(len(x))]
    args = TrainingArguments(
        output_dir=out_dir, max_steps=total, per_device_train_batch_size=8, learning_rate=1e-2,
        lr_scheduler_type="linear", logging_steps=1, save_strategy="steps", save_steps=3, save_total_limit=2,
        seed=0, report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    opts: dict[str, Any] | None = json.loads(opts_json) or None
    torch.manual_seed(0)
    trainer = CkptTrainer(model=Net(), args=args, train_dataset=data, callbacks=[Log()], ckpt_root=root,
                          ckpt_storage_options=opts)  # fmt: skip
    with open(log_path, "a") as f:
        f.write("start\n")
    trainer.train(resume_from_checkpoint=True if resume else None)
