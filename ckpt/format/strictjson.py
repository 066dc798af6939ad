"""Strict JSON decoding for everything ckpt reads from storage (manifests, headers, hints).

Python's ``json`` accepts NaN/Infinity (and ``1e400``, which overflows to infinity), keeps the
last of duplicate keys, decodes lone UTF-16 surrogates (``"\\ud800"``) into strings that cannot
be encoded again, and recurses without bound; ckpt accepts none of that. Every failure is the
error class the caller names.

Pure (no I/O).
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any, NoReturn

from ckpt import _collector as collector

_SHOW_ITEMS = 6  # items of a list/object shown in a message
_SHOW_DEPTH = 3  # levels of nesting shown in a message


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows to infinity")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # C speed; a duplicate shows as a shorter dict
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k[:200]!r}")
            seen.add(k)
    return out


_GC_PAUSE_FROM = 64 << 10  # bytes of JSON


def loads(data: bytes, *, what: str, error: type[Exception], max_bytes: int) -> Any:
    """Decode ``data`` as one strict JSON value, or raise ``error`` naming ``what``."""
    if len(data) > max_bytes:
        raise error(f"{what}: {len(data)} bytes is over the {max_bytes}-byte cap")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{what}: not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        with collector.paused(len(data) > _GC_PAUSE_FROM):
            value = json.loads(
                text, parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_no_duplicates
            )
    except RecursionError:
        raise error(f"{what}: JSON nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, our hooks, the int digit limit
        raise error(f"{what}: invalid JSON: {err}") from None
    # Only a \u escape can produce a surrogate (UTF-8 input cannot): look only when one is there.
    if b"\\ud" in data or b"\\uD" in data:
        bad = _lone_surrogate(value)
        if bad is not None:
            raise error(f"{what}: invalid JSON: string {show(bad)} holds a lone UTF-16 surrogate")
    return value


def _lone_surrogate(value: Any) -> str | None:
    """The first string (key or value) in ``value`` that is not valid Unicode, if any."""
    stack = [value]
    while stack:
        v = stack.pop()
        strings: list[Any]
        if isinstance(v, dict):
            strings = list(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            strings = []
            stack.extend(v)
        else:
            strings = [v]
        for s in strings:
            if isinstance(s, str):
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError:
                    return s
    return None


def deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists/objects more than ``limit`` levels deep (iterative)."""
    level = [value] if isinstance(value, _CONTAINERS) else []
    depth = 1
    while level:  # the containers ``depth`` levels down, one level at a time
        if depth > limit:
            return True
        below: list[Any] = []
        for v in level:  # a list comprehension: half the time of a generator fed to extend
            below += [c for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, _CONTAINERS)]
        level, depth = below, depth + 1
    return False


_CONTAINERS = (dict, list)


def show(value: Any, limit: int = 80) -> str:
    """A short JSON rendering of a decoded value for error messages: bounded in length and
    depth whatever the input (a hostile value may be huge or deeply nested)."""
    out = _show(value, _SHOW_DEPTH, limit)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _show(v: Any, depth: int, limit: int) -> str:
    if isinstance(v, dict | list):
        if not v:
            return "{}" if isinstance(v, dict) else "[]"
        if depth == 0:
            return "{...}" if isinstance(v, dict) else "[...]"
        if isinstance(v, dict):
            items = [f"{_show(k, 0, limit)}: {_show(x, depth - 1, limit)}" for k, x in itertools.islice(v.items(), _SHOW_ITEMS)]
        else:
            items = [_show(x, depth - 1, limit) for x in v[:_SHOW_ITEMS]]
        more = ", ..." if len(v) > _SHOW_ITEMS else ""
        body = ", ".join(items) + more
        return "{" + body + "}" if isinstance(v, dict) else "[" + body + "]"
    if isinstance(v, str):
        v = v[:limit]
    try:
        return json.dumps(v, ensure_ascii=True)
    except (ValueError, TypeError):  # non-finite floats, over-long ints, non-JSON objects
        return f"<{type(v).__name__}>"


def dumps(value: Any) -> bytes:
    """Compact, deterministic (key order preserved), NaN-free UTF-8 JSON."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
