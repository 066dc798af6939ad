"""Helpers shared by the archive and interop modules (``zarr_archive``, ``hf_export``,
``adoption``): reading one tensor (or one box of it) of a committed checkpoint through the
normal verified restore path, the tensors of a skeleton in state order, and size parsing.

Reading goes through :func:`ckpt.engine.restore_plan.plan_restore` and the executor, exactly as
``ckpt.restore`` does (block CRCs verified), one request at a time, so a caller streaming a
checkpoint holds one tensor (or one box) in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch

from ckpt.engine import executor
from ckpt.engine.restore_plan import Request, plan_restore
from ckpt.errors import PlanError
from ckpt.format import dtypes
from ckpt.format.manifest import Manifest
from ckpt.geometry import boxes as regions
from ckpt.lifecycle import restore as restorer
from ckpt.options import RestoreOptions
from ckpt.state import tree
from ckpt.storage import Storage

_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGTP]?)(i?)B?\s*", re.IGNORECASE)


def check_sizes(storage: Storage, m: Manifest, keys: list[str], options: RestoreOptions) -> None:
    """Stat every file holding ``keys`` against the manifest before reading (as restore does)."""
    restorer._check_sizes(storage, m, keys, options.num_threads)


def read_box(
    storage: Storage, m: Manifest, key: str, box: regions.Box | None, options: RestoreOptions
) -> torch.Tensor:
    """``key``'s values in ``box`` (None: the whole tensor) as a new contiguous CPU tensor,
    read with verified ranged reads."""
    entry = m.tensors.get(key)
    if entry is None:
        raise PlanError(f"key {key!r} is not a tensor of step {m.step}")
    box = box or regions.Box.whole(entry.shape)
    out = torch.empty(box.sizes, dtype=dtypes.BY_CODE[entry.dtype].torch_dtype)
    if box.numel == 0:
        return out
    plan = plan_restore(
        m,
        [Request(key, box)],
        verify=options.verify,
        max_gap_bytes=options.gap_bytes(local=storage.is_local),
        read_chunk_bytes=options.chunk_bytes(local=storage.is_local),
    )
    executor.read_plan(
        storage,
        plan,
        [executor.byte_view(out)],
        num_threads=options.num_threads,
        max_inflight_bytes=options.max_inflight_bytes,
    )
    return out


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


def parse_size(text: str | int) -> int:
    """``5GB`` (10**9), ``5GiB`` (2**30), ``512MB``, ``1000`` -> bytes (at least 1)."""
    if isinstance(text, int):
        n = text
    else:
        match = _SIZE_RE.fullmatch(text)
        if match is None:
            raise ValueError(f"not a size: {text!r}; expected e.g. 5GB, 500MiB or a number of bytes")
        value, unit, binary = match.groups()
        power = "KMGTP".find(unit.upper()) + 1 if unit else 0
        n = int(float(value) * ((1024 if binary else 1000) ** power))
    if n < 1:
        raise ValueError(f"a size must be at least 1 byte, got {text!r}")
    return n
