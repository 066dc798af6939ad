"""PyTorch Distributed Checkpoint (DCP) on ckpt's format: storage plugins and planners.

    import torch.distributed.checkpoint as dcp
    import ckpt.dcp

    dcp.save(state_dict, storage_writer=ckpt.dcp.StorageWriter(root, step=100),
             planner=ckpt.dcp.SavePlanner())
    dcp.load(state_dict, storage_reader=ckpt.dcp.StorageReader(root),   # the newest step
             planner=ckpt.dcp.LoadPlanner())

What lands is an ordinary ckpt checkpoint (safetensors shards, one create-only manifest, CRC32C
per block): ``ckpt.restore``, ``ckpt ls/show/verify`` read it, and a checkpoint written by
``ckpt.save`` loads with ``dcp.load``. Non-tensor values are typed JSON, never pickles. The key
mapping and the rules are in docs/dcp.md.

Nothing in ckpt imports this package except ``ckpt`` itself, lazily (``ckpt.dcp``): importing
``torch.distributed.checkpoint`` is paid only by those who use it.
"""

from __future__ import annotations

from ckpt.dcp._planners import LoadPlanner, SavePlanner
from ckpt.dcp._reader import StorageReader
from ckpt.dcp._writer import StorageWriter

__all__ = ["LoadPlanner", "SavePlanner", "StorageReader", "StorageWriter"]
