"""Format v2: the manifest as lines, so that a reader can read it in part (FORMAT.md 4.8).

One file, still the single create-only commit point. Line 1 is the **head**: the v1 top-level
fields without ``tensors``, ``objects`` and ``tree``, plus ``summary`` (counts) and
``sections`` (where each later line is, with its CRC32C); it is sealed by ``manifest_crc32c``
exactly as a v1 manifest is. The lines after it are the **body**: the ``tree`` (leaves whose key
is their path written as ``"t"``, ``"n"`` or ``"o"``), the ``objects``, then the tensor entries
in **pages** of at most :data:`PAGE_KEYS` keys, in key order (each page a v1 ``tensors`` map).

``ckpt ls`` reads the head only; a restore of a few keys decodes the tree, the objects and the
pages that hold those keys (:class:`LazyTensors`); anything that uses every tensor validates
every page together, with every v1 check. Pure (no I/O).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import crc32c

from ckpt.errors import (
    ManifestChecksumError,
    ManifestParseError,
    ManifestSchemaError,
)
from ckpt.format import strictjson
from ckpt.state import tree as tree_mod

PAGE_KEYS = 64  # tensor entries per page: a few keys decode ~PAGE_KEYS entries each
PAGED_FROM = 1024  # tensors: a manifest with fewer is written as one v1 JSON document
LEAF_CODES = {"tensor": "t", "ndarray": "n", "object": "o"}
_LEAF_KINDS = {v: k for k, v in LEAF_CODES.items()}
_SHOW = strictjson.show
Json = Any


# --- the tree's short leaves -------------------------------------------------------------------


def compact_tree(node: Json, path: str) -> Json:
    """The v2 form of a v1 tree: a leaf whose key is its path (FORMAT.md 8.3) becomes its kind's
    letter; any other node is kept, its children compacted."""
    kind = next(iter(node))
    if kind in LEAF_CODES:
        return LEAF_CODES[kind] if node[kind] == path else node
    body = node[kind]
    if kind in ("dict", "odict"):
        out: dict[str, Any] = {kind: [[k, compact_tree(c, tree_mod.join(path, _key(k)))] for k, c in body]}
        if "metadata" in node:
            out["metadata"] = node["metadata"]
        return out
    return {kind: [compact_tree(c, tree_mod.join(path, i)) for i, c in enumerate(body)]}


def _key(k: Json) -> object:
    """A tree dict key as the writer joined it into paths (an ``$int`` is its integer)."""
    if isinstance(k, dict) and isinstance(k.get("$int"), str):
        try:
            return int(k["$int"])
        except ValueError:
            return k
    return k


def expand_tree(node: Json, path: str, where: str, depth: int = 0) -> Json:
    """The v1 form of a v2 tree: each letter leaf becomes ``{kind: path}``. Malformed nodes are
    left for the tree check (``ckpt.format.skeleton``) to name, except a letter that is not one."""
    if isinstance(node, str):
        kind = _LEAF_KINDS.get(node)
        if kind is None:
            raise ManifestSchemaError(f"{where}: tree: unknown leaf {_SHOW(node)} at key {path[:200]!r}")
        return {kind: path}
    if not isinstance(node, dict) or not node or depth > tree_mod.MAX_NESTING:
        return node
    kind, body = next(iter(node.items()))
    if kind in ("dict", "odict") and isinstance(body, list):
        kids: list[Any] = []
        for pair in body:
            if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str | int | dict):
                pair = [pair[0], expand_tree(pair[1], tree_mod.join(path, _key(pair[0])), where, depth + 1)]
            kids.append(pair)
        return {**node, kind: kids}
    if kind in ("list", "tuple") and isinstance(body, list):
        return {kind: [expand_tree(c, tree_mod.join(path, i), where, depth + 1) for i, c in enumerate(body)]}
    return node


# --- writing --------------------------------------------------------------------------------------


def encode(fields: dict[str, Any]) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """The v2 file of the v1-shaped manifest ``fields`` (unsealed; its ``format_version`` is
    replaced by 2): the bytes, the sealed head value, and the tensors map in page order."""
    from ckpt.format.manifest import sealed

    tensors: dict[str, Any] = fields["tensors"]
    keys = sorted(tensors)
    lines = [strictjson.dumps(compact_tree(fields["tree"], "")), strictjson.dumps(fields["objects"])]
    first: list[str] = []
    for i in range(0, len(keys), PAGE_KEYS):
        page = keys[i : i + PAGE_KEYS]
        first.append(page[0])
        lines.append(strictjson.dumps({k: tensors[k] for k in page}))
    bounds: list[int] = []
    crcs: list[int] = []
    at = 0
    for line in lines:
        bounds += [at, at + len(line)]
        crcs.append(crc32c.crc32c(line))
        at += len(line) + 1
    head = {k: v for k, v in fields.items() if k not in ("tensors", "objects", "tree")}
    head["format_version"] = max(2, fields["format_version"])  # v3: v2's lines, with content hashes
    head["summary"] = {"tensors": len(keys), "objects": len(fields["objects"])}
    head["sections"] = {
        "tree": [bounds[0], bounds[1], crcs[0]],
        "objects": [bounds[2], bounds[3], crcs[1]],
        "pages": {"first": first, "bounds": bounds[4:], "crc32c": crcs[2:]},
    }
    raw, head_value = sealed(head)
    data = b"\n".join([raw, *lines]) + b"\n"
    return data, head_value, {k: tensors[k] for k in keys}


# --- reading --------------------------------------------------------------------------------------


def split(data: bytes) -> tuple[bytes, memoryview]:
    """The head line and the body of a v2 file (the head has no newline: it is compact JSON)."""
    nl = data.find(b"\n")
    if nl < 0:
        return data, memoryview(b"")
    return data[:nl], memoryview(data)[nl + 1 :]


class Sections:
    """The checked ``sections`` of a head: where the tree, the objects and each page are."""

    def __init__(self, raw: object, summary: object, body_size: int | None, where: str) -> None:
        self.where = where
        if not isinstance(summary, dict) or summary.keys() != {"tensors", "objects"} or not all(
            type(v) is int and 0 <= v < 2**63 for v in summary.values()
        ):
            raise ManifestSchemaError(f"{where}: summary must be {{'tensors': n, 'objects': n}}, found {_SHOW(summary)}")
        self.num_tensors: int = summary["tensors"]
        self.num_objects: int = summary["objects"]
        if not isinstance(raw, dict) or raw.keys() != {"tree", "objects", "pages"}:
            raise ManifestSchemaError(f"{where}: sections must hold exactly tree, objects, pages; found {_SHOW(raw)}")
        pages = raw["pages"]
        if not isinstance(pages, dict) or pages.keys() != {"first", "bounds", "crc32c"}:
            raise ManifestSchemaError(f"{where}: sections.pages must hold first, bounds, crc32c; found {_SHOW(pages)}")
        first, bounds, crcs = pages["first"], pages["bounds"], pages["crc32c"]
        n = len(first) if isinstance(first, list) else -1
        if n < 0 or not all(type(k) is str for k in first) or any(a >= b for a, b in itertools.pairwise(first)):
            raise ManifestSchemaError(f"{where}: sections.pages.first must be strings in increasing order")
        if n != -(-self.num_tensors // PAGE_KEYS) if self.num_tensors else n != 0:
            raise ManifestSchemaError(
                f"{where}: {n} pages for {self.num_tensors} tensors; expected pages of {PAGE_KEYS} keys"
            )
        spans: list[object] = [raw["tree"], raw["objects"]]
        if not isinstance(bounds, list) or not isinstance(crcs, list) or len(bounds) != 2 * n or len(crcs) != n:
            raise ManifestSchemaError(f"{where}: sections.pages: {n} pages need {2 * n} bounds and {n} crc32c values")
        spans += [[bounds[2 * i], bounds[2 * i + 1], crcs[i]] for i in range(n)]
        at = 0
        self.spans: list[tuple[int, int, int]] = []
        for i, span in enumerate(spans):
            name = ("tree", "objects")[i] if i < 2 else f"page {i - 2}"
            if not (isinstance(span, list) and len(span) == 3 and all(type(v) is int for v in span)):
                raise ManifestSchemaError(f"{where}: sections: {name} must be [start, end, crc32c], found {_SHOW(span)}")
            start, end, crc = span
            if start != at or end < start or not 0 <= crc < 2**32:
                raise ManifestSchemaError(
                    f"{where}: sections: {name} is [{start}, {end}) with crc32c {crc}; expected it to start at "
                    f"byte {at} of the body (each section follows the last and its newline)"
                )
            self.spans.append((start, end, crc))
            at = end + 1
        if body_size is not None and at != body_size:
            raise ManifestSchemaError(
                f"{where}: the head places {at} bytes of sections after it, but the file holds {body_size}"
            )
        self.first: list[str] = first

    def decode(self, body: memoryview, i: int, what: str) -> Json:
        """Section ``i`` (0 tree, 1 objects, 2+ pages) checked against its CRC32C and decoded."""
        start, end, crc = self.spans[i]
        piece = body[start:end]
        if bytes(body[end : end + 1]) != b"\n":
            raise ManifestParseError(f"{self.where}: {what} is not followed by a newline")
        actual = crc32c.crc32c(piece)
        if actual != crc:
            raise ManifestChecksumError(
                f"{self.where}: {what} has crc32c {actual:08x} but the head records {crc:08x}; the manifest "
                "was damaged after it was written"
            )
        return strictjson.loads(bytes(piece), what=f"{self.where}: {what}", error=ManifestParseError, max_bytes=len(piece))

    def check_pages(self, body: memoryview) -> None:
        """Every page's CRC32C (the bytes are checked at open; the entries when used)."""
        for i, (start, end, crc) in enumerate(self.spans[2:]):
            actual = crc32c.crc32c(body[start:end])
            if actual != crc:
                raise ManifestChecksumError(
                    f"{self.where}: page {i} has crc32c {actual:08x} but the head records {crc:08x}; the "
                    "manifest was damaged after it was written"
                )

    def page(self, body: memoryview, i: int) -> dict[str, Any]:
        """Page ``i``'s tensor entries, their keys checked to be in order and in the page's range."""
        raw = self.decode(body, i + 2, f"page {i}")
        if not isinstance(raw, dict) or not raw or len(raw) > PAGE_KEYS:
            raise ManifestSchemaError(f"{self.where}: page {i} must map 1 to {PAGE_KEYS} keys to tensor entries")
        keys = list(raw)
        hi = self.first[i + 1] if i + 1 < len(self.first) else None
        full = len(keys) == PAGE_KEYS or i + 1 == len(self.first)
        if keys[0] != self.first[i] or (hi is not None and keys[-1] >= hi) or keys != sorted(keys) or not full:
            raise ManifestSchemaError(
                f"{self.where}: page {i}: keys {_SHOW(keys[:3])}... are not the sorted keys from "
                f"{self.first[i][:200]!r} (pages of {PAGE_KEYS} keys, in key order)"
            )
        return raw

    def page_of(self, key: str) -> int:
        return bisect.bisect_right(self.first, key) - 1


