"""PyTorch Lightning: checkpoints stored with ckpt, for every strategy.

    # one process, DDP, DeepSpeed-less strategies that save through the CheckpointIO:
    trainer = lightning.Trainer(plugins=[CkptCheckpointIO()], ...)
    # sharded strategies (FSDP, FSDP2 / tensor parallel through ModelParallelStrategy):
    trainer = lightning.Trainer(strategy=CkptFSDPStrategy(...), ...)
    trainer = lightning.Trainer(strategy=CkptModelParallelStrategy(...), ...)
    trainer.fit(model, ckpt_path="checkpoints/last.ckpt")   # resume

Lightning's sharded strategies do not use the ``CheckpointIO``: they call ``dcp.save`` with DCP's
own file writer and ``torch.save`` the rest of the checkpoint to ``meta.pt`` (``torch.load`` on
resume). ``CkptFSDPStrategy`` and ``CkptModelParallelStrategy`` are those strategies with their
``save_checkpoint`` / ``load_checkpoint`` / ``remove_checkpoint`` going through ``ckpt.dcp``: each
rank writes its own shards, the model and optimizer states and the rest of the checkpoint (loops,
callbacks, schedulers, hyper-parameters) land in one ckpt commit, typed JSON, never a pickle; any
fsspec URL is a checkpoint path, and the ``storage_options`` given to the strategy or to
``Trainer.save_checkpoint`` are honoured.

Each Lightning checkpoint path (``.../epoch=0-step=10.ckpt``, ``last.ckpt``) becomes a ckpt root
(a directory or an object-store prefix) holding that checkpoint: safetensors shards under a
create-only manifest, no pickle. Lightning rewrites some paths (``last.ckpt``): every save commits
a new step under the root, then retires the older ones, so the path always holds one complete
checkpoint, the newest, and a crash mid-save leaves the previous one readable.

The checkpoint dict must hold what ``ckpt.save`` accepts (tensors, dicts, lists, tuples, numbers,
strings, bytes, numpy arrays); anything else (an arbitrary object in ``hyper_parameters``) is
refused by ``StateError`` naming its key, rather than pickled.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from ckpt.errors import (
    CheckpointNotFoundError,
    CkptWarning,
    PlanError,
    StateError,
    WorkerFailedError,
)
from ckpt.lifecycle import cleanup, steps
from ckpt.lifecycle import restore as restorer
from ckpt.lifecycle import save as saver
from ckpt.lifecycle.steps import latest_step
from ckpt.options import RestoreOptions, SaveOptions
from ckpt.storage import open_storage


class CkptCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` writing each checkpoint path as a ckpt root."""

    def __init__(
        self,
        storage_options: dict[str, Any] | None = None,
        save_options: SaveOptions | None = None,
        restore_options: RestoreOptions | None = None,
    ) -> None:
        self.storage_options = storage_options
        self.save_options = save_options
        self.restore_options = restore_options

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        root = os.fspath(path)
        step = _next_step(root, self.storage_options)
        saver.save(root, checkpoint, step=step, options=self.save_options, storage_options=self.storage_options)
        _retire_before(root, self.storage_options, step)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is moot: nothing is ever unpickled. Tensors come back on the CPU; Lightning
        # moves them where the model lives.
        out: dict[str, Any] = restorer.restore(str(path), options=self.restore_options, storage_options=self.storage_options)
        return out

    def remove_checkpoint(self, path: Any) -> None:
        _remove(os.fspath(path), self.storage_options)


def _next_step(root: str, storage_options: dict[str, Any] | None) -> int:
    """The step a new save of checkpoint path ``root`` commits: one past the newest."""
    older = steps.committed_steps(open_storage(root, storage_options))
    return (max(older) + 1) if older else 0


def _retire_before(root: str, storage_options: dict[str, Any] | None, step: int) -> None:
    """Retire the steps of ``root`` older than ``step`` (just committed): a rewritten path
    (``last.ckpt``) keeps one checkpoint, and a crash before this line leaves two, not none."""
    storage = open_storage(root, storage_options)
    older = [s for s in steps.committed_steps(storage) if s < step]
    if older:
        cleanup.retire_steps(storage, older)


