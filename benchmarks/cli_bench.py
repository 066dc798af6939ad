"""Start-up time of the ``ckpt`` command line: how long a command that moves no tensor takes.

    python -m benchmarks.cli_bench [--out bench-out] [--runs 5] [--baseline DIR] [--quick]

Each case is a fresh ``python -m ckpt ...`` process, timed from spawn to exit (wall clock):

- ``python -c pass``: the floor, the interpreter's own start-up;
- ``import ckpt``: ``python -c "import ckpt"``;
- ``ckpt --help``;
- ``ckpt ls EMPTY``: a root with no checkpoint (exit code 3);
- ``ckpt ls ROOT``, ``ckpt show ROOT``, ``ckpt verify ROOT``: a local root with one small step
  (2 tensors, 8 KiB), saved by this checkout before the clock starts.

``--baseline DIR`` runs every case also with the ``ckpt`` package of another checkout (e.g. the
main branch's, to compare before and after a change) in the same run, interleaved with this
checkout's: in each run every case runs once per checkout, the checkouts' order alternating
from run to run. A process runs in its checkout's directory with that directory as
``PYTHONPATH``, so its ``ckpt`` is the one imported. Byte code is cached (under
``<out>/pycache``, ``PYTHONPYCACHEPREFIX``, so no checkout is written to) and one untimed run of
each case per checkout fills that cache first: the times are those of an installed package, not
of compiling it. One more untimed run with ``-X importtime`` records whether the case imported
torch, numpy or fsspec.

Output: ``<out>/cli_bench.json`` (every run's seconds per case and checkout) and
``<out>/cli_bench.md`` (the table printed at the end): medians [min-max] in seconds, the median
minus the floor's, and baseline / this checkout (above 1: this checkout starts faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "numpy", "fsspec")


def _cases(empty: str, root: str) -> list[tuple[str, list[str]]]:
    return [
        ("python -c pass", ["-c", "pass"]),
        ("import ckpt", ["-c", "import ckpt"]),
        ("ckpt --help", ["-m", "ckpt", "--help"]),
        ("ckpt ls EMPTY", ["-m", "ckpt", "ls", empty]),
        ("ckpt ls ROOT", ["-m", "ckpt", "ls", root]),
        ("ckpt show ROOT", ["-m", "ckpt", "show", root]),
        ("ckpt verify ROOT", ["-m", "ckpt", "verify", root]),
    ]


def _env(checkout: str, pycache: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
    return {**env, "PYTHONPATH": checkout, "PYTHONPYCACHEPREFIX": pycache}


def _time(argv: list[str], checkout: str, pycache: str) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, *argv], cwd=checkout, env=_env(checkout, pycache), capture_output=True, timeout=300
    )
    dt = time.perf_counter() - t0
    if p.returncode not in (0, 3):  # 3: `ls` of the empty root
        raise RuntimeError(f"{argv} in {checkout}: exit code {p.returncode}: {p.stderr.decode()[-2000:]}")
    return dt


def _imports(argv: list[str], checkout: str, pycache: str) -> list[str]:
    p = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        cwd=checkout,
        env=_env(checkout, pycache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    names = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    return [m for m in HEAVY if m in names]


def _make_roots(tmp: str) -> tuple[str, str]:
    import torch

    import ckpt

    empty, root = os.path.join(tmp, "empty"), os.path.join(tmp, "run")
    os.makedirs(empty)
    ckpt.save(root, {"w": torch.randn(32, 32), "b": torch.zeros(1024, dtype=torch.bfloat16), "lr": 0.1}, step=1)
    return empty, root


def run(runs: int, baseline: str | None, out: str) -> dict[str, Any]:
    checkouts = {"this": REPO, **({"baseline": os.path.abspath(baseline)} if baseline else {})}
    pycache = os.path.join(os.path.abspath(out), "pycache")
    with tempfile.TemporaryDirectory(prefix="ckpt-cli-bench-") as tmp:
        empty, root = _make_roots(tmp)
        cases = _cases(empty, root)
        times: dict[str, dict[str, list[float]]] = {name: {c: [] for c in checkouts} for name, _ in cases}
        imports: dict[str, dict[str, list[str]]] = {name: {} for name, _ in cases}
        for name, argv in cases:
            for label, checkout in checkouts.items():
                _time(argv, checkout, pycache)  # fills the byte-code cache
                imports[name][label] = _imports(argv, checkout, pycache)
        for i in range(runs):
            order = list(checkouts.items())
            if i % 2:
                order.reverse()
            for name, argv in cases:
                for label, checkout in order:
                    times[name][label].append(_time(argv, checkout, pycache))
            print(f"run {i + 1}/{runs} done", file=sys.stderr, flush=True)
    return {
        "args": {"runs": runs, "checkouts": checkouts, "python": platform.python_version(), "cpus": os.cpu_count()},
        "cases": [{"case": name, "times_s": times[name], "imports": imports[name]} for name, _ in cases],
    }


def _med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _cell(xs: list[float]) -> str:
    return f"{_med(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"


def build_report(cases: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    labels = list(meta["checkouts"])
    floor = {c: _med(cases[0]["times_s"][c]) for c in labels}
    head = " | ".join(f"{c} s | {c} - floor s | {c} imports" for c in labels)
    lines = [
        f"Wall time of one fresh `python -m ckpt` process (byte code cached), medians of {meta['runs']} runs "
        f"[min-max] in seconds; the floor is `python -c pass`; imports: which of torch, numpy, fsspec the "
        f"process imported. Python {meta['python']}, {meta['cpus']} CPUs. "
        + ", ".join(f"{c}: `{path}`" for c, path in meta["checkouts"].items()),
        "",
        f"| case | {head} |" + (" baseline / this |" if "baseline" in labels else ""),
        "|---|" + "---|---|---|" * len(labels) + ("---|" if "baseline" in labels else ""),
    ]
    for c in cases:
        cells = []
        for label in labels:
            xs = c["times_s"][label]
            cells.append(f"{_cell(xs)} | {_med(xs) - floor[label]:.3f} | {', '.join(c['imports'][label]) or '-'}")
        ratio = ""
        if "baseline" in labels:
            ratio = f" {_med(c['times_s']['baseline']) / _med(c['times_s']['this']):.2f}x |"
        lines.append(f"| {c['case']} | {' | '.join(cells)} |{ratio}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=None, help="timed runs per case (default 5; --quick: 2)")
    ap.add_argument("--baseline", help="another checkout whose ckpt runs the same cases (e.g. main's)")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--quick", action="store_true", help="2 runs")
    args = ap.parse_args(argv)
    runs = args.runs or (2 if args.quick else 5)
    os.makedirs(args.out, exist_ok=True)
    result = run(runs, args.baseline, args.out)
    md = build_report(result["cases"], result["args"])
    with open(os.path.join(args.out, "cli_bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "cli_bench.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
