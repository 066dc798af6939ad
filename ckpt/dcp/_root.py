"""What ckpt's DCP writer and reader share: the root DCP calls the checkpoint id."""

from __future__ import annotations

import os
from typing import Any


class Rooted:
    """A ckpt root as DCP's ``checkpoint_id``: ``reset(checkpoint_id)`` moves to another root
    and forgets the state of the last save or load (``_forget``); never picked by DCP's
    automatic storage choice (``validate_checkpoint_id``): a ckpt writer or reader is given
    explicitly, with its step."""

    def __init__(
        self, root: str | os.PathLike[str], storage_options: dict[str, Any] | None, allow_opaque_bytes: bool
    ) -> None:
        super().__init__()
        self.root = os.fspath(root)
        self.storage_options = storage_options  # this process's: never sent to peers
        self.allow_opaque_bytes = allow_opaque_bytes

    @property
    def checkpoint_id(self) -> str:
        return self.root

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.root = os.fspath(checkpoint_id)
        self._forget()

    def _forget(self) -> None:
        raise NotImplementedError

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False
