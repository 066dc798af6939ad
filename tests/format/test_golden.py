"""The golden compatibility corpora (tests/format/golden/v1 and v2, each written once by
tests/format/golden/make_golden.py):
what each format version looks like on disk must restore bit-exactly forever, and each critical
alteration of it must fail with its own typed error; non-critical ones must still load.
(v1's "future-version" copy says version 2 in one JSON document: since v2 exists, that is a
malformed v2 manifest, no longer an unknown version; its expected error changed with v2. Likewise
v2's says 3, a v3 manifest without its content_hash field, since v3.)

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

CORPORA = {v: Path(__file__).parent / "golden" / v for v in ("v1", "v2", "v3")}
EXPECTED: dict[str, dict[str, Any]] = {v: json.loads((p / "expected.json").read_text()) for v, p in CORPORA.items()}
STEP = EXPECTED["v1"]["step"]


@pytest.fixture(params=sorted(CORPORA))
def version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def copy_of(version: str, name: str, tmp_path: Path) -> str:
    dst = tmp_path / version / name
    shutil.copytree(CORPORA[version] / name, dst, symlinks=True)
    return str(dst)


def test_the_corpus_is_complete_and_small(version: str) -> None:
    golden = CORPORA[version]
    dirs = {p.name for p in golden.iterdir() if p.is_dir()}
    assert dirs == {"good", *EXPECTED[version]["damaged"]}
    assert {"bitflip-data", "truncated-shard", "missing-shard", "unknown-dtype", "future-version", "manifest-traversal"} <= dirs
    assert sum(f.stat().st_size for f in golden.rglob("*") if f.is_file()) < 100_000


def test_the_expected_values_are_what_the_generator_saved(version: str) -> None:
    """expected.json is the source of truth; this guards the generator against drifting."""
    assert describe(golden_state()) == EXPECTED[version]["state"]


def test_the_good_copy_restores_bit_exactly(version: str, tmp_path: Path) -> None:
    root = copy_of(version, "good", tmp_path)
    assert ckpt.list_steps(root) == [STEP]
    m = ckpt.read_manifest(root)
    assert (m.format_version, m.step, m.attempt) == (EXPECTED[version]["format_version"], STEP, "golden")
    assert len(m.files) >= 2  # several files, several checksum blocks
    back = ckpt.restore(root)
    assert describe(back) == EXPECTED[version]["state"]


def test_a_subset_of_the_good_copy_restores(version: str, tmp_path: Path) -> None:
    root = copy_of(version, "good", tmp_path)
    back = ckpt.restore(root, step=STEP, target={"model": {"b16": None}, "objects": None})
    want = golden_state()  # equal to expected.json (the test above)
    assert list(back) == ["model", "objects"]
    assert list(back["model"]) == ["b16"]
    assert describe(back["model"]["b16"]) == describe(want["model"]["b16"])
    assert describe(back["objects"]) == describe(want["objects"])


@pytest.mark.parametrize(
    ("version", "name"), [(v, n) for v in sorted(CORPORA) for n in sorted(EXPECTED[v]["damaged"])]
)
def test_each_altered_copy(version: str, name: str, tmp_path: Path) -> None:
    spec = EXPECTED[version]["damaged"][name]
    root = copy_of(version, name, tmp_path)
    if spec["error"] is None:  # non-critical: must load, and identically
        assert describe(ckpt.restore(root)) == EXPECTED[version]["state"], spec["change"]
        return
    err = getattr(ckpt, spec["error"])
    assert issubclass(err, ckpt.CkptError)
    with pytest.raises(err, match=spec["match"]) as info:
        ckpt.restore(root, step=STEP)
    assert root in str(info.value), "the message names the file"
    if spec.get("found_when_used"):  # a v2 tensor entry: damage found when the entry is used
        with pytest.raises(err, match=spec["match"]):
            ckpt.restore(root)
        with pytest.warns(ckpt.CkptWarning, match=f"skipping damaged step {STEP}"), pytest.raises(ckpt.NoIntactCheckpointError):
            ckpt.restore(root, fallback=True)
        with pytest.raises(err, match=spec["match"]):
            ckpt.read_manifest(root, step=STEP)
    elif issubclass(err, ckpt.ManifestError):
        # A manifest that does not validate is not a checkpoint: the latest-step search skips it.
        with pytest.warns(ckpt.CkptWarning, match=f"skipping step {STEP}"), pytest.raises(ckpt.CheckpointNotFoundError):
            ckpt.restore(root)
        with pytest.raises(err, match=spec["match"]):
            ckpt.read_manifest(root, step=STEP)
