"""Manifest scale benchmark: a synthetic checkpoint of R ranks x T tensors (R*T shard entries).

    python -m benchmarks.scale_bench [--ranks 1000] [--tensors 1000] [--out bench-out] [--quick]

Every tensor (fp32, ``rows*R x 64``) is row-sharded over all R ranks; rank r's shards fill one
file per rank (the synthetic checkpoint of ``ckpt.testing.scale``, shared with the manifest
scale tests). Times, each against the 2 s target of the performance issue:

- build: the in-memory manifest (``FileEntry`` values and one columnar ``ShardTable`` per tensor);
- to_json: ``Manifest.to_json()`` (the bytes a commit writes); write = build + to_json;
- parse: ``ckpt.format.manifest.parse`` of those bytes (what every restore does first);
- plan: ``plan_restore`` of rank 0's region of every tensor (a 1-rank restore of its shard);
- commit: ``commit_protocol.build_manifest`` from R writer reports (what ``ckpt.commit`` runs
  before writing; it checks every region was written once, with the manifest parser's linear
  coverage check, and re-parses the result). Measured at R/10, then at R unless the linear
  prediction from the last point exceeds 60 s (then extrapolated: t = a*R + b*R^2 through the
  two largest points, or a*R from one).

At full size each step runs ``--repeats`` times (default 3) and the median is reported (all
times are in the JSON). Every step is first run at R/10 ranks. A step whose linear extrapolation from there exceeds 60 s
is not run at full size: its time is reported as that extrapolation (marked as such, a lower
bound if the step is superlinear). ``--quick`` extrapolates every step from R/10. Raw JSON:
``<out>/scale_bench.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any

from ckpt.testing.scale import ATTEMPT, COLS, ROWS, STEP, build, reports  # the synthetic checkpoint

TARGET_S = 2.0
MAX_RUN_S = 60.0


def _timed(fn: Any) -> tuple[float, Any]:
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(ranks: int, tensors: int, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Time build, to_json, parse and plan at this size (steps in ``skip`` are not run)."""
    from ckpt.engine.restore_plan import Request, plan_restore
    from ckpt.format import manifest as manifest_mod
    from ckpt.geometry.boxes import Box
    from ckpt.options import RestoreOptions

    out: dict[str, Any] = {"ranks": ranks, "tensors": tensors, "entries": ranks * tensors, "times_s": {}}
    out["times_s"]["build"], m = _timed(lambda: build(ranks, tensors))
    if "to_json" not in skip:
        out["times_s"]["to_json"], data = _timed(m.to_json)
        out["manifest_bytes"] = len(data)
        if "parse" not in skip:
            out["times_s"]["parse"], parsed = _timed(lambda: manifest_mod.parse(data, where="scale", expected_step=STEP))
            assert len(parsed.tensors) == tensors
            del parsed
        del data
    if "plan" not in skip:
        opts = RestoreOptions()
        gap = opts.gap_bytes(local=False) if hasattr(opts, "gap_bytes") else opts.max_gap_bytes  # remote store
        reqs = [Request(k, Box((0, 0), (ROWS, COLS))) for k in m.tensors]
        out["times_s"]["plan"], plan = _timed(
            lambda: plan_restore(m, reqs, verify=opts.verify, max_gap_bytes=gap, read_chunk_bytes=opts.chunk_bytes(local=False))
        )
        out["plan_reads"] = len(plan.reads)
        out["plan_bytes"] = plan.total_bytes
    return out


