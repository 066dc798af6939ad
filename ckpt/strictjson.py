"""Strict JSON decoding for everything ckpt reads from storage (manifests, headers, hints).

Python's ``json`` accepts NaN/Infinity, keeps the last of duplicate keys and recurses without
bound; ckpt accepts none of that. Every failure is the error class the caller names.

Pure (no I/O).
"""

from __future__ import annotations

import json
from typing import Any, NoReturn


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def loads(data: bytes, *, what: str, error: type[Exception], max_bytes: int) -> Any:
    """Decode ``data`` as one strict JSON value, or raise ``error`` naming ``what``."""
    if len(data) > max_bytes:
        raise error(f"{what}: {len(data)} bytes is over the {max_bytes}-byte cap")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{what}: not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise error(f"{what}: JSON nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, our hooks, int digit limit
        raise error(f"{what}: invalid JSON: {err}") from None


def dumps(value: Any) -> bytes:
    """Compact, deterministic (key order preserved), NaN-free UTF-8 JSON."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
