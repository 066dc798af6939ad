"""DCP's flattened names and ckpt's keys, both ways (docs/dcp.md).

DCP flattens a nested state dict into FQNs: the path of dict keys (as ``str``) and list indices
(as ``int``) joined with ``.`` (``{"model": {"fc.weight": t}}`` gives ``model.fc.weight``), and
its default planners keep the path of every FQN (``planner_data``). ckpt keys the same leaf by
its path, each segment escaped and joined with ``/`` (``model/fc.weight``, FORMAT.md 8.3).

- Saving: a leaf's ckpt key comes from its path (from the plan's ``planner_data``; an FQN
  without one is a path of one segment), and the manifest's ``tree`` is built from every path,
  so ``ckpt.restore`` gives back the nested structure, lists included.
- Loading: the manifest's tree is turned into the structure ``ckpt.restore`` would return (with
  stand-ins for tensors), and DCP's own flattening of that structure gives the FQNs the DCP load
  planner will ask for, whatever the torch version's flattening rules are.

Pure (no I/O).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)

from ckpt.dcp import _values
from ckpt.errors import PlanError
from ckpt.format import dtypes
from ckpt.format.manifest import Manifest
from ckpt.state import tree

Path = tuple[str | int, ...]


def paths(planner_data: object) -> dict[str, Path]:
    """The FQN -> path map a DCP planner keeps (``DefaultSavePlanner``'s ``mappings``), or an
    empty one when ``planner_data`` is something else (a planner that does not flatten)."""
    if not isinstance(planner_data, Mapping):
        return {}
    out: dict[str, Path] = {}
    for fqn, path in planner_data.items():
        if not (isinstance(fqn, str) and isinstance(path, tuple) and path):
            return {}
        if not all(type(p) in (str, int) for p in path):
            return {}
        out[fqn] = path
    return out


def path_of(fqn: str, known: Mapping[str, Path]) -> Path:
    return known.get(fqn, (fqn,))


def key_of(path: Path) -> str:
    """The ckpt key of a leaf at ``path`` (the segments escaped and joined with ``/``)."""
    key = ""
    for segment in path:
        key = tree.join(key, segment)
    return key


@dataclass
class _Node:
    children: dict[str | int, _Node | tuple[str, str]]  # segment -> node or (leaf kind, key)


def build_tree(leaves: Iterable[tuple[Path, str, str]]) -> tree.Json:
    """The skeleton (FORMAT.md 8.1) holding every ``(path, kind, key)`` leaf: a container whose
    segments are the ints ``0 .. n-1`` is a list, any other a dict."""
    root = _Node({})
    for path, kind, key in leaves:
        node = root
        for i, segment in enumerate(path):
            last = i == len(path) - 1
            child = node.children.get(segment)
            if last and child is None:
                node.children[segment] = (kind, key)
            elif not last and child is None:
                child = node.children[segment] = _Node({})
            if (last and child is not None) or (not last and not isinstance(child, _Node)):
                raise PlanError(f"key {key!r}: its path {list(path)} is both a value and a container of values")
            if not last:
                assert isinstance(child, _Node)
                node = child
    return _emit(root)


def _emit(node: _Node) -> tree.Json:
    def child(c: _Node | tuple[str, str]) -> tree.Json:
        return _emit(c) if isinstance(c, _Node) else {c[0]: c[1]}

    segments = list(node.children)
    if segments and all(type(s) is int for s in segments) and sorted(segments) == list(range(len(segments))):
        return {"list": [child(node.children[i]) for i in range(len(segments))]}
    return {"dict": [[s, child(c)] for s, c in node.children.items()]}


@dataclass(frozen=True)
class View:
    """A committed step as DCP sees it."""

    metadata: Metadata
    tensors: dict[str, str]  # FQN -> ckpt key
    values: dict[str, object]  # FQN -> the decoded non-tensor value (an Opaque for opaque bytes)
    unreadable: tuple[str, ...]  # FQNs DCP would ask for whole that hold tensors (a tuple of tensors)


def _holds_tensor(v: object) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, list | tuple):
        return any(_holds_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(_holds_tensor(x) for x in v.values())
    return False


def view(m: Manifest) -> View:
    """The DCP ``Metadata`` of manifest ``m``: one entry per FQN DCP's flattening gives the
    saved structure. A tensor is described as one chunk, the whole tensor: the reader serves any
    region of it from whatever shards hold it."""
    standins: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # the stand-ins stay alive, so their ids stay unique

    def build(kind: str, key: str, leaf: object) -> object:
        if kind == "object":
            return _values.decode(m.objects[key], key)
        t = torch.empty(0, device="meta")
        keep.append(t)
        standins[id(t)] = key
        return t

    structure = tree.walk(m.tree, None, "", tree.Selection(), build)
    if not isinstance(structure, dict):
        raise PlanError(f"step {m.step} holds a {type(structure).__name__} at its root; DCP loads dicts")
    flat, fqn_paths = flatten_state_dict(_values.keep_empty(structure))  # an empty dict is a value, as saved
    md: dict[str, Any] = {}
    tensors: dict[str, str] = {}
    values: dict[str, object] = {}
    unreadable: list[str] = []
    for fqn, v in flat.items():
        if isinstance(v, torch.Tensor) and id(v) in standins:
            key = standins[id(v)]
            entry = m.tensors[key]
            shape = torch.Size(entry.shape)
            chunk = ChunkStorageMetadata(offsets=torch.Size([0] * len(shape)), sizes=shape)
            props = TensorProperties(dtype=dtypes.BY_CODE[entry.dtype].torch_dtype)
            md[fqn] = TensorStorageMetadata(properties=props, size=shape, chunks=[chunk])
            tensors[fqn] = key
        elif _holds_tensor(v):
            unreadable.append(fqn)
        else:
            md[fqn] = BytesStorageMetadata()
            values[fqn] = {} if isinstance(v, _values.EmptyDict) else v
    return View(Metadata(state_dict_metadata=md, planner_data=dict(fqn_paths)), tensors, values, tuple(unreadable))
