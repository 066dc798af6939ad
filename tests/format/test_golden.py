"""The golden compatibility corpus (tests/format/golden/v1, written once by
tests/format/golden/make_golden.py):
what format version 1 looks like on disk must restore bit-exactly forever, and each critical
alteration of it must fail with its own typed error; non-critical ones must still load.

The corpus is copied to a temporary directory first: tests never write into tests/format/golden.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import ckpt
from tests.format.golden.make_golden import describe, golden_state

GOLDEN = Path(__file__).parent / "golden" / "v1"
EXPECTED: dict[str, Any] = json.loads((GOLDEN / "expected.json").read_text())
STEP = EXPECTED["step"]


def copy_of(name: str, tmp_path: Path) -> str:
    dst = tmp_path / name
    shutil.copytree(GOLDEN / name, dst, symlinks=True)
    return str(dst)


def test_the_corpus_is_complete_and_small() -> None:
    dirs = {p.name for p in GOLDEN.iterdir() if p.is_dir()}
    assert dirs == {"good", *EXPECTED["damaged"]}
    assert {"bitflip-data", "truncated-shard", "missing-shard", "unknown-dtype", "future-version", "manifest-traversal"} <= dirs
    assert sum(f.stat().st_size for f in GOLDEN.rglob("*") if f.is_file()) < 100_000


def test_the_expected_values_are_what_the_generator_saved() -> None:
    """expected.json is the source of truth; this guards the generator against drifting."""
    assert describe(golden_state()) == EXPECTED["state"]


def test_the_good_copy_restores_bit_exactly(tmp_path: Path) -> None:
    root = copy_of("good", tmp_path)
    assert ckpt.list_steps(root) == [STEP]
    m = ckpt.read_manifest(root)
    assert (m.format_version, m.step, m.attempt) == (EXPECTED["format_version"], STEP, "golden")
    assert len(m.files) >= 2  # several files, several checksum blocks
    back = ckpt.restore(root)
    assert describe(back) == EXPECTED["state"]


def test_a_subset_of_the_good_copy_restores(tmp_path: Path) -> None:
    root = copy_of("good", tmp_path)
    back = ckpt.restore(root, step=STEP, target={"model": {"b16": None}, "objects": None})
    want = golden_state()  # equal to expected.json (the test above)
    assert list(back) == ["model", "objects"]
    assert list(back["model"]) == ["b16"]
    assert describe(back["model"]["b16"]) == describe(want["model"]["b16"])
    assert describe(back["objects"]) == describe(want["objects"])


@pytest.mark.parametrize("name", sorted(EXPECTED["damaged"]))
def test_each_altered_copy(name: str, tmp_path: Path) -> None:
    spec = EXPECTED["damaged"][name]
    root = copy_of(name, tmp_path)
    if spec["error"] is None:  # non-critical: must load, and identically
        assert describe(ckpt.restore(root)) == EXPECTED["state"], spec["change"]
        return
    err = getattr(ckpt, spec["error"])
    assert issubclass(err, ckpt.CkptError)
    with pytest.raises(err, match=spec["match"]) as info:
        ckpt.restore(root, step=STEP)
    assert root in str(info.value), "the message names the file"
    if issubclass(err, ckpt.ManifestError):
        # A manifest that does not validate is not a checkpoint: the latest-step search skips it.
        with pytest.warns(ckpt.CkptWarning, match=f"skipping step {STEP}"), pytest.raises(ckpt.CheckpointNotFoundError):
            ckpt.restore(root)
        with pytest.raises(err, match=spec["match"]):
            ckpt.read_manifest(root, step=STEP)
