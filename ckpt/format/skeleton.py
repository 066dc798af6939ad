"""Validation of a manifest's ``tree``: the skeleton of the saved state.

Each node is a one-member object ``{kind: body}`` (see ckpt.state.tree): a leaf (``tensor``,
``ndarray``, ``object``) whose body names an entry of ``tensors`` or ``objects``, or a
container (``list``, ``tuple``: a list of nodes; ``dict``, ``odict``: a list of
``[key, node]`` pairs). :func:`check_tree` checks a parsed tree against the manifest's
entries before anything walks it. Pure (no I/O).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ckpt.errors import ManifestSchemaError
from ckpt.format import strictjson
from ckpt.state import tree

_show = strictjson.show


def fields(x: object) -> str:
    """The fields a hostile entry has, for a message (bounded)."""
    if not isinstance(x, dict):
        return _show(x)
    return str([k[:40] for k in sorted(x)[:8]])


_INT_KEY = re.compile(r"-?[0-9]+")


def _tree_key(k: object, where: str) -> object:
    """A dict key in the tree: a string, an integer, or an ``{"$int": "<digits>"}`` big integer."""
    if type(k) is str or type(k) is int:
        return k
    if isinstance(k, dict) and len(k) == 1 and isinstance(k.get("$int"), str) and _INT_KEY.fullmatch(k["$int"]):
        try:
            return int(k["$int"])
        except ValueError:  # over Python's int digit limit
            pass
    raise ManifestSchemaError(f"{where}: tree: dict key {_show(k)} is not a string or an integer")


SHORT_LEAVES = {"t": "tensor", "n": "ndarray", "o": "object"}  # format v2: a leaf whose key is its path
_MAX_LEVELS = tree.MAX_NESTING // 3  # a dict level is three JSON levels (node, body, pair)


def check_tree(node: object, tensors: Mapping[str, object], objects: Mapping[str, object], where: str) -> None:
    """Every node well formed, and every tensor and object referenced exactly once."""
    seen: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        kind, body = _own(n, where)
        if kind in tree.LEAF_KINDS:
            pool: Mapping[str, object] = objects if kind == "object" else tensors
            if body not in pool or body in seen:
                raise ManifestSchemaError(f"{where}: tree references {kind} {_show(body)} that is missing or repeated")
            seen.add(body)
        elif kind in ("list", "tuple"):
            stack.extend(body)
        else:
            stack.extend(pair[1] for pair in body)
    unreferenced = (tensors.keys() | objects.keys()) - seen
    if unreferenced:
        raise ManifestSchemaError(f"{where}: keys {[k[:40] for k in sorted(unreferenced)[:5]]} are not referenced by the tree")


def check_node(node: object, path: str, depth: int, *, where: str) -> None:
    """One node's own form, for a tree walked in part (a v2 manifest read lazily): its kind,
    members, body and, for a mapping, its pairs and their unique keys; its children are checked
    when they are visited, and a leaf's entry when it is read."""
    if depth > _MAX_LEVELS:
        raise ManifestSchemaError(f"{where}: tree: key {path[:200]!r} is nested more than {_MAX_LEVELS} levels deep")
    if isinstance(node, str):
        if node not in SHORT_LEAVES:
            raise ManifestSchemaError(f"{where}: tree: unknown leaf {_show(node)} at key {path[:200]!r}")
        return
    _own(node, where)


def _own(n: object, where: str) -> tuple[str, Any]:
    """A node's kind and body, the node's own form checked (not its children's)."""
    if not isinstance(n, dict) or not n:
        raise ManifestSchemaError(f"{where}: tree: malformed node {_show(n)}")
    kind, body = next(iter(n.items()))
    extra = set(n) - {kind}
    if extra - ({"metadata"} if kind == "odict" else set()):
        raise ManifestSchemaError(f"{where}: tree: unknown fields {fields(dict.fromkeys(extra))} in a {kind[:40]!r} node")
    if "metadata" in n:
        tree.decode_value(n["metadata"], f"{where}: tree metadata")
    if kind in tree.LEAF_KINDS:
        if not isinstance(body, str):
            raise ManifestSchemaError(f"{where}: tree references {kind} {_show(body)} that is missing or repeated")
    elif kind in ("list", "tuple") and isinstance(body, list):
        pass
    elif kind in ("dict", "odict") and isinstance(body, list):
        if _plain_pairs(body):
            return kind, body
        keys: set[tuple[type, object]] = set()
        for pair in body:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ManifestSchemaError(f"{where}: tree: malformed {kind} entry {_show(pair)}; expected [key, node]")
            k = _tree_key(pair[0], where)
            if (type(k), k) in keys:
                raise ManifestSchemaError(f"{where}: tree: key {_show(k)} appears twice in one {kind}")
            keys.add((type(k), k))
    else:
        raise ManifestSchemaError(f"{where}: tree: unknown or malformed node {_show(n)}")
    return kind, body


def _plain_pairs(body: list[Any]) -> bool:
    """The common mapping body, checked in a few whole-list passes: ``[str, node]`` pairs with
    unique keys (anything else goes through the checks that name what is wrong)."""
    if not all(type(p) is list and len(p) == 2 for p in body):
        return False
    keys = [p[0] for p in body]
    return all(type(k) is str for k in keys) and len(set(keys)) == len(keys)