def _remove(root: str, storage_options: dict[str, Any] | None) -> None:
    storage = open_storage(root, storage_options)
    committed = steps.committed_steps(storage)
    if committed:
        cleanup.retire_steps(storage, committed)  # manifests first: never a manifest without its data
    storage.delete_tree("")  # what is left: the LATEST hint, empty directories (a root of its own)


MODEL, OPTIMIZER = "state_dict", "optimizer_"  # Lightning's own names for them in a sharded checkpoint
class _ShardedCheckpoints:
    """What ``CkptFSDPStrategy`` and ``CkptModelParallelStrategy`` add to Lightning's strategies:
    ``save_checkpoint`` / ``load_checkpoint`` / ``remove_checkpoint`` through ``ckpt.dcp``."""

    # provided by Lightning's ParallelStrategy
    broadcast: Any
    barrier: Any
    is_global_zero: bool
    model: Any
    optimizers: Any
    lightning_module: Any

    def __init__(
        self,
        *args: Any,
        storage_options: dict[str, Any] | None = None,
        save_options: SaveOptions | None = None,
        restore_options: RestoreOptions | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)  # the Lightning strategy's own arguments
        self.ckpt_storage_options = storage_options
        self.ckpt_save_options = save_options
        self.ckpt_restore_options = restore_options

    def _options(self, storage_options: Any | None) -> dict[str, Any] | None:
        if storage_options is None:
            return self.ckpt_storage_options
        if not isinstance(storage_options, dict):
            raise StateError(f"storage_options must be a dict of fsspec options, not a {type(storage_options).__name__}")
        return {**(self.ckpt_storage_options or {}), **storage_options}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        from ckpt import dcp as ckpt_dcp

        root = os.fspath(self.broadcast(os.fspath(filepath)))
        opts = self._options(storage_options)
        step = self._on_rank_zero(lambda: _next_step(root, opts))
        state: dict[str, Any] = {MODEL: checkpoint.pop("state_dict")}
        state.update({f"{OPTIMIZER}{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        if self.is_global_zero:  # the rest (loops, callbacks, schedulers, ...) once, as Lightning's meta.pt is
            clash = sorted(k for k in checkpoint if _model_or_optimizer(k))
            if clash:
                raise StateError(f"checkpoint entries {clash} would collide with the model or optimizer states")
            state.update(_plain_dicts(checkpoint))
        writer = ckpt_dcp.StorageWriter(root, step=step, storage_options=opts, options=self.ckpt_save_options)
        dcp_save(state, storage_writer=writer, planner=ckpt_dcp.SavePlanner())
        if self.is_global_zero:
            try:
                _retire_before(root, opts, step)
            except Exception as err:  # committed: an older step left behind is not a failed save
                warnings.warn(f"{root}: step {step} committed, but retiring the older steps failed: {err}",
                              CkptWarning, stacklevel=2)  # fmt: skip
        self.barrier("ckpt.save_checkpoint")

    def _on_rank_zero(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0, its result on every rank; an error on rank 0 is raised on every
        rank (the others do not wait for a broadcast that never comes)."""
        result: Any = None
        error: Exception | None = None
        if self.is_global_zero:
            try:
                result = fn()
            except Exception as err:
                error = err
        got = self.broadcast((result, None if error is None else f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        if got[1] is not None:
            raise WorkerFailedError(f"rank 0 failed: {got[1]}", {0: got[1]})
        return got[0]

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is moot: nothing is unpickled.
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from ckpt import dcp as ckpt_dcp

        root = os.fspath(self.broadcast(os.fspath(checkpoint_path)))
        opts = self.ckpt_storage_options
        step = self._on_rank_zero(lambda: latest_step(root, storage_options=opts))
        if step is None:
            raise CheckpointNotFoundError(f"{root}: no committed checkpoint to resume from")
        reader = ckpt_dcp.StorageReader(root, step=step, storage_options=opts, options=self.ckpt_restore_options)
        module, lm = self.model, self.lightning_module
        fitting = lm.trainer.state.fn == TrainerFn.FITTING
        state: dict[str, Any] = {MODEL: get_model_state_dict(module)}
        if fitting:
            for i, opt in enumerate(self.optimizers):
                state[f"{OPTIMIZER}{i}"] = get_optimizer_state_dict(module, opt)
        loaded = _skeleton(reader.read_metadata(), skip=_model_or_optimizer)
        meta_keys = list(loaded)
        loaded.update(state)  # one dict: DCP puts top-level values into the dict it was given
        dcp_load(loaded, storage_reader=reader, planner=ckpt_dcp.LoadPlanner())
        meta = {k: loaded[k] for k in meta_keys}
        set_model_state_dict(module, state[MODEL], options=StateDictOptions(strict=lm.strict_loading))
        if fitting:
            for i, opt in enumerate(self.optimizers):
                set_optimizer_state_dict(module, opt, optim_state_dict=state[f"{OPTIMIZER}{i}"])
        return meta

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            _remove(os.fspath(filepath), self.ckpt_storage_options)


class CkptFSDPStrategy(_ShardedCheckpoints, FSDPStrategy):
    """Lightning's ``FSDPStrategy`` saving sharded checkpoints through ckpt.dcp; takes
    ``storage_options``, ``save_options`` and ``restore_options`` besides ``FSDPStrategy``'s own
    arguments. ``state_dict_type`` is "sharded": each rank writes its own shards, and a
    checkpoint resumes on any number of ranks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.setdefault("state_dict_type", "sharded") != "sharded":
            raise PlanError(
                f"CkptFSDPStrategy saves sharded checkpoints (state_dict_type='sharded'), not "
                f"{kwargs['state_dict_type']!r}: a sharded ckpt checkpoint restores whole with ckpt.restore"
            )
        super().__init__(*args, **kwargs)


class CkptModelParallelStrategy(_ShardedCheckpoints, ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2 / tensor parallel in ``configure_model``)
    saving its distributed checkpoints through ckpt.dcp; takes ``storage_options``,
    ``save_options`` and ``restore_options`` besides ``ModelParallelStrategy``'s own arguments
    (``save_distributed_checkpoint`` must stay True)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not kwargs.setdefault("save_distributed_checkpoint", True):
            raise PlanError(
                "CkptModelParallelStrategy saves distributed checkpoints (save_distributed_checkpoint=True): "
                "a sharded ckpt checkpoint restores whole with ckpt.restore"
            )
        super().__init__(*args, **kwargs)


def _model_or_optimizer(top: str) -> bool:
    return top == MODEL or top.startswith(OPTIMIZER)


def _plain_dicts(value: Any) -> Any:
    """``value`` with Lightning's ``AttributeDict`` (``hyper_parameters``) as plain dicts: typed
    JSON stores dicts, not their subclasses."""
    if isinstance(value, AttributeDict):
        value = dict(value)
    if type(value) is dict:
        return {k: _plain_dicts(v) for k, v in value.items()}
    if type(value) is list:
        return [_plain_dicts(v) for v in value]
    return value


def _skeleton(md: Metadata, skip: Callable[[str], bool]) -> dict[str, Any]:
    """The nested structure of the saved entries whose top-level key ``skip`` rejects not, with
    an empty tensor of the saved size and dtype for each tensor and None for each value: what
    ``dcp.load`` fills."""
    out: dict[str, Any] = {}
    paths = md.planner_data if isinstance(md.planner_data, dict) else {}
    for fqn, entry in md.state_dict_metadata.items():
        path = tuple(paths.get(fqn, (fqn,)))
        if skip(str(path[0])):
            continue
        if isinstance(entry, TensorStorageMetadata):
            value: Any = torch.empty(entry.size, dtype=entry.properties.dtype)
        else:
            value = None
        if len(path) == 1:
            out[path[0]] = value
        else:
            set_element(out, path, value)
    return out
