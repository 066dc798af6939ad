"""Helpers shared by the archive and interop modules (``zarr_archive``, ``hf_export``,
``adoption``): reading one tensor (or one box of it) of a committed checkpoint through the
normal verified restore path, and the tensors of a skeleton in state order. (Sizes such as
``"5GB"`` are read by :func:`ckpt.units.parse_size`.)

Reading goes through :func:`ckpt.engine.restore_plan.plan_restore` and the executor, exactly as
``ckpt.restore`` does (block CRCs verified), one request at a time, so a caller streaming a
checkpoint holds one tensor (or one box) in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ckpt.engine.restore_plan import Request
from ckpt.errors import PlanError
from ckpt.format import dtypes
from ckpt.format.manifest import Manifest
from ckpt.geometry import boxes as regions
from ckpt.lifecycle import restore as restorer
from ckpt.options import RestoreOptions
from ckpt.state import tree
from ckpt.storage import Storage


def check_sizes(storage: Storage, m: Manifest, keys: list[str], options: RestoreOptions) -> None:
    """Stat every file holding ``keys`` against the manifest before reading (as restore does)."""
    restorer._check_sizes(storage, m, keys, options.num_threads)


def read_box(
    storage: Storage, m: Manifest, key: str, box: regions.Box | None, options: RestoreOptions
) -> torch.Tensor:
    """``key``'s values in ``box`` (None: the whole tensor) as a new contiguous CPU tensor,
    read with verified ranged reads (the caller stats the files first: :func:`check_sizes`)."""
    entry = m.tensors.get(key)
    if entry is None:
        raise PlanError(f"key {key!r} is not a tensor of step {m.step}")
    box = box or regions.Box.whole(entry.shape)
    out = torch.empty(box.sizes, dtype=dtypes.BY_CODE[entry.dtype].torch_dtype)
    if box.numel == 0:
        return out
    return restorer.read_regions(storage, m, [Request(key, box)], [out], options, sizes_checked=True)[0]


def tensor_keys_in_order(node: Any) -> Iterator[str]:
    """The tensor (and ndarray) keys of a skeleton in state order (depth first, in order)."""
    stack = [node]
    while stack:
        n = stack.pop()
        kind, body = next(iter(n.items()))
        if kind in ("tensor", "ndarray"):
            yield body
        else:  # the child nodes, in order
            body = tree.child_nodes(n)
            stack.extend(reversed(body))
