"""Format v2, the paged manifest (FORMAT.md 4.8): written for big states, read in part, and every
hostile or damaged part refused with a typed error naming the manifest."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import pytest
import torch

import ckpt
from ckpt import errors
from ckpt.format import _manifest_pages, manifest, skeleton
from ckpt.lifecycle.steps import read_step
from ckpt.state import tree
from ckpt.storage import open_storage

STEP = 1
PAGED = ckpt.SaveOptions(fsync=False, paged_manifest=True)


def state_of(n: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(n)
    return {
        "model": {f"t{i:04d}": torch.randn(3 + i % 5, generator=g) for i in range(n)},
        "meta": {"epoch": 3, "names": ["a", "b"]},
        "np": {"x/y~z": torch.arange(4).numpy()},
    }


def mpath(root: Path) -> Path:
    return root / "steps" / f"{STEP:012d}" / "manifest.json"


def saved(tmp_path: Path, n: int, options: ckpt.SaveOptions = PAGED) -> tuple[Path, dict[str, Any]]:
    root = tmp_path / "root"
    state = state_of(n)
    ckpt.save(str(root), state, step=STEP, options=options)
    return root, state


def rewrite(root: Path, *, fields: Callable[[dict[str, Any]], None] | None = None,
            head: Callable[[dict[str, Any]], None] | None = None, lines: Callable[[list[bytes]], None] | None = None,
            resection: bool = True) -> None:  # fmt: skip
    """Rewrite the manifest as a hostile writer would, sealed: edit its v1-shaped ``fields`` (then
    encode), its body ``lines``, or its ``head`` (after the sections are recomputed, unless
    ``resection`` is false); the head is sealed again."""
    raw = mpath(root).read_bytes()
    if fields is not None:
        f = manifest.parse(raw, where="x").fields()
        fields(f)
        raw = _manifest_pages.encode(f)[0]
    parts = raw.split(b"\n")
    assert parts[-1] == b""
    h, body = json.loads(parts[0]), parts[1:-1]
    if lines is not None:
        lines(body)
    if resection:
        spans, at = [], 0
        for line in body:
            spans.append([at, at + len(line), crc32c.crc32c(line)])
            at += len(line) + 1
        h["sections"]["tree"], h["sections"]["objects"] = spans[0], spans[1]
        h["sections"]["pages"]["bounds"] = [b for s in spans[2:] for b in s[:2]]
        h["sections"]["pages"]["crc32c"] = [s[2] for s in spans[2:]]
    if head is not None:
        head(h)
    mpath(root).write_bytes(b"\n".join([manifest.seal(h), *body, b""]))


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if hasattr(a, "shape"):
        return bool((a == b).all())
    return bool(a == b)


# --- writing -------------------------------------------------------------------------------------


def test_a_state_of_many_tensors_gets_a_paged_manifest_and_a_small_one_does_not(tmp_path: Path) -> None:
    n = _manifest_pages.PAGED_FROM + 5
    root, state = saved(tmp_path, n, ckpt.SaveOptions(fsync=False))
    raw = mpath(root).read_bytes()
    assert raw.startswith(b'{"format_version":2,')
    pages = -(-(n + 1) // _manifest_pages.PAGE_KEYS)  # the model's tensors and the array
    assert raw.count(b"\n") == 1 + 2 + pages  # head, tree, objects, pages: each a line
    assert ckpt.read_manifest(str(root)).format_version == 2
    assert same(ckpt.restore(str(root)), state)

    small = tmp_path / "small"
    ckpt.save(str(small), state_of(3), step=STEP, options=ckpt.SaveOptions(fsync=False))
    assert mpath(small).read_bytes().startswith(b'{"format_version":1,')
    assert b"\n" not in mpath(small).read_bytes()
    forced = tmp_path / "forced"
    ckpt.save(str(forced), state_of(3), step=STEP, options=PAGED)
    assert ckpt.read_manifest(str(forced)).format_version == 2
    off = tmp_path / "off"
    ckpt.save(str(off), state, step=STEP, options=ckpt.SaveOptions(fsync=False, paged_manifest=False))
    assert ckpt.read_manifest(str(off)).format_version == 1


def test_a_paged_manifest_parses_to_the_same_manifest_as_one_document(tmp_path: Path) -> None:
    paged, _ = saved(tmp_path / "a", 150)
    one, _ = saved(tmp_path / "b", 150, ckpt.SaveOptions(fsync=False, paged_manifest=False))
    a = ckpt.read_manifest(str(paged))
    b = ckpt.read_manifest(str(one))
    assert (a.format_version, b.format_version) == (2, 1)
    assert a.tree == b.tree
    assert a.objects == b.objects
    assert set(a.tensors) == set(b.tensors)
    assert all((a.tensors[k].dtype, a.tensors[k].shape) == (b.tensors[k].dtype, b.tensors[k].shape) for k in b.tensors)


def test_the_tree_writes_a_leaf_whose_key_is_its_path_as_a_letter() -> None:
    node = {"dict": [
        ["a/b", {"tensor": "a~1b"}], [7, {"odict": [["w", {"ndarray": "7/w"}]], "metadata": {"$dict": []}}],
        [{"$int": "18446744073709551617"}, {"list": [{"object": "18446744073709551617/0"}, {"tensor": "other"}]}],
        ["~", {"tuple": [{"tensor": "~0/0"}]}],
    ]}  # fmt: skip
    short = _manifest_pages.compact_tree(node, "")
    assert short["dict"][0][1] == "t"
    assert short["dict"][1][1]["odict"][0][1] == "n"
    assert short["dict"][2][1]["list"] == ["o", {"tensor": "other"}]  # a key that is not its path stays
    assert short["dict"][3][1]["tuple"] == ["t"]
    assert _manifest_pages.expand_tree(short, "", "x") == node
    skeleton.check_tree(_manifest_pages.expand_tree(short, "", "x"),
                        {"a~1b": 1, "7/w": 1, "other": 1, "~0/0": 1}, {"18446744073709551617/0": 1}, "x")  # fmt: skip


# --- reading in part -----------------------------------------------------------------------------


def test_a_few_keys_restore_from_their_pages_alone(tmp_path: Path) -> None:
    """A sealed page entry that does not validate (a writer's bug) fails only what uses it."""
    root, state = saved(tmp_path, 300)
    rewrite(root, fields=lambda f: f["tensors"]["model/t0250"].update(dtype="F128"))
    got = ckpt.restore(str(root), step=STEP, target={"model": {"t0003": None, "t0100": None}})
    assert same(got["model"], {k: state["model"][k] for k in ("t0003", "t0100")})
    for call in (lambda: ckpt.restore(str(root), step=STEP), lambda: ckpt.restore(str(root), step=STEP, target={"model": {"t0250": None}}),
                 lambda: ckpt.read_manifest(str(root), step=STEP)):  # fmt: skip
        with pytest.raises(errors.UnsupportedDtypeError, match=r"manifest\.json: tensor 'model/t0250': unknown dtype"):
            call()
    lazy = read_step(open_storage(str(root)), STEP, lazy=True)  # no page decoded until asked
    assert lazy.partial
    assert len(lazy.tensors) == 301
    assert set(lazy.entries(["model/t0003"])) == {"model/t0003"}
    assert lazy.partial  # the other entries are still unchecked
    assert "model/t0299" in lazy.tensors
    assert "model/nope" not in lazy.tensors
    with pytest.raises(errors.ManifestSchemaError, match="the tree references tensor 'model/nope', which no page holds"):
        lazy.entries(["model/nope"])


def test_a_damaged_page_is_found_when_the_manifest_is_opened(tmp_path: Path) -> None:
    root, _ = saved(tmp_path, 300)
    raw = bytearray(mpath(root).read_bytes())
    at = raw.index(b'"model/t0200"')
    raw[at + 3] ^= 0x01  # a bit flipped in page 3, not resealed
    mpath(root).write_bytes(bytes(raw))
    with pytest.raises(errors.ManifestChecksumError, match=r"manifest\.json: page 3 has crc32c [0-9a-f]{8} but the head records"):
        ckpt.restore(str(root), step=STEP, target={"model": {"t0003": None}})
    with pytest.warns(errors.CkptWarning, match="skipping step 1"):
        assert ckpt.latest_step(str(root)) is None


def test_ls_reads_the_heads(tmp_path: Path) -> None:
    root, _ = saved(tmp_path, 300)
    out = subprocess.run([sys.executable, "-m", "ckpt", "ls", "--json", str(root)], capture_output=True, text=True, check=True)
    (row,) = json.loads(out.stdout)["steps"]
    assert (row["valid"], row["num_tensors"], row["num_objects"]) == (True, 301, 1)
    m = ckpt.read_manifest(str(root))
    assert row["total_bytes"] == m.total_bytes
    assert row["num_files"] == len(m.files)


# --- hostile heads and bodies, sealed --------------------------------------------------------------


def _pages_first(h: dict[str, Any]) -> list[str]:
    return list(h["sections"]["pages"]["first"])


HOSTILE: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("section-gap", {"head": lambda h: h["sections"]["objects"].__setitem__(0, h["sections"]["objects"][0] + 1)},
     errors.ManifestSchemaError, r"sections: objects is \[\d+, \d+\) .*expected it to start at byte"),
    ("body-longer", {"lines": lambda b: b.append(b"{}"), "resection": False}, errors.ManifestSchemaError, "the head places .* bytes of sections after it"),
    ("first-unsorted", {"head": lambda h: h["sections"]["pages"]["first"].reverse()},
     errors.ManifestSchemaError, "pages.first must be strings in increasing order"),
    ("summary-count", {"head": lambda h: h["summary"].__setitem__("tensors", 3)}, errors.ManifestSchemaError, "pages for 3 tensors"),
    ("summary-field", {"head": lambda h: h["summary"].__setitem__("bytes", 3)}, errors.ManifestSchemaError, "summary must be"),
    ("objects-count", {"head": lambda h: h["summary"].__setitem__("objects", 2)}, errors.ManifestSchemaError, "counts 2 objects"),
    ("page-swapped", {"lines": lambda b: b.__setitem__(slice(2, 4), [b[3], b[2]])},
     errors.ManifestSchemaError, "page 0: keys .* are not the sorted keys from"),
    ("page-not-object", {"lines": lambda b: b.__setitem__(2, b"[1]")}, errors.ManifestSchemaError, "page 0 must map 1 to 64 keys"),
    ("tree-letter", {"lines": lambda b: b.__setitem__(0, b[0].replace(b'"t"', b'"x"', 1))},
     errors.ManifestSchemaError, "tree: unknown leaf \"x\""),
    ("crc-wrong", {"head": lambda h: h["sections"]["pages"]["crc32c"].__setitem__(0, 7)},
     errors.ManifestChecksumError, "page 0 has crc32c [0-9a-f]{8} but the head records 00000007"),
    ("tree-crc-wrong", {"head": lambda h: h["sections"]["tree"].__setitem__(2, 7)},
     errors.ManifestChecksumError, "tree has crc32c [0-9a-f]{8} but the head records 00000007"),
    ("no-sections", {"head": lambda h: h.pop("sections")}, errors.ManifestSchemaError, r"missing fields \['sections'\]"),
    ("v1-fields-too", {"head": lambda h: h.__setitem__("tensors", {})}, errors.ManifestSchemaError, "unknown fields"),
    ("future", {"head": lambda h: h.__setitem__("format_version", 4)}, errors.UnsupportedFormatError, "format_version 4 is not supported"),
]  # fmt: skip


