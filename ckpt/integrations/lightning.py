"""PyTorch Lightning: a ``CheckpointIO`` plugin that stores Lightning checkpoints with ckpt.

    trainer = lightning.Trainer(plugins=[CkptCheckpointIO()], ...)
    trainer.fit(model, ckpt_path="checkpoints/last.ckpt")   # resume

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

from typing import Any

from lightning.pytorch.plugins.io import CheckpointIO

from ckpt.lifecycle import cleanup, steps
from ckpt.lifecycle import restore as restorer
from ckpt.lifecycle import save as saver
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
        root = str(path)
        storage = open_storage(root, self.storage_options)
        older = steps.committed_steps(storage)
        step = (max(older) + 1) if older else 0
        saver.save(root, checkpoint, step=step, options=self.save_options, storage_options=self.storage_options)
        committed = [s for s in older if s < step]
        if committed:
            cleanup.retire_steps(storage, committed)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is moot: nothing is ever unpickled. Tensors come back on the CPU; Lightning
        # moves them where the model lives.
        out: dict[str, Any] = restorer.restore(str(path), options=self.restore_options, storage_options=self.storage_options)
        return out

    def remove_checkpoint(self, path: Any) -> None:
        storage = open_storage(str(path), self.storage_options)
        committed = steps.committed_steps(storage)
        if committed:
            cleanup.retire_steps(storage, committed)  # manifests first: never a manifest without its data
        storage.delete_tree("")  # what is left: the LATEST hint, empty directories (a root of its own)
