"""State trees: flatten nested training state into tensors, plain objects and a skeleton.

A state is nested dicts, lists and tuples whose leaves are tensors (``torch.Tensor``,
``numpy.ndarray``) or plain data. :func:`flatten` splits it into

- ``tensors``: key -> tensor leaf, written to safetensors shards;
- ``objects``: key -> a tagged JSON value for each maximal subtree holding no tensor;
- ``tree``: the container skeleton, whose leaves reference the two maps by key,

so that :func:`unflatten` gives back exactly the structure and types that were saved. Keys are
``/``-joined path segments with ``~`` escaped as ``~0`` and ``/`` as ``~1`` (JSON Pointer style);
``state["model"]["fc.weight"]`` has key ``model/fc.weight``.

Pure (no I/O).
"""

from __future__ import annotations

import base64
import math
import re
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ckpt.errors import ManifestSchemaError, MissingKeyError, StateError, TargetMismatchError
from ckpt.format import strictjson
from ckpt.state.shard import Shard, is_dtensor

if TYPE_CHECKING:
    import torch

Json = Any  # a JSON-able value (dict/list/str/int/float/bool/None)
MAX_NESTING = 128  # JSON levels in the tree and in each object; the manifest parser enforces it too
_MAX_SAFE_INT = 2**53  # ints at or beyond this are tagged, so any JSON reader keeps them exact
_NP_KINDS = frozenset("biuf")  # numpy scalar kinds we store: bool, int, uint, float
_NP_DTYPES = frozenset(
    np.dtype(t).str for t in ("?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")
)
_INT_RE = re.compile(r"-?[0-9]{1,4300}")
_HEX16_RE = re.compile(r"[0-9a-f]{16}")


def escape(segment: str) -> str:
    return segment.replace("~", "~0").replace("/", "~1")


def join(prefix: str, segment: object) -> str:
    s = escape(str(segment))
    return s if not prefix else f"{prefix}/{s}"


@dataclass(frozen=True, slots=True)
class Flat:
    tensors: dict[str, torch.Tensor | Shard]  # plain tensors, Shards and DTensors
    ndarray_keys: frozenset[str]  # tensors that were numpy arrays
    objects: dict[str, Json]
    tree: Json


# --- plain values ------------------------------------------------------------------------------