def _every_entry(root: Path, *, lazy: bool) -> None:
    m = read_step(open_storage(str(root)), STEP, lazy=lazy)
    m.entries(list(m.tensors))  # every key: every check


@pytest.mark.parametrize(("edit", "err", "match"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_a_hostile_paged_manifest_is_refused(tmp_path: Path, edit: dict[str, Any], err: type[Exception], match: str) -> None:
    root, _ = saved(tmp_path, 150)
    rewrite(root, **edit)
    for lazy in (False, True):
        with pytest.raises(err, match=match) as info:
            _every_entry(root, lazy=lazy)
        assert "manifest.json" in str(info.value)
    with pytest.raises(err, match=match):
        ckpt.restore(str(root), step=STEP)


def test_the_collector_is_on_again_after_a_restore_or_save_that_fails(tmp_path: Path) -> None:
    root, _ = saved(tmp_path, 2000)
    rewrite(root, fields=lambda f: f["tensors"]["model/t1999"].update(dtype="F128"))
    assert gc.isenabled()
    with pytest.raises(errors.UnsupportedDtypeError):
        ckpt.restore(str(root), step=STEP)
    assert gc.isenabled()
    with pytest.raises(errors.CheckpointExistsError):  # a refused save
        ckpt.save(str(root), state_of(3), step=STEP, options=PAGED)
    assert gc.isenabled()
    gc.disable()
    try:  # a caller's choice to keep it off is kept
        with pytest.raises(errors.UnsupportedDtypeError):
            ckpt.restore(str(root), step=STEP)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_keys_are_derived_from_paths_the_writer_way() -> None:
    assert tree.join(tree.join("", "a/b"), "~") == "a~1b/~0"


def test_ls_of_a_large_manifest_reads_its_start_only(tmp_path: Path) -> None:
    """Over 256 KiB, a paged manifest's head is read from the file's first bytes: a body cut
    short (which ls never reads) leaves the listing as it was, while a restore refuses it. A v1
    manifest of that size is still read whole."""
    root, _ = saved(tmp_path / "a", 2500)
    raw = mpath(root).read_bytes()
    assert len(raw) > 300_000
    mpath(root).write_bytes(raw[: len(raw) - 1000])
    out = subprocess.run([sys.executable, "-m", "ckpt", "ls", "--json", str(root)], capture_output=True, text=True, check=True)
    (row,) = json.loads(out.stdout)["steps"]
    assert (row["valid"], row["num_tensors"]) == (True, 2501)
    with pytest.raises(errors.ManifestSchemaError, match=r"the head places .* bytes of sections after it"):
        ckpt.restore(str(root), step=STEP)

    one, _ = saved(tmp_path / "b", 2500, ckpt.SaveOptions(fsync=False, paged_manifest=False))
    assert mpath(one).stat().st_size > 300_000
    out = subprocess.run([sys.executable, "-m", "ckpt", "ls", "--json", str(one)], capture_output=True, text=True, check=True)
    (row,) = json.loads(out.stdout)["steps"]
    assert (row["valid"], row["num_tensors"]) == (True, 2501)