def measure_commit(ranks: int, tensors: int) -> float:
    from ckpt.lifecycle import attempt as attempt_mod
    from ckpt.lifecycle import commit as commit_protocol
    from ckpt.options import SaveOptions

    reps = reports(ranks, tensors)
    att = attempt_mod.Attempt("/nonexistent", STEP, ATTEMPT, ranks, SaveOptions())
    t, _ = _timed(lambda: commit_protocol.build_manifest(att, reps, created="2026-01-01T00:00:00+00:00"))
    return t


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """``(a, b)`` of t = a*R + b*R**2 through the two largest points (both >= 0)."""
    if len(points) == 1:
        return points[0][1] / points[0][0], 0.0
    (r1, t1), (r2, t2) = points[-2], points[-1]
    b = max(0.0, (t2 / r2 - t1 / r1) / (r2 - r1))
    return max(0.0, t2 / r2 - b * r2), b


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's record with each step's median time over ``runs`` (all times kept)."""
    import statistics

    out = dict(runs[0])
    out["all_times_s"] = {k: [r["times_s"][k] for r in runs] for k in runs[0]["times_s"]}
    out["times_s"] = {k: statistics.median(v) for k, v in out["all_times_s"].items()}
    return out


def run(ranks: int, tensors: int, commit_ranks: list[int], *, full_size: bool = True, repeats: int = 1) -> dict[str, Any]:
    small_r = max(1, ranks // 10)
    small = measure(small_r, tensors)
    print(f"scale: {small_r} ranks x {tensors} tensors: " + ", ".join(f"{k} {v:.2f} s" for k, v in small["times_s"].items()),
          file=sys.stderr, flush=True)  # fmt: skip
    factor = ranks / small_r
    predicted = {k: v * factor for k, v in small["times_s"].items()}
    skip = frozenset(k for k, v in predicted.items() if v > MAX_RUN_S and k != "build")
    if ranks == small_r:
        full = small
    elif not full_size:
        full = {"times_s": {}}
    else:
        full = _median_of([measure(ranks, tensors, skip) for _ in range(repeats)])
    steps = {}
    for k in ("build", "to_json", "parse", "plan"):
        if k in full["times_s"]:
            steps[k] = {"time_s": full["times_s"][k], "measured_at_ranks": ranks, "extrapolated": False,
                        "times_s": full.get("all_times_s", {}).get(k, [full["times_s"][k]])}  # fmt: skip
        else:
            steps[k] = {"time_s": predicted[k], "measured_at_ranks": small_r, "extrapolated": True, "scaling": "linear"}
    b, j = steps["build"], steps["to_json"]
    steps["write"] = {
        "time_s": b["time_s"] + j["time_s"], "extrapolated": b["extrapolated"] or j["extrapolated"],
        "measured_at_ranks": min(b["measured_at_ranks"], j["measured_at_ranks"]), "scaling": j.get("scaling", "linear"),
    }  # fmt: skip
    points = []
    for r in commit_ranks:
        ts = [measure_commit(r, tensors) for _ in range(repeats if r == ranks else 1)]
        t = sorted(ts)[len(ts) // 2]
        points.append((r, t))
        print(f"scale: commit build_manifest at {r} ranks x {tensors} tensors: {t:.2f} s", file=sys.stderr, flush=True)
        later = [x for x in commit_ranks if x > r]
        if later and t * later[0] / r > MAX_RUN_S:
            break
    if points and points[-1][0] == ranks:
        steps["commit"] = {"time_s": points[-1][1], "measured_at_ranks": ranks, "extrapolated": False, "times_s": ts}
    elif points:
        a, b = _fit(points)
        steps["commit"] = {"time_s": a * ranks + b * ranks**2, "measured_at_ranks": points[-1][0], "extrapolated": True,
                           "scaling": f"a*R + b*R^2 fitted (a={a:.2e}, b={b:.2e})", "points": points}  # fmt: skip
    return {
        "ranks": ranks, "tensors": tensors, "entries": ranks * tensors,
        "manifest_bytes": full.get("manifest_bytes", small.get("manifest_bytes", 0) * factor),
        "manifest_bytes_extrapolated": "manifest_bytes" not in full,
        "plan_reads": full.get("plan_reads"), "target_s": TARGET_S, "steps": steps,
        "small": small,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=1000)
    ap.add_argument("--tensors", type=int, default=1000)
    ap.add_argument("--commit-ranks", type=int, nargs="*", help="rank counts the commit step is measured at (default R/10 R)")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--quick", action="store_true", help="measure at ranks/10 only and extrapolate (commit too)")
    ap.add_argument("--repeats", type=int, default=3, help="full-size runs of each step; the median is reported")
    args = ap.parse_args(argv)
    small_r = max(1, args.ranks // 10)
    default = [small_r] if args.quick else sorted({small_r, args.ranks})
    commit_ranks = args.commit_ranks if args.commit_ranks is not None else default
    t0 = time.time()
    result = run(args.ranks, args.tensors, commit_ranks, full_size=not args.quick, repeats=args.repeats)
    import resource

    result.update(
        command=" ".join([os.path.basename(sys.executable), "-m", "benchmarks.scale_bench", *(argv if argv is not None else sys.argv[1:])]),
        started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
        wall_s=time.time() - t0,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scale_bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    from benchmarks import report

    print(report.scale_markdown(result))


if __name__ == "__main__":
    main()
