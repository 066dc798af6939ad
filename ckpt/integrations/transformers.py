"""Hugging Face ``transformers.Trainer`` checkpoints as ckpt steps: ``CkptTrainer``.

    from ckpt.integrations.transformers import CkptTrainer

    trainer = CkptTrainer(model=model, args=args, train_dataset=ds, ckpt_root="s3://bucket/run")
    trainer.train(resume_from_checkpoint=True)      # the newest committed step (error if none)
    trainer.train(resume_from_checkpoint=None)      # a fresh start

``CkptTrainer`` is ``Trainer`` with its checkpoint hooks replaced. Each save (``save_strategy``,
``save_steps``) commits one ckpt step, numbered by ``global_step``, holding what a
``checkpoint-N`` folder holds: the model's weights, the optimizer, the scheduler, the gradient
scaler, every process's RNG states and the ``TrainerState`` (stateful callbacks included), as
safetensors shards and typed JSON under one create-only manifest: no ``optimizer.pt`` /
``rng_state.pth`` pickles, and a save killed halfway leaves no step behind, so resuming "from the
newest" never picks a broken checkpoint (``get_last_checkpoint``'s failure mode).
``save_total_limit`` retires the oldest steps through ckpt's retention. ``resume_from_checkpoint``
takes True (the newest committed step), a step number, or the root itself.

On resume the step is read once; the loaders Trainer calls with the checkpoint folder
(``_load_from_checkpoint``, ``_load_optimizer_and_scheduler``, ``_load_scaler``,
``_load_rng_state``) take their parts from it, and Trainer reads its ``TrainerState`` from a
``trainer_state.json`` written to a private temporary folder (plain JSON), the only file it
needs there.

Not covered in this version (refused with ``PlanError``): DeepSpeed and FSDP (use ``ckpt.dcp``
for FSDP2), ``load_best_model_at_end``, ``push_to_hub`` of checkpoints; models with tied weights
are saved as ``ckpt.save`` saves shared tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

from transformers import Trainer
from transformers.trainer_callback import ExportableState

from ckpt.errors import CheckpointNotFoundError, PlanError
from ckpt.integrations import _rng
from ckpt.lifecycle import cleanup, steps
from ckpt.lifecycle import restore as restorer
from ckpt.lifecycle import save as saver
from ckpt.options import RestoreOptions, SaveOptions
from ckpt.parallel import torchrun
from ckpt.storage import Root, open_storage, root_url

TRAINER_STATE = "trainer_state.json"


class CkptTrainer(Trainer):
    """``transformers.Trainer`` whose checkpoints are ckpt steps under ``ckpt_root``."""

    def __init__(
        self,
        *args: Any,
        ckpt_root: Root,
        ckpt_storage_options: dict[str, Any] | None = None,
        ckpt_save_options: SaveOptions | None = None,
        ckpt_restore_options: RestoreOptions | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.ckpt_root = root_url(ckpt_root, "ckpt_root")
        self.ckpt_storage_options = ckpt_storage_options
        self.ckpt_save_options = ckpt_save_options
        self.ckpt_restore_options = ckpt_restore_options
        self._resumed: dict[str, Any] | None = None  # the step being resumed from, read once
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise PlanError("CkptTrainer does not save DeepSpeed or FSDP states yet; with FSDP2 save through ckpt.dcp")
        if self.args.load_best_model_at_end or self.args.push_to_hub:
            raise PlanError("CkptTrainer does not support load_best_model_at_end or push_to_hub in this version")

    # --- save ------------------------------------------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        # as Trainer does: ExportableState callbacks and TrainerControl where they are now (a dict
        # at run time, whatever its annotation says)
        stateful: dict[str, Any] = self.state.stateful_callbacks  # type: ignore[assignment]
        for cb in [c for c in [*self.callback_handler.callbacks, self.control] if isinstance(c, ExportableState)]:
            name, cb_state = type(cb).__name__, cb.state()
            if isinstance(stateful.get(name), list):
                stateful[name].append(cb_state)
            else:
                stateful[name] = cb_state
        state: dict[str, Any] = {
            "model": self.accelerator.unwrap_model(self.model).state_dict(),
            # what save_to_json writes (plain JSON: floats, ints, strings, lists, dicts)
            "trainer_state": json.loads(json.dumps(dataclasses.asdict(self.state))),
        }
        if not self.args.save_only_model and self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
            if self.lr_scheduler is not None:
                state["scheduler"] = self.lr_scheduler.state_dict()
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            state["rng"] = {str(self.args.process_index): _rng.capture()}
        step = self.state.global_step
        if self.args.world_size <= 1:
            saver.save(self.ckpt_root, state, step=step, options=self.ckpt_save_options,
                       storage_options=self.ckpt_storage_options)  # fmt: skip
        else:
            torchrun.save(self.ckpt_root, state, step=step, plain_tensors="auto", options=self.ckpt_save_options,
                          storage_options=self.ckpt_storage_options)  # fmt: skip
        if self.args.should_save and self.args.save_total_limit:
            storage = open_storage(self.ckpt_root, self.ckpt_storage_options)
            committed = steps.committed_steps(storage)
            older = committed[: max(0, len(committed) - self.args.save_total_limit)]
            if older:
                cleanup.retire_steps(storage, older)

    # --- resume ----------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: Any = None, trial: Any = None, ignore_keys_for_eval: Any = None,
              **kwargs: Any) -> Any:  # fmt: skip
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return super().train(None, trial, ignore_keys_for_eval, **kwargs)
        if resume_from_checkpoint is True or resume_from_checkpoint == self.ckpt_root:
            step = steps.latest_step(self.ckpt_root, storage_options=self.ckpt_storage_options)
            if step is None:
                raise CheckpointNotFoundError(f"{self.ckpt_root}: no committed checkpoint to resume from")
        elif type(resume_from_checkpoint) is int:
            step = resume_from_checkpoint
        else:
            raise PlanError(f"resume_from_checkpoint={resume_from_checkpoint!r}: CkptTrainer resumes from its "
                            "ckpt_root: pass True (the newest committed step) or a step number")  # fmt: skip
        self._resumed = restorer.restore(self.ckpt_root, step, options=self.ckpt_restore_options,
                                         storage_options=self.ckpt_storage_options)  # fmt: skip
        folder = tempfile.mkdtemp(prefix=f"ckpt-trainer-step-{step}-")
        try:
            with open(os.path.join(folder, TRAINER_STATE), "w") as f:
                json.dump(self._resumed["trainer_state"], f)
            return super().train(folder, trial, ignore_keys_for_eval, **kwargs)
        finally:
            self._resumed = None
            shutil.rmtree(folder, ignore_errors=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self._resumed is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        target.load_state_dict(self._resumed["model"])

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if self._resumed is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        if "optimizer" in self._resumed and self.optimizer is not None:
            self.optimizer.load_state_dict(self._resumed["optimizer"])
        if "scheduler" in self._resumed and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(self._resumed["scheduler"])

    def _load_scaler(self, checkpoint: str | None) -> None:
        if self._resumed is None:
            super()._load_scaler(checkpoint)
            return
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "scaler" in self._resumed:
            scaler.load_state_dict(self._resumed["scaler"])

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if self._resumed is None:
            super()._load_rng_state(checkpoint)
            return
        rng = self._resumed.get("rng", {}).get(str(self.args.process_index))
        if rng is not None:
            _rng.apply(rng)

