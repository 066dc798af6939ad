"""Run the whole benchmark suite, then write the tables, plots and BENCHMARKS.md's generated part.

    python -m benchmarks.run [--quick] [--big] [--only local,scale,dist,s3,stall,cloud,dcp,cli] [--runs N]
                             [--out bench-out] [--no-md]

Parts, each in its own process (see benchmarks/README.md):

- local: ``benchmarks.local_bench``: ckpt vs torch.save, safetensors, DCP (1 process) and the
  raw disk limits at 64 MiB, 256 MiB, 1 GiB (``--big``: + 4 GiB), and the 4 -> 3 resharding case;
- scale: ``benchmarks.scale_bench``: a 1,000-rank x 1,000-tensor manifest;
- dist: ``benchmarks.dist_bench``: W gloo processes, ckpt.parallel.torchrun vs DCP;
- s3: ``benchmarks.s3_bench`` if it exists (skipped otherwise);
- stall: ``benchmarks.stall_bench``: the training stall of an async vs a sync save
  (CheckpointManager), 1 GiB on local disk and 256 MiB on moto;
- cloud: ``benchmarks.cloud_bench``: ckpt vs gcsfs/adlfs and obstore on fake-gcs-server and
  Azurite, 256 MiB (the ckpt rows of a backend ckpt lacks are skipped);
- keys: ``benchmarks.keys_bench``: states of 20k and 100k small tensors vs torch.save/load,
  safetensors and DCP; restoring 10 keys; ``ckpt ls`` of 100 such steps;
- dcp: ``benchmarks.dcp_bench``: ``dcp.save``/``dcp.load`` through ``ckpt.dcp`` vs DCP's
  FileSystemWriter/Reader (1 GiB, local disk) and FsspecWriter/Reader (250 MiB, moto S3), 1, 2
  and 4 gloo ranks;
- cli: ``benchmarks.cli_bench``: the start-up time of the ``ckpt`` command line (``--help``,
  ``ls`` of an empty root and of a small one, ``show``, ``verify``) against ``python -c pass``.

``--quick`` (about 5 minutes): 32 MiB, 2 runs, the scale part extrapolated from 100 ranks, a
64 MiB distributed run with 2 writers, small S3 and stall cases. The default run takes about
31 minutes on the 2-core machine; ``--big`` adds 15-20 minutes. Output: ``<out>/*.json`` (raw), ``<out>/*.png`` (plots), ``<out>/<part>.log``
(each part's stdout), ``<out>/run.json`` (the command lines), tables on stdout, and the text
between the GENERATED markers of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any

PARTS = ("local", "scale", "dist", "s3", "stall", "cloud", "dcp", "cli", "keys")
BENCHMARKS_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")


def part_command(part: str, args: argparse.Namespace) -> list[str] | None:
    """The command line of one part, or None if it cannot run here."""
    py = [sys.executable, "-m"]
    quick = ["--quick"] if args.quick else []
    runs = ["--runs", str(args.runs)] if args.runs else []
    if part == "local":
        return [*py, "benchmarks.local_bench", "--out", args.out, *quick, *(["--big"] if args.big else []), *runs]
    if part == "scale":
        return [*py, "benchmarks.scale_bench", "--out", args.out, *quick]
    if part == "dist":
        if args.quick:
            return [*py, "benchmarks.dist_bench", "--gib", "0.0625", "--writers", "2", "--runs", str(args.runs or 2), "--out", args.out]
        return [*py, "benchmarks.dist_bench", "--gib", "1.0", "--writers", "1", "2", "4", "--runs", str(args.runs or 5), "--out", args.out]
    if part == "s3":
        if importlib.util.find_spec("benchmarks.s3_bench") is None:
            return None
        return [*py, "benchmarks.s3_bench", "--out", args.out, *quick, *runs]
    if part == "stall":
        return [*py, "benchmarks.stall_bench", "--out", args.out, *quick, *runs]
    if part == "cloud":
        return [*py, "benchmarks.cloud_bench", "--out", args.out, *quick, *runs]
    if part == "dcp":
        return [*py, "benchmarks.dcp_bench", "--out", args.out, *quick, *runs]
    if part == "cli":
        return [*py, "benchmarks.cli_bench", "--out", args.out, *quick, *runs]
    if part == "keys":
        return [*py, "benchmarks.keys_bench", "--out", args.out, *quick, *runs]
    raise ValueError(part)


def _shown(cmd: list[str]) -> str:
    return shlex.join(["python", *cmd[1:]])


RETRIES = {"dist": 1}  # gloo workers of dist_bench occasionally abort at teardown (SIGABRT)


def run_part(part: str, cmd: list[str], out: str) -> dict[str, Any]:
    """Run one part; its stdout goes to ``<out>/<part>.log``, its stderr (progress) to ours."""
    result = os.path.join(out, f"{part}_bench.json")
    log = os.path.join(out, f"{part}.log")
    print(f"== {part}: {_shown(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    failures: list[int] = []
    for _ in range(1 + RETRIES.get(part, 0)):
        if os.path.exists(result):
            os.remove(result)  # a failed part must not leave the last run's numbers looking current
        with open(log, "w") as f:
            rc = subprocess.call(cmd, stdout=f)
        if rc == 0:
            break
        failures.append(rc)
        print(f"== {part}: exit code {rc}", file=sys.stderr, flush=True)
    wall = time.time() - t0
    if rc == 0 and os.path.exists(result):
        status = "ok" + (f" (after a failed try: exit code {failures[0]})" if failures else "")
    elif rc == 0:
        status = f"no {part}_bench.json written (see {log})"
    else:
        status = f"failed with exit codes {failures} (see {log})"
    print(f"== {part}: {status}, {wall / 60:.1f} min", file=sys.stderr, flush=True)
    return {"command": _shown(cmd), "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)), "wall_s": wall, "status": status}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 runs (~2 minutes): a smoke test")
    ap.add_argument("--big", action="store_true", help="add the 4 GiB size to the local part")
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: " + ",".join(PARTS))
    ap.add_argument("--runs", type=int, help="runs per case (default 5; --quick: 2)")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--no-md", action="store_true", help="do not rewrite BENCHMARKS.md")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {','.join(PARTS)}")
    os.makedirs(args.out, exist_ok=True)
    command = shlex.join(["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    run_path = os.path.join(args.out, "run.json")
    previous: dict[str, Any] = {}
    if os.path.exists(run_path):
        with open(run_path) as f:
            previous = json.load(f).get("parts", {})
    t0 = time.time()
    done: dict[str, Any] = {}
    for part in PARTS:
        if part not in parts:
            continue
        cmd = part_command(part, args)
        if cmd is None:
            done[part] = {"command": "-", "started": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": 0.0,
                          "status": "skipped: benchmarks/s3_bench.py is not there"}  # fmt: skip
            print(f"== {part}: {done[part]['status']}", file=sys.stderr)
            continue
        done[part] = {**run_part(part, cmd, args.out), "quick": args.quick}
    run = {
        "command": command,
        "quick": args.quick,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_s": time.time() - t0,
        # parts not run this time keep their last record (their JSON is still in --out)
        "parts": {p: done.get(p) or previous[p] for p in PARTS if p in done or p in previous},
    }
    with open(run_path, "w") as f:
        json.dump(run, f, indent=1)
    from benchmarks import report

    report.generate(args.out, None if args.no_md else BENCHMARKS_MD)
    print(f"== suite done in {run['wall_s'] / 60:.1f} min; raw JSON and plots in {args.out}/", file=sys.stderr)
    if any(not d["status"].startswith(("ok", "skipped")) for d in done.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
