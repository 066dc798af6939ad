"""DCP's non-tensor values as ckpt objects: typed JSON, never a pickle.

A value is stored as a format v1 tagged value (``ckpt.state.tree.encode_value``, FORMAT.md 8.2).
Types the tagged values do not have (``torch.dtype``, ``pathlib`` paths, ``argparse.Namespace``,
...) become an *envelope*: a dict ``{"$dcp": <type name>, "value": <plain value>}``, so the
manifest stays format v1 and ``ckpt.restore`` hands the envelope back as that plain dict. A
user's own dict holding a ``"$dcp"`` key is wrapped in a ``"dict"`` envelope, so an envelope is
never ambiguous. Opaque bytes (a DCP default planner's pickle, stored only on request) are the
``"opaque"`` envelope around a ``bytes`` value; decoding gives :class:`Opaque`, whose bytes ckpt
never unpickles.

Pure (no I/O).
"""

from __future__ import annotations

import argparse
import pathlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckpt.errors import StateError
from ckpt.format import strictjson
from ckpt.state import tree

TAG = "$dcp"


@dataclass(frozen=True, slots=True)
class Opaque:
    """Bytes a DCP planner made (a pickle, as DCP's default planners do): stored and handed back
    as they are, never decoded by ckpt."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EmptyDict:
    """Stands for an empty dict nested in a saved state: DCP's flattening drops empty dicts (no
    leaf below them), so :class:`ckpt.dcp.SavePlanner` saves each as this leaf, stored as the
    value ``{}`` and loaded back as ``{}``."""


def keep_empty(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` with every nested empty dict replaced by :class:`EmptyDict` (the containers
    above it copied, everything else the same object)."""

    def inner(v: object) -> object:
        if isinstance(v, dict):
            return type(v)((k, inner(x)) for k, x in v.items()) if v else EmptyDict()
        if type(v) is list:
            return [inner(x) for x in v]
        return v

    return type(value)((k, inner(x)) for k, x in value.items())


def _env(kind: str, value: object) -> dict[str, object]:
    return {TAG: kind, "value": value}


_PATHS: dict[type, str] = {
    pathlib.PurePosixPath: "pathlib.PurePosixPath",
    pathlib.PureWindowsPath: "pathlib.PureWindowsPath",
    pathlib.PosixPath: "pathlib.Path",
    pathlib.WindowsPath: "pathlib.Path",
}


def to_plain(value: object, key: str) -> object:
    """``value`` with every type the tagged values lack replaced by its envelope; refuses, naming
    ``key``, what has no typed form."""
    t = type(value)
    if value is None or t in (bool, int, float, str, bytes) or isinstance(value, np.generic):
        return value
    if isinstance(value, list) and t is list:
        return [to_plain(v, tree.join(key, i)) for i, v in enumerate(value)]
    if isinstance(value, tuple) and t is tuple:
        return tuple(to_plain(v, tree.join(key, i)) for i, v in enumerate(value))
    if isinstance(value, dict) and t in (dict, OrderedDict):
        plain = t((k, to_plain(v, tree.join(key, k))) for k, v in value.items())
        return _env("dict", plain) if TAG in plain else plain
    if isinstance(value, torch.dtype):
        return _env("torch.dtype", str(value).removeprefix("torch."))
    if isinstance(value, torch.device):
        return _env("torch.device", str(value))
    if isinstance(value, torch.Size):
        return _env("torch.Size", list(value))
    if t in _PATHS:
        return _env(_PATHS[t], str(value))
    if t is argparse.Namespace:
        return _env("argparse.Namespace", {k: to_plain(v, tree.join(key, k)) for k, v in vars(value).items()})
    if isinstance(value, set | frozenset) and t in (set, frozenset):
        return _env(t.__name__, [to_plain(v, tree.join(key, i)) for i, v in enumerate(value)])
    if isinstance(value, complex) and t is complex:
        return _env("complex", [value.real, value.imag])
    if isinstance(value, Opaque):
        return _env("opaque", value.data)
    if isinstance(value, EmptyDict):
        return {}
    raise StateError(
        f"key {key!r}: a {t.__module__}.{t.__qualname__} has no typed form in ckpt.dcp; it stores "
        "tensors, None, bool, int, float, str, bytes, list, tuple, dict, set, complex, torch.dtype, "
        "torch.device, torch.Size, pathlib paths and argparse.Namespace. Convert it first."
    )


def encode(value: object, key: str) -> tree.Json:
    """``value`` as a tagged JSON value (what the manifest's ``objects`` hold)."""
    return tree.encode_value(to_plain(value, key), key)


def _dtype(name: object) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dt


def _str(build: Callable[[str], object]) -> Callable[[object], object]:
    def make(v: object) -> object:
        if not isinstance(v, str):
            raise ValueError(f"{v!r} is not a string")
        return build(v)

    return make


def _items(build: Callable[[list[Any]], object]) -> Callable[[object], object]:
    def make(v: object) -> object:
        if not isinstance(v, list):
            raise ValueError(f"{v!r} is not a list")
        return build(v)

    return make


def _namespace(v: object) -> object:
    if not (isinstance(v, dict) and all(isinstance(k, str) for k in v)):
        raise ValueError("not a dict of str keys")
    return argparse.Namespace(**v)


def _complex(v: object) -> object:
    if not (isinstance(v, list) and len(v) == 2 and all(type(x) is float for x in v)):
        raise ValueError("not two floats")
    return complex(v[0], v[1])


def _opaque(v: object) -> object:
    if type(v) is not bytes:
        raise ValueError("not bytes")
    return Opaque(v)


def _dict(v: object) -> object:
    if not isinstance(v, dict):
        raise ValueError("not a dict")
    return v


_DECODERS: dict[str, Callable[[object], object]] = {
    "dict": _dict,
    "torch.dtype": _dtype,
    "torch.device": _str(torch.device),
    "torch.Size": _items(lambda v: torch.Size(v)),
    "pathlib.Path": _str(pathlib.Path),
    "pathlib.PurePosixPath": _str(pathlib.PurePosixPath),
    "pathlib.PureWindowsPath": _str(pathlib.PureWindowsPath),
    "argparse.Namespace": _namespace,
    "set": _items(set),
    "frozenset": _items(frozenset),
    "complex": _complex,
    "opaque": _opaque,
}


def from_plain(value: object, key: str) -> object:
    """The inverse of :func:`to_plain`: envelopes become their types again."""
    if isinstance(value, dict) and TAG in value:
        kind = value[TAG]
        make = _DECODERS.get(kind) if isinstance(kind, str) else None
        if make is None or set(value) != {TAG, "value"}:
            raise StateError(f"key {key!r}: {strictjson.show(kind)} is not a ckpt.dcp value envelope")
        try:
            return make(_inside(value["value"], key))
        except (ValueError, TypeError) as err:
            raise StateError(f"key {key!r}: malformed {kind} envelope: {err}") from None
    return _inside(value, key)


def _inside(value: object, key: str) -> object:
    """``value`` with its items decoded (the container itself is not an envelope)."""
    if isinstance(value, dict):
        return type(value)((k, from_plain(v, tree.join(key, k))) for k, v in value.items())
    if isinstance(value, list):
        return [from_plain(v, tree.join(key, i)) for i, v in enumerate(value)]
    if type(value) is tuple:
        return tuple(from_plain(v, tree.join(key, i)) for i, v in enumerate(value))
    return value


def decode(j: tree.Json, key: str) -> object:
    """A tagged JSON value back to the Python value :func:`encode` was given."""
    return from_plain(tree.decode_value(j, f"object {key!r}"), key)
