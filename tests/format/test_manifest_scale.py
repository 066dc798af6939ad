"""The columnar shard tables (FORMAT.md 4.4) at scale: a manifest of many ranks x tensors is
written, parsed and planned without Python work per shard, round-trips exactly, names the shard
of any problem, and the commit path builds the same manifest whichever way writers report.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import time
from typing import Any

import numpy as np
import pytest

from ckpt import errors
from ckpt.engine.restore_plan import Request, plan_restore
from ckpt.format import manifest
from ckpt.format.manifest import ShardEntry, ShardTable, TensorEntry
from ckpt.geometry import coverage
from ckpt.geometry.boxes import Box
from ckpt.geometry.byte_ranges import ByteRange
from ckpt.lifecycle import attempt as attempt_mod
from ckpt.lifecycle import commit as commit_protocol
from ckpt.options import MiB, SaveOptions
from ckpt.testing import scale

ROWS, COLS = scale.ROWS, scale.COLS


def _raw(ranks: int, tensors: int) -> bytes:
    data: bytes = scale.build(ranks, tensors).to_json()
    return data


def _edit(data: bytes, fn: Any) -> bytes:
    m = json.loads(data)
    fn(m)
    return manifest.seal(m)


def test_a_large_manifest_round_trips_and_parses_fast() -> None:
    """300 ranks x 1,000 tensors (300,000 shards): parse in well under the ~5 s a per-shard
    Python parser takes (generous: the machine may be busy); every column survives exactly."""
    data = _raw(300, 1000)
    t0 = time.perf_counter()
    m = manifest.parse(data, where="m.json", expected_step=scale.STEP)
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, f"parse took {elapsed:.2f} s"
    assert len(m.tensors) == 1000
    t = m.tensors["model.layers.7.weight"]
    assert len(t.shards) == 300
    assert t.shards[5] == ShardEntry(
        scale.path(5),
        (5 * ROWS, 0),
        (ROWS, COLS),
        ByteRange(scale.HEADER + 7 * 1024, scale.HEADER + 8 * 1024),
        (0,),
    )
    assert m.to_json() == data  # the parsed bytes
    again = dataclasses.replace(m)  # not the parsed object: serialized from the tables
    assert again.to_json() == data


def test_shard_table_is_a_sequence_of_entries() -> None:
    entries = [
        ShardEntry("d/a", (0, 0), (2, 3), ByteRange(10, 34), (1, 2)),
        ShardEntry("d/b", (2, 0), (2, 3), ByteRange(0, 24), (3,)),
        ShardEntry("d/a", (4, 0), (0, 3), ByteRange(34, 34), ()),
    ]
    t = TensorEntry("F32", (4, 3), tuple(entries))  # a tuple of entries is made into a table
    assert isinstance(t.shards, ShardTable)
    assert len(t.shards) == 3
    assert list(t.shards) == entries
    assert t.shards[-1] == entries[2]
    assert t.shards[1:] == tuple(entries[1:])
    assert t.shards == ShardTable.from_entries(entries, 2)
    assert t.shards != ShardTable.from_entries(entries[:2], 2)
    assert t.shards.paths == ("d/a", "d/b")
    assert t.shards.used_paths() == ["d/a", "d/b"]
    assert t.shards.crc_start.tolist() == [0, 2, 3, 3]
    with pytest.raises(IndexError):
        t.shards[3]
    scalar = TensorEntry("I64", (), (ShardEntry("d/a", (), (), ByteRange(0, 8), (9,)),))
    assert scalar.shards.offsets.shape == (1, 0)
    assert scalar.shards[0].box == Box((), ())


@pytest.mark.parametrize(
    ("column", "index", "value", "err", "match"),
    [
        (
            "byte_range",
            2 * 777 + 1,
            1 << 40,
            errors.InvalidByteRangeError,
            r"tensor 'model\.layers\.5\.weight': shard 777: byte_range \[\d+, 1099511627776\) in 'data/000000000001-0123456789abcdef/00777-0\.safetensors' is invalid",
        ),
        (
            "byte_range",
            2 * 777 + 1,
            3.0,
            errors.InvalidByteRangeError,
            r"tensor 'model\.layers\.5\.weight': shards\.byte_range\[1555\]: expected an integer, found 3\.0",
        ),
        (
            "offsets",
            2 * 777,
            True,
            errors.ManifestSchemaError,
            r"tensor 'model\.layers\.5\.weight': shards\.offsets\[1554\]: expected an integer .* found true",
        ),
        (
            "offsets",
            2 * 777,
            4 * 778,
            errors.ShardCoverageError,
            r"tensor 'model\.layers\.5\.weight': shard 777 at offsets \[3112, 0\] .* and shard 778 at offsets \[3112, 0\] .* overlap",
        ),
        (
            "sizes",
            2 * 777,
            3,
            errors.TensorSizeError,
            r"tensor 'model\.layers\.5\.weight': shard 777: byte_range .* holds 1024 bytes; sizes \[3, 64\] of F32 need 768",
        ),
        (
            "file",
            777,
            1000,
            errors.ManifestSchemaError,
            r"tensor 'model\.layers\.5\.weight': shards\.file\[777\]: expected a file index in \[0, 1000\), found 1000",
        ),
        (
            "file",
            777,
            778,
            errors.OverlappingRangesError,
            r"file '.*00778-0\.safetensors': byte ranges of 'model\.layers\.5\.weight' \[\d+, \d+\) and 'model\.layers\.5\.weight' \[\d+, \d+\) overlap",
        ),
        (
            "crc32c",
            777,
            -1,
            errors.IntegrityMetadataError,
            r"tensor 'model\.layers\.5\.weight': shards\.crc32c\[777\]: expected a 32-bit unsigned integer, found -1",
        ),
    ],
    ids=[
        "range-past-file",
        "range-float",
        "offset-bool",
        "overlap",
        "size-vs-range",
        "file-index",
        "alias",
        "crc",
    ],
)
def test_errors_in_a_large_table_name_the_tensor_and_shard(
    column: str, index: int, value: Any, err: type[Exception], match: str
) -> None:
    data = _raw(1000, 10)

    def edit(m: dict[str, Any]) -> None:
        m["tensors"]["model.layers.5.weight"]["shards"][column][index] = value

    with pytest.raises(err, match=match):
        manifest.parse(_edit(data, edit), where="m.json")


def test_crc_count_is_checked_per_tensor() -> None:
    data = _raw(50, 3)
    bad = _edit(data, lambda m: m["tensors"]["model.layers.1.weight"]["shards"]["crc32c"].pop())
    with pytest.raises(
        errors.IntegrityMetadataError,
        match=r"tensor 'model\.layers\.1\.weight': its 50 shards need 50 crc32c values in all .* found 49",
    ):
        manifest.parse(bad, where="m.json")


def test_plan_restore_picks_only_the_shards_a_region_touches() -> None:
    m = manifest.parse(_raw(1000, 4), where="m.json")
    key = "model.layers.2.weight"
    # rows 6..9 span shards 1 and 2 (4 rows each): two reads, in two files
    plan = plan_restore(
        m,
        [Request(key, Box((6, 0), (4, COLS)))],
        verify=True,
        max_gap_bytes=MiB,
        read_chunk_bytes=32 * MiB,
    )
    assert plan.files == (scale.path(1), scale.path(2))
    assert sum(c.length for r in plan.reads for c in r.copies) == 4 * COLS * 4
    start = scale.HEADER + 2 * 1024
    assert [(r.path, r.range) for r in plan.reads] == [
        (
            scale.path(1),
            ByteRange(start, start + 1024),
        ),  # whole blocks: verify reads the shard
        (scale.path(2), ByteRange(start, start + 1024)),
    ]
    assert (
        plan_restore(
            m,
            [Request(key, Box((6, 0), (0, COLS)))],
            verify=True,
            max_gap_bytes=MiB,
            read_chunk_bytes=MiB,
        ).reads
        == ()
    )


def _att(ranks: int) -> attempt_mod.Attempt:
    return attempt_mod.Attempt("/nonexistent", scale.STEP, scale.ATTEMPT, ranks, SaveOptions())


def test_commit_builds_the_same_manifest_from_uniform_and_mixed_reports() -> None:
    """Reports with every rank's keys in the same order take the vectorized path; shuffled ones
    the general path. Both give the same manifest (shards in rank order)."""
    reports = scale.reports(40, 30)
    for r in reports:
        for i, sh in enumerate(r["shards"]):
            sh["crc32c"] = [1000 * r["rank"] + i]  # tells every shard's crc32c apart
    same = commit_protocol.build_manifest(_att(40), reports, created="c")
    assert same.tensors["model.layers.7.weight"].shards[13].crc32c == (13007,)
    shuffled = [
        dict(r, shards=random.Random(r["rank"]).sample(r["shards"], len(r["shards"])))
        for r in reports
    ]
    assert (
        commit_protocol._uniform_columns(list(range(40)), {r["rank"]: r for r in shuffled}, {})
        is None
    )
    mixed = commit_protocol.build_manifest(_att(40), shuffled, created="c")
    a, b = json.loads(same.to_json()), json.loads(mixed.to_json())
    assert list(b["tensors"]) != list(a["tensors"])  # in the order rank 0 reported them
    assert {k: v for k, v in a.items() if k != "manifest_crc32c"} == {
        k: v for k, v in b.items() if k != "manifest_crc32c"
    }
    want = scale.build(40, 30)
    for t, (key, entry) in enumerate(list(want.tensors.items())):
        crcs = 1000 * np.arange(40, dtype=np.int64) + t
        want.tensors[key] = dataclasses.replace(
            entry, shards=dataclasses.replace(entry.shards, crc32c=crcs)
        )
    assert same.to_json() == _edit(
        want.to_json(), lambda m: m.update(created="c", block_bytes=SaveOptions().block_bytes)
    )


@pytest.mark.parametrize("shuffle", [False, True], ids=["uniform", "mixed"])
def test_commit_names_the_ranks_that_wrote_a_region_twice_or_not_at_all(shuffle: bool) -> None:
    def reports(edit: Any) -> list[dict[str, Any]]:
        out = scale.reports(30, 5)
        edit(out)
        if shuffle:
            out = [dict(r, shards=r["shards"][::-1]) for r in out]
        return out

    def overlap(reps: list[dict[str, Any]]) -> None:
        reps[17]["shards"][3]["offsets"] = [12 * ROWS, 0]

    def rows_beyond(reps: list[dict[str, Any]]) -> None:
        reps[17]["shards"][3]["offsets"] = [30 * ROWS, 0]

    with pytest.raises(
        errors.PlanError,
        match=r"key 'model\.layers\.3\.weight': rank 12 and rank 17 both wrote the region at \[48, 0\]",
    ):
        commit_protocol.build_manifest(_att(30), reports(overlap), created="c")
    with pytest.raises(
        errors.PlanError,
        match=r"key 'model\.layers\.3\.weight': rank 17 wrote the region at \[120, 0\] of size \[4, 64\], outside the shape \[120, 64\]",
    ):
        commit_protocol.build_manifest(_att(30), reports(rows_beyond), created="c")

    def gap(reps: list[dict[str, Any]]) -> None:
        reps[29]["shards"][3]["sizes"] = [2, COLS]

    with pytest.raises(
        errors.PlanError,
        match=r"key 'model\.layers\.3\.weight': ranks \[0, 1, .*29\] wrote 7552 of 7680 elements",
    ):
        commit_protocol.build_manifest(_att(30), reports(gap), created="c")


def test_commit_refuses_non_integer_report_values() -> None:
    reps = scale.reports(4, 3)
    reps[2]["shards"][1]["crc32c"] = [1.5]
    with pytest.raises(errors.PlanError, match=r"reported a crc32c 1\.5, not an integer"):
        commit_protocol.build_manifest(_att(4), reps, created="c")


def test_vectorized_coverage_agrees_with_pairwise_on_random_boxes() -> None:
    """Random small box sets on a 6 x 6 grid: the vectorized checks (interval sort, corner test,
    sweep) reach the same verdict as comparing every pair."""
    rng = random.Random(7)
    shape = (6, 6)
    for _ in range(400):
        boxes = []
        for _ in range(rng.randint(2, 7)):
            o = [rng.randrange(6), rng.randrange(6)]
            boxes.append((o, [rng.randint(1, 6 - o[0]), rng.randint(1, 6 - o[1])]))
        if rng.random() < 0.3:  # a tiling: rows cut at random points
            cuts = sorted(rng.sample(range(1, 6), rng.randint(1, 4)))
            edges = [0, *cuts, 6]
            boxes = [([a, 0], [b - a, 6]) for a, b in itertools.pairwise(edges)]
        off = np.array([b[0] for b in boxes], dtype=np.int64)
        siz = np.array([b[1] for b in boxes], dtype=np.int64)
        slow = coverage.coverage_problem(shape, off, siz)
        saved = coverage.SMALL_TILING
        coverage.SMALL_TILING = 1
        try:
            fast = coverage.coverage_problem(shape, off, siz)
        finally:
            coverage.SMALL_TILING = saved
        assert (slow is None) == (fast is None), boxes
        if slow is not None and fast is not None:
            assert (slow.kind == "overlap") == (fast.kind == "overlap"), boxes


@pytest.mark.parametrize(
    "file_size", [64, 2**62 + 1], ids=["small-files", "files-over-2-63-in-all"]
)
def test_aliased_byte_ranges_are_found_across_tensors(file_size: int) -> None:
    """Two tensors in the second of two files share bytes 4..8: found whether the files'
    sizes add up to less than 2**63 (one sort over the files laid end to end) or not."""

    def doc(b_start: int) -> bytes:
        def tensor(start: int) -> dict[str, Any]:
            shards = {
                "file": [1],
                "offsets": [0],
                "sizes": [8],
                "byte_range": [start, start + 8],
                "crc32c": [0],
            }
            return {"dtype": "U8", "shape": [8], "shards": shards}

        return manifest.seal(
            {
                "format_version": 1, "step": 0, "attempt": "a", "created": "", "world_size": 1,
                "user_metadata": {}, "checksum_algorithm": "crc32c", "block_bytes": 1 << 22,
                "files": [{"path": "d/e", "size": file_size, "crc32c": 0}, {"path": "d/f", "size": file_size, "crc32c": 0}],
                "tensors": {"a": tensor(0), "b": tensor(b_start)},
                "objects": {}, "tree": {"dict": [["a", {"tensor": "a"}], ["b", {"tensor": "b"}]]},
            }
        )  # fmt: skip

    assert list(manifest.parse(doc(8), where="m.json").tensors) == ["a", "b"]
    with pytest.raises(
        errors.OverlappingRangesError,
        match=r"file 'd/f': byte ranges of 'a' \[0, 8\) and 'b' \[4, 12\) overlap",
    ):
        manifest.parse(doc(4), where="m.json")