class LazyTensors(Mapping[str, Any]):
    """A v2 manifest's tensors, validated when asked for: :meth:`load` decodes only the pages
    that hold the keys and validates those entries (every per-tensor check; overlaps among
    them); asking for every key (or iterating) validates all pages together with every check
    of a v1 manifest, the tree's references included."""

    def __init__(self, sections: Sections, body: memoryview, check: Any) -> None:
        self._s, self._body, self._check = sections, body, check  # check(raw map, full) -> entries
        self._pages: dict[int, dict[str, Any]] = {}
        self._done: dict[str, Any] = {}
        self._all: dict[str, Any] | None = None

    @property
    def loaded(self) -> bool:
        """Every entry validated (with the whole tree)."""
        return self._all is not None

    def _raw_page(self, i: int) -> dict[str, Any]:
        page = self._pages.get(i)
        if page is None:
            page = self._pages[i] = self._s.page(self._body, i)
        return page

    def _raw(self, key: str) -> Any:
        i = self._s.page_of(key)
        return None if i < 0 else self._raw_page(i).get(key)

    def load(self, keys: Iterable[str]) -> dict[str, Any]:
        """The validated entries of ``keys`` (a key the manifest does not hold is a
        ManifestSchemaError: the tree referenced it)."""
        if self._all is not None:
            return {k: self._entry_of_all(k) for k in keys}
        wanted = list(dict.fromkeys(keys))
        if len(wanted) >= self._s.num_tensors:
            return self.load(wanted) if self.full() is not None else {}
        todo: dict[str, Any] = {}
        for k in wanted:
            if k not in self._done:
                raw = self._raw(k)
                if raw is None:
                    raise ManifestSchemaError(f"{self._s.where}: the tree references tensor {k[:200]!r}, which no page holds")
                todo[k] = raw
        if todo:
            self._done.update(self._check(todo, False))
        return {k: self._done[k] for k in wanted}

    def _entry_of_all(self, k: str) -> Any:
        assert self._all is not None
        if k not in self._all:
            raise ManifestSchemaError(f"{self._s.where}: the tree references tensor {k[:200]!r}, which no page holds")
        return self._all[k]

    def full(self) -> dict[str, Any]:
        """Every entry, validated together (every v1 check)."""
        if self._all is None:
            merged: dict[str, Any] = {}
            for i in range(len(self._s.first)):
                merged.update(self._raw_page(i))
            self._all = self._check(merged, True)
            self._pages.clear()
        return self._all

    def __getitem__(self, key: str) -> Any:
        if self._all is not None:
            return self._all[key]
        entry = self._done.get(key)
        if entry is not None:
            return entry
        if self._raw(key) is None:
            raise KeyError(key)
        return self.load([key])[key]

    def __contains__(self, key: object) -> bool:
        if self._all is not None:
            return key in self._all
        return isinstance(key, str) and (key in self._done or self._raw(key) is not None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.full())

    def __len__(self) -> int:
        return self._s.num_tensors

    def __repr__(self) -> str:
        return f"LazyTensors({self._s.num_tensors} tensors, {len(self._done)} loaded)"
