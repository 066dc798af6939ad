"""Format v3 (docs/FORMAT.md 4.9): the content hash column of an incremental save's manifest,
read strictly like every other column."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt import errors
from ckpt.format import _manifest_pages, manifest

INC = ckpt.SaveOptions(incremental=True, fsync=False)


def saved(tmp_path: Path) -> tuple[str, Path]:
    root = str(tmp_path / "root")
    ckpt.save(root, {"w": torch.arange(10.0), "v": torch.ones(3), "n": 1}, step=1, options=INC)
    return root, Path(root, "steps", f"{1:012d}", "manifest.json")


def rewrite(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``change`` to the manifest's v1-shaped fields and write it back sealed, as v3."""
    fields = manifest.parse(path.read_bytes(), where="t").fields()
    change(fields)
    path.write_bytes(_manifest_pages.encode(fields)[0])


def test_a_v3_manifest_round_trips_its_hashes(tmp_path: Path) -> None:
    root, path = saved(tmp_path)
    m = ckpt.read_manifest(root)
    assert (m.format_version, m.content_hash) == (3, "blake3-128")
    hashes = {k: t.shards.hashes for k, t in m.tensors.items()}
    assert all(h is not None and len(h) == 1 and len(h[0] or "") == 32 for h in hashes.values())
    assert manifest.parse(m.to_json(), where="again").fields() == m.fields()
    line = path.read_bytes().split(b"\n")
    assert json.loads(line[0])["content_hash"] == "blake3-128"
    lazy = manifest.parse(path.read_bytes(), where="lazy", lazy=True)
    assert lazy.entries(["w"])["w"].shards.hashes == hashes["w"]


def _set_hash(value: Any) -> Callable[[dict[str, Any]], None]:
    def change(f: dict[str, Any]) -> None:
        f["tensors"]["w"]["shards"]["hash"] = value

    return change


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (_set_hash(["00" * 15]), errors.IntegrityMetadataError, r"tensor 'w': shards\.hash\[0\]: expected 32 lowercase hex digits or null"),
        (_set_hash(["AB" * 16]), errors.IntegrityMetadataError, r"shards\.hash\[0\]"),
        (_set_hash([7]), errors.IntegrityMetadataError, r"shards\.hash\[0\]: expected 32 lowercase hex digits or null, found 7"),
        (_set_hash([None, None]), errors.IntegrityMetadataError, r"tensor 'w': shards\.hash must be a list of 1 content hashes"),
        (_set_hash("ab" * 16), errors.IntegrityMetadataError, r"shards\.hash must be a list"),
        (lambda f: f["tensors"]["w"]["shards"].pop("hash"), errors.ManifestSchemaError, r"tensor 'w': shards must be an object of the parallel lists"),
        (lambda f: f.__setitem__("content_hash", "md5"), errors.IntegrityMetadataError, r'content_hash "md5" is unknown; expected .blake3-128.'),
    ],
    ids=["short", "upper", "int", "two", "string", "missing", "algorithm"],
)
def test_a_bad_hash_column_is_refused(tmp_path: Path, change: Callable[[dict[str, Any]], None], error: type[Exception], match: str) -> None:
    root, path = saved(tmp_path)
    rewrite(path, change)
    with pytest.raises(error, match=match):
        ckpt.read_manifest(root, 1)
    with pytest.raises(error, match=match):
        ckpt.restore(root, 1)


def test_a_null_hash_is_allowed_and_a_v2_head_may_not_name_one(tmp_path: Path) -> None:
    root, path = saved(tmp_path)
    rewrite(path, _set_hash([None]))
    assert ckpt.read_manifest(root, 1).tensors["w"].shards.hashes == (None,)
    assert torch.equal(ckpt.restore(root, 1)["w"], torch.arange(10.0))

    def as_v2(f: dict[str, Any]) -> None:
        f["format_version"] = 2  # keeps content_hash and the column: not v2's fields

    rewrite(path, as_v2)
    with pytest.raises(errors.ManifestSchemaError, match=r"unknown fields \['\"content_hash\"'\]"):
        ckpt.read_manifest(root, 1)