def encode_value(value: object, path: str) -> Json:
    """Encode plain data as tagged JSON; refuse anything else naming ``path``."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _text(value, path)
    if isinstance(value, np.generic):
        if value.dtype.kind not in _NP_KINDS or value.dtype.itemsize > 8:
            raise StateError(f"key {path!r}: numpy scalar of dtype {value.dtype} cannot be saved")
        return {"$np": [value.dtype.str, encode_value(value.item(), path)]}
    if type(value) is int:
        if -_MAX_SAFE_INT < value < _MAX_SAFE_INT:
            return value
        try:
            return {"$int": str(value)}
        except ValueError:  # over Python's int/str digit limit
            raise StateError(f"key {path!r}: an int of more than 4300 digits cannot be saved") from None
    if type(value) is float:
        if math.isfinite(value) and not (value == 0.0 and math.copysign(1.0, value) < 0):
            return value
        return {"$f64": struct.pack(">d", value).hex()}
    if type(value) is bytes:
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if type(value) is list:
        return [encode_value(v, join(path, i)) for i, v in enumerate(value)]
    if type(value) is tuple:
        return {"$tuple": [encode_value(v, join(path, i)) for i, v in enumerate(value)]}
    if type(value) is dict:
        return {"$dict": [[_encode_key(k, path), encode_value(v, join(path, k))] for k, v in value.items()]}
    if type(value) is OrderedDict:
        return {"$odict": [[_encode_key(k, path), encode_value(v, join(path, k))] for k, v in value.items()]}
    raise StateError(
        f"key {path!r}: a {type(value).__module__}.{type(value).__qualname__} cannot be saved; "
        "ckpt stores tensors, numpy arrays and plain data (None, bool, int, float, str, bytes, "
        "list, tuple, dict with str or int keys). Convert it (e.g. to its state_dict()) first."
    )


def _text(s: str, path: str) -> str:
    """``s`` if it is Unicode text; a lone surrogate ("\\ud800", e.g. from ``os.fsdecode``)
    cannot be written as UTF-8 JSON, and would fail later with a bare UnicodeEncodeError."""
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as err:
            raise StateError(
                f"key {path!r}: the string {s[:40]!r} holds a lone UTF-16 surrogate at index {err.start}; "
                "only Unicode text can be saved"
            ) from None
    return s


def _encode_key(k: object, path: str) -> Json:
    if type(k) is str:
        return _text(k, path)
    if type(k) is int:
        return encode_value(k, path)
    raise StateError(f"key {path!r}: dict key {k!r} of type {type(k).__name__}; only str and int keys can be saved")


def decode_value(j: Json, where: str) -> object:
    """Decode a tagged JSON value; malformed input is a ManifestSchemaError naming ``where``."""
    if j is None or isinstance(j, bool | str | float):
        return j
    if type(j) is int:
        return j
    if isinstance(j, list):
        return [decode_value(v, where) for v in j]
    if not isinstance(j, dict) or len(j) != 1:
        raise ManifestSchemaError(f"{where}: malformed tagged value {str(j)[:80]!r}")
    (tag, body), = j.items()
    try:
        if tag == "$int" and isinstance(body, str) and _INT_RE.fullmatch(body):
            return int(body)
        if tag == "$f64" and isinstance(body, str) and _HEX16_RE.fullmatch(body):
            return float(struct.unpack(">d", bytes.fromhex(body))[0])
        if tag == "$bytes" and isinstance(body, str):
            return base64.b64decode(body, validate=True)
        if tag == "$tuple" and isinstance(body, list):
            return tuple(decode_value(v, where) for v in body)
        if tag == "$np" and isinstance(body, list) and len(body) == 2 and body[0] in _NP_DTYPES:
            # What the writer stores: the scalar's exact ``.item()``, a bool, int or float as
            # the dtype's kind says. Anything else (1e300 as float16, 1.5 as int64) is not a
            # saved value: refused, not rounded (nor warned about) into another one.
            inner = decode_value(body[1], where)
            dt = np.dtype(body[0])
            if type(inner) is {"b": bool, "i": int, "u": int, "f": float}[dt.kind]:
                with np.errstate(all="ignore"):
                    scalar = dt.type(cast("float", inner))
                if scalar.item() == inner or (type(inner) is float and math.isnan(inner)):
                    return scalar
        if tag in ("$dict", "$odict") and isinstance(body, list):
            out: dict[object, object] = {} if tag == "$dict" else OrderedDict()
            for pair in body:
                if not (isinstance(pair, list) and len(pair) == 2):
                    break
                k = decode_value(pair[0], where)
                if type(k) not in (str, int) or k in out:
                    break
                out[k] = decode_value(pair[1], where)
            else:
                return out
    except (ValueError, TypeError, OverflowError, struct.error) as err:
        raise ManifestSchemaError(f"{where}: malformed {tag} value: {err}") from err
    raise ManifestSchemaError(f"{where}: malformed tagged value {str(j)[:80]!r}")


# --- flatten -----------------------------------------------------------------------------------


def _is_torch_tensor(x: object) -> bool:
    # A torch.Tensor exists only once torch is imported: reading manifests (the ``ckpt`` command
    # line) imports this module and must not pay for torch.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_tensor_leaf(x: object) -> bool:
    return isinstance(x, np.ndarray | Shard) or _is_torch_tensor(x)


def _holds_tensor(x: object) -> bool:
    if _is_tensor_leaf(x):
        return True
    if isinstance(x, list | tuple) and type(x) in (list, tuple):
        return any(_holds_tensor(v) for v in x)
    if isinstance(x, dict) and type(x) in (dict, OrderedDict):
        return any(_holds_tensor(v) for v in x.values())
    return False


def flatten(state: object) -> Flat:
    """Split ``state`` into tensors, objects and skeleton. Refuses unsaveable values by path."""
    if type(state) not in (dict, OrderedDict, list, tuple):
        raise StateError(f"the state must be a dict, list or tuple, got {type(state).__name__}")
    tensors: dict[str, torch.Tensor | Shard] = {}
    ndarrays: set[str] = set()
    objects: dict[str, Json] = {}
    seen_keys: set[str] = set()

    def visit(x: object, path: str) -> Json:
        if path in seen_keys:
            raise StateError(f"key {path!r} occurs twice (e.g. both 1 and '1' in one dict)")
        seen_keys.add(path)
        if isinstance(x, np.ndarray):
            tensors[path] = _ndarray_to_tensor(x, path)
            ndarrays.add(path)
            return {"ndarray": path}
        if isinstance(x, Shard):
            _check_tensor(x.tensor, path)
            tensors[path] = x
            return {"tensor": path}
        if is_dtensor(x):
            tensors[path] = x  # type: ignore[assignment]
            return {"tensor": path}
        if _is_torch_tensor(x):
            tensors[path] = _check_tensor(cast("torch.Tensor", x), path)
            return {"tensor": path}
        if not _holds_tensor(x):
            objects[path] = encode_value(x, path)
            if strictjson.deeper_than(objects[path], MAX_NESTING):
                raise StateError(f"key {path!r}: nested more than {MAX_NESTING} JSON levels deep; flatten it")
            return {"object": path}
        return container(x, path)

    def container(x: object, path: str) -> Json:
        if isinstance(x, dict):
            kind = "odict" if type(x) is OrderedDict else "dict"
            node = {kind: [[_encode_key(k, path), visit(v, join(path, k))] for k, v in x.items()]}
            meta = getattr(x, "_metadata", None)  # nn.Module.state_dict() versions, as torch.save keeps
            if kind == "odict" and meta is not None:
                node["metadata"] = encode_value(meta, join(path, "_metadata"))
            return node
        kind = "list" if type(x) is list else "tuple"
        return {kind: [visit(v, join(path, i)) for i, v in enumerate(cast("list[object]", x))]}

    tree = container(state, "")
    if strictjson.deeper_than(tree, MAX_NESTING):
        deepest = max(seen_keys, key=lambda k: k.count("/"))
        raise StateError(
            f"key {deepest!r}: the state nests containers more than {MAX_NESTING} JSON levels deep "
            "(about 40 dicts); flatten it"
        )
    return Flat(tensors, frozenset(ndarrays), objects, tree)


def _check_tensor(t: torch.Tensor, path: str) -> torch.Tensor:
    import torch

    if t.layout != torch.strided:
        raise StateError(f"key {path!r}: {t.layout} tensors cannot be saved; call .to_dense() first")
    if t.is_quantized or t.device.type == "meta":
        raise StateError(f"key {path!r}: quantized and meta tensors cannot be saved")
    return t.detach()


def _ndarray_to_tensor(a: np.ndarray, path: str) -> torch.Tensor:
    if a.dtype.kind not in "biufc" or a.dtype.byteorder == ">":
        raise StateError(f"key {path!r}: numpy arrays of dtype {a.dtype} cannot be saved")
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))


# --- select and unflatten ----------------------------------------------------------------------


@dataclass
class Selection:
    """What a restore target asks for: tensor keys (with in-place destinations) and objects."""

    tensor_keys: list[str] = field(default_factory=list)
    destinations: dict[str, torch.Tensor | np.ndarray | Shard] = field(default_factory=dict)


def _children(node: Json, where: str) -> list[tuple[object, Json]]:
    kind, body = next(iter(node.items()))
    if kind in ("dict", "odict"):
        return [(k if type(k) is str else decode_value(k, where), child) for k, child in body]
    return list(enumerate(body))


SHORT_LEAVES = {"t": "tensor", "n": "ndarray", "o": "object"}  # format v2: a leaf whose key is its path


def walk(
    node: Json,
    target: object,
    path: str,
    sel: Selection,
    build: Callable[[str, str, object], object] | None = None,
    check: Callable[[Json, str, int], None] | None = None,
    depth: int = 0,
) -> object:
    """Match ``target`` against the skeleton ``node``.

    With ``build`` None, fills ``sel`` with the tensor keys the target asks for. With ``build``
    set, returns the restored structure; ``build(kind, key, target_leaf)`` gives each leaf.
    ``check(node, path, depth)`` checks each node visited, before it is used (a tree that was
    not checked whole: a format v2 manifest read in part). A v2 short leaf (``"t"``, ``"n"``,
    ``"o"``) has its path as its key.
    """
    if check is not None:
        check(node, path, depth)
    short = SHORT_LEAVES.get(node) if type(node) is str else None
    kind = short or next(iter(node))
    if kind in ("tensor", "ndarray", "object"):
        key = path if short else node[kind]
        if kind == "object":
            if build is None:
                return None
            value = build("object", key, None)
            return _select_plain(value, target, key) if isinstance(target, dict | list | tuple) else value
        if target is not None and not _is_tensor_leaf(target):
            raise TargetMismatchError(f"key {key!r}: saved a tensor, target holds {type(target).__name__}")
        if build is None:
            sel.tensor_keys.append(key)
            if target is not None:
                sel.destinations[key] = target  # type: ignore[assignment]
            return None
        return build(kind, key, target)
    children = _children(node, path)
    if target is None:
        out = [(k, walk(child, None, join(path, k), sel, build, check, depth + 1)) for k, child in children]
    else:
        mapping = kind in ("dict", "odict")
        if (mapping and not isinstance(target, dict)) or (not mapping and type(target) not in (list, tuple)):
            raise TargetMismatchError(
                f"key {path or '<root>'!r}: saved a {kind}, target holds {type(target).__name__}"
            )
        index = dict(children)
        items = target.items() if isinstance(target, dict) else enumerate(cast("list[object]", target))
        out = []
        for k, sub in items:
            if k not in index:
                raise MissingKeyError(f"key {join(path, k)!r} is not in the checkpoint")
            out.append((k, walk(index[k], sub, join(path, k), sel, build, check, depth + 1)))
        if not mapping and len(out) != len(children):
            raise TargetMismatchError(f"key {path or '<root>'!r}: saved {len(children)} items, target has {len(out)}")
    if build is None:
        return None
    if kind == "dict":
        return dict(out)
    if kind == "odict":
        od: OrderedDict[object, object] = OrderedDict(out)
        if "metadata" in node:
            od._metadata = decode_value(node["metadata"], path)  # type: ignore[attr-defined]
        return od
    values = [v for _, v in out]
    return values if kind == "list" else tuple(values)


def _select_plain(value: object, target: object, path: str) -> object:
    if isinstance(target, dict) and isinstance(value, dict):
        missing = [k for k in target if k not in value]
        if missing:
            raise MissingKeyError(f"key {join(path, missing[0])!r} is not in the checkpoint")
        return {k: _select_plain(value[k], t, join(path, k)) for k, t in target.items()}
    return value


# --- merging the skeletons of several writers ------------------------------------------------


def merge(a: Json, b: Json, path: str = "") -> Json:
    """Union of two writers' skeletons: containers merge by key (``a``'s order first); where both
    have a leaf, ``a``'s wins (the lower rank's). Structural conflicts are a PlanError-worthy
    ValueError naming the key path."""
    ka, kb = next(iter(a)), next(iter(b))
    if ka != kb:
        raise ValueError(f"key {path or '<root>'!r} is a {ka} on one writer and a {kb} on another")
    if ka in ("tensor", "ndarray", "object"):
        return a
    if ka in ("dict", "odict"):
        index = {_key_token(k): i for i, (k, _) in enumerate(a[ka])}
        items = [list(pair) for pair in a[ka]]
        for k, child in b[kb]:
            i = index.get(_key_token(k))
            if i is None:
                index[_key_token(k)] = len(items)
                items.append([k, child])
            else:
                items[i][1] = merge(items[i][1], child, join(path, decode_value(k, path)))
        out = {ka: items}
        if "metadata" in a:
            out["metadata"] = a["metadata"]
        return out
    if len(a[ka]) != len(b[kb]):
        raise ValueError(f"key {path or '<root>'!r}: a {ka} of {len(a[ka])} items on one writer, {len(b[kb])} on another")
    return {ka: [merge(x, y, join(path, i)) for i, (x, y) in enumerate(zip(a[ka], b[kb], strict=True))]}


def _key_token(k: Json) -> str:
    return repr(k)


LEAF_KINDS = ("tensor", "ndarray", "object")  # a leaf's body is the key of its entry


def child_nodes(node: Json) -> list[Json]:
    """The children of a skeleton node ``{kind: body}``, in order: a ``dict`` or ``odict``
    body holds ``[key, node]`` pairs, a ``list`` or ``tuple`` body the nodes; a leaf (or an
    unknown kind) has none. For skeletons ckpt wrote or the manifest parser accepted."""
    kind, body = next(iter(node.items()))
    if kind in ("dict", "odict"):
        return [child for _, child in body]
    if kind in ("list", "tuple"):
        return list(body)
    return []


def references(node: Json) -> list[tuple[str, str]]:
    """``(kind, key)`` of every leaf of a skeleton."""
    out: list[tuple[str, str]] = []
    stack = [node]
    while stack:
        n = stack.pop()
        kind, body = next(iter(n.items()))
        if kind in LEAF_KINDS:
            out.append((kind, body))
        else:
            stack.extend(child_nodes(n))
    return out
