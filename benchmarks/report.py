"""Tables, plots and the generated part of BENCHMARKS.md, from the suite's raw JSON.

    python -m benchmarks.report [--out bench-out] [--md BENCHMARKS.md] [--no-md]

Reads ``<out>/{local,scale,dist,s3,stall,cloud,dcp}_bench.json`` (whichever exist) and ``<out>/run.json`` (the
command line of the last ``python -m benchmarks.run``), prints one markdown table per part,
writes PNG plots into ``<out>`` and replaces the text between ``<!-- BEGIN GENERATED -->`` and
``<!-- END GENERATED -->`` in BENCHMARKS.md (appending the markers if they are missing).
``benchmarks.run`` calls :func:`generate` at its end; run this module alone to redo the report
from existing JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from typing import Any

GiB = 1 << 30
MiB = 1 << 20
BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"
TARGET_MIB = 1024  # the local targets are stated for 1 GiB
PLOTS_DIR = "docs/benchmarks"  # relative to BENCHMARKS.md: the plots it shows (committed)

LOCAL_ROWS = [  # (method, label, save note, restore note)
    ("raw", "raw disk", "sequential write + fsync", "readinto, preallocated"),
    ("raw-par", "raw disk, parallel", "N files, N threads", "N threads"),
    ("memcpy", "memcpy (`copy_`)", "", "into preallocated"),
    ("ckpt", "ckpt", "`ckpt.save` (fsync)", "`restore(target=)`, in place"),
    ("ckpt-fresh", "ckpt (fresh)", "", "`restore()`, allocates"),
    ("torch", "torch", "`torch.save` + fsync", "`torch.load(weights_only)`, allocates"),
    ("safetensors", "safetensors", "`save_file` + fsync", "`load_file` + touch, allocates"),
    ("dcp", "DCP (1 proc)", "`FileSystemWriter(sync_files)`", "`FileSystemReader`, in place"),
    ("runai", "runai-model-streamer", "", "`SafetensorsStreamer` on the safetensors file, allocates"),
]


# --- numbers ------------------------------------------------------------------------------------------


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def fmt_s(xs: list[float]) -> str:
    """``median s [min-max]`` with precision to suit the magnitude."""
    m = med(xs)
    d = 3 if m < 0.1 else 2
    return f"{m:.{d}f} s [{min(xs):.{d}f}-{max(xs):.{d}f}]"


def gibps(size: float, xs: list[float]) -> str:
    return f"{size / GiB / med(xs):.2f}"


def fmt_bytes(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB"


def fmt_size(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def ratio(x: float) -> str:
    return f"{x:.2f}x"


def met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _load(out: str, name: str) -> dict[str, Any] | None:
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return dict(json.load(f))


def _index(result: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {(c["method"], c["phase"], c.get("requested_bytes", c["size_bytes"])): c for c in result["cases"]}


# --- local --------------------------------------------------------------------------------------------


def _local_sizes(result: dict[str, Any]) -> list[int]:
    return sorted({c["requested_bytes"] for c in result["cases"] if not c["method"].startswith("reshard")})


def best_raw(result: dict[str, Any], size: int, phase: str) -> tuple[str, float] | None:
    """The raw limit: the faster (median) of one stream and N parallel streams."""
    ix = _index(result)
    got = [(m, med(ix[(m, phase, size)]["times_s"])) for m in ("raw", "raw-par") if (m, phase, size) in ix]
    return min(got, key=lambda p: p[1]) if got else None


def local_ratios(result: dict[str, Any], size: int) -> dict[str, float]:
    """Ratios from one run's medians. ``*_vs_raw``: ckpt throughput / raw throughput;
    ``save_<peer>`` / ``restore_<peer>``: peer time / ckpt time (above 1: ckpt is faster)."""
    ix = _index(result)

    def m(method: str, phase: str) -> float | None:
        c = ix.get((method, phase, size))
        return med(c["times_s"]) if c else None

    out: dict[str, float] = {}
    ck_save, ck_cold, ck_fresh = m("ckpt", "save"), m("ckpt", "restore_cold"), m("ckpt-fresh", "restore_cold")
    raw_save, raw_cold = best_raw(result, size, "save"), best_raw(result, size, "restore_cold")
    pairs = [
        ("save_vs_raw", raw_save[1] if raw_save else None, ck_save),
        ("restore_vs_raw", raw_cold[1] if raw_cold else None, ck_cold),
        ("save_torch", m("torch", "save"), ck_save),
        ("save_safetensors", m("safetensors", "save"), ck_save),
        ("save_dcp", m("dcp", "save"), ck_save),
        ("restore_torch", m("torch", "restore_cold"), ck_fresh),
        ("restore_safetensors", m("safetensors", "restore_cold"), ck_fresh),
        ("restore_dcp", m("dcp", "restore_cold"), ck_cold),
        ("restore_runai", m("runai", "restore_cold"), ck_fresh),
        ("restore_runai_in_place", m("runai", "restore_cold"), ck_cold),
        ("fresh_vs_raw", raw_cold[1] if raw_cold else None, ck_fresh),
    ]
    for name, num, den in pairs:
        if num is not None and den:
            out[name] = num / den
    return out


def local_markdown(result: dict[str, Any]) -> str:
    ix = _index(result)
    runs = result["args"]["runs"]
    lines = [
        f"State: {result.get('tensors', 193)} tensors (77 2-D bf16/fp32, 116 1-D fp32), local disk; "
        f"medians of {runs} runs [min-max]; each case in a fresh process. Restores: cold (files evicted "
        "with `posix_fadvise(DONTNEED)`) and then warm. Extra RSS: the peak RSS during the call (the "
        "kernel's high-water mark reset just before it) minus the RSS just before it, minus the state size "
        "for restores that allocate their result: the memory a method needs beyond the state (median).",
    ]
    for size in _local_sizes(result):
        actual = next(c["size_bytes"] for c in result["cases"] if c["requested_bytes"] == size)
        lines += [
            "",
            f"**{fmt_size(size)}** (state: {actual / MiB:.1f} MiB)",
            "",
            "| method | save | GiB/s | extra RSS | restore cold | GiB/s | restore warm | GiB/s | extra RSS |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, label, snote, rnote in LOCAL_ROWS:
            s = ix.get((method, "save", size))
            c = ix.get((method, "restore_cold", size)) or ix.get((method, "copy", size))
            w = ix.get((method, "restore_warm", size))
            if not (s or c):
                continue
            cells = [f"{label}" + (f" ({snote}; {rnote})" if snote and rnote else f" ({snote or rnote})")]
            cells += [fmt_s(s["times_s"]), gibps(actual, s["times_s"]), fmt_bytes(med(s["extra_rss_bytes"]))] if s else ["-"] * 3
            if method == "memcpy" and c:  # a copy is the ceiling of a warm restore, not a cold one
                cells += ["-", "-", fmt_s(c["times_s"]), gibps(actual, c["times_s"]), "-"]
            else:
                cells += [fmt_s(c["times_s"]), gibps(actual, c["times_s"])] if c else ["-"] * 2
                cells += [fmt_s(w["times_s"]), gibps(actual, w["times_s"])] if w else ["-"] * 2
                cells += [fmt_bytes(med(c["extra_rss_bytes"]))] if c else ["-"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Raw disk, parallel: the same bytes cut in {result.get('raw_streams', 'N')} files, each written (or read) by "
        "its own thread. The raw limit below is the faster of the two raw rows (median).",
        "",
        "Ratios (same run, medians). vs raw: ckpt throughput / raw-limit throughput (save vs write+fsync, "
        "restore in place vs cold `readinto`). vs peers: peer time / ckpt time, above 1: ckpt faster "
        "(torch.load, load_file and runai-model-streamer allocate, so they are compared with ckpt (fresh); "
        "DCP loads in place, compared with ckpt in place).",
        "",
        "| size | save vs raw | restore vs raw | fresh restore vs raw | save: torch | safetensors | DCP "
        "| restore: torch | safetensors | DCP | runai |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = ["save_vs_raw", "restore_vs_raw", "fresh_vs_raw", "save_torch", "save_safetensors", "save_dcp",
            "restore_torch", "restore_safetensors", "restore_dcp", "restore_runai"]  # fmt: skip
    for size in _local_sizes(result):
        r = local_ratios(result, size)
        lines.append(f"| {fmt_size(size)} | " + " | ".join(ratio(r[k]) if k in r else "-" for k in keys) + " |")
    imports = [t for c in result["cases"] for t in c.get("first_call_import_s", [])]
    if imports:
        lines += ["", f"Not timed: `import ckpt` (torch already imported; ckpt no longer imports "
                  f"`torch.distributed` for plain tensors): {med(imports):.2f} s here (median of {len(imports)} "
                  "processes); every method's imports happen before the clock starts."]  # fmt: skip
    if any(v is False for c in result["cases"] for v in c.get("hwm_reset", [])):
        lines += ["", "Peak-RSS reset refused here: extra RSS counts from the bare interpreter."]
    rs = reshard_markdown(result)
    if rs:
        lines += ["", rs]
    return "\n".join(lines)


def reshard_summary(result: dict[str, Any]) -> dict[str, Any] | None:
    same = [c for c in result["cases"] if c["method"].startswith("reshard-same")]
    resh = [c for c in result["cases"] if c["method"].startswith("reshard-reshard")]
    if not same or not resh:
        return None
    save = next((c for c in result["cases"] if c["method"].startswith("reshard-save")), None)
    return {"same": same[0], "reshard": resh[0], "save": save, "ratio": med(resh[0]["times_s"]) / med(same[0]["times_s"])}


def reshard_markdown(result: dict[str, Any]) -> str:
    s = reshard_summary(result)
    if s is None:
        return ""
    size = s["same"]["size_bytes"]
    lines = [
        f"Resharding: {fmt_size(s['same']['requested_bytes'])} (state {size / MiB:.1f} MiB) saved by 4 writers "
        "(row shards, `ckpt.begin`/`write_shards`/`commit` in one process"
        + (f", {fmt_s(s['save']['times_s'][:1])} for the save" if s["save"] else "")
        + "), restored by R readers each asking for its rows with `ckpt.Shard` targets, one after the "
        "other in one process, files evicted before each reader; time = sum over readers.",
        "",
        "| restore | readers | time (sum) | GiB/s | per reader (median) | bytes read / state | extra RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, c in (("same layout (4 -> 4)", s["same"]), ("resharded (4 -> 3)", s["reshard"])):
        readers = len(c["per_reader_s"][0])
        per = [med([run[i] for run in c["per_reader_s"]]) for i in range(readers)]
        read = med(c["read_bytes"]) / size
        lines.append(
            f"| {label} | {readers} | {fmt_s(c['times_s'])} | {gibps(size, c['times_s'])} | "
            f"{', '.join(f'{p:.3f}' for p in per)} s | {read:.3f} | {fmt_bytes(med(c['extra_rss_bytes']))} |"
        )
    lines += ["", f"Resharded / same-layout time: **{ratio(s['ratio'])}** (target <= 1.15x: {met(round(s['ratio'], 2) <= 1.15)})."]
    return "\n".join(lines)


# --- scale --------------------------------------------------------------------------------------------

SCALE_LABELS = {
    "build": "build the manifest dataclasses",
    "to_json": "serialize: `Manifest.to_json()`",
    "write": "write = build + serialize",
    "parse": "parse: `manifest.parse()`",
    "plan": "plan a 1-rank restore: `plan_restore()`",
    "commit": "commit path: `build_manifest()` from the writers' reports",
}


def scale_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Synthetic manifest: {result['ranks']:,} ranks x {result['tensors']:,} tensors = "
        f"{result['entries']:,} shard entries (every tensor row-sharded over every rank), manifest "
        f"{result['manifest_bytes'] / MiB:.0f} MiB{' (extrapolated)' if result.get('manifest_bytes_extrapolated') else ''}; "
        f"peak RSS {fmt_bytes(result.get('peak_rss_bytes', 0))}. One timing each.",
        "",
        "| step | time | target | met | how |",
        "|---|---|---|---|---|",
    ]
    order = [k for k in ("build", "to_json", "write", "parse", "plan", "commit") if k in result["steps"]]
    for k in order + [k for k in result["steps"] if k not in order]:
        st = result["steps"][k]
        how = (
            f"extrapolated from {st['measured_at_ranks']} ranks ({st.get('scaling', 'linear')})"
            if st["extrapolated"]
            else f"measured at {st['measured_at_ranks']} ranks"
        )
        part = k in ("build", "to_json")  # the target is on their sum, "write"
        if len(st.get("times_s", [])) > 1:
            how += f", median of {len(st['times_s'])} [{min(st['times_s']):.2f}-{max(st['times_s']):.2f}]"
        if part:
            goal = "(part of write) | | "
        elif k == "commit":
            goal = "(no stated target; DESIGN: well under a few seconds) | | "
        else:
            goal = f"< {result['target_s']:g} s | {met(st['time_s'] < result['target_s'])} | "
        lines.append(f"| {SCALE_LABELS.get(k, k)} | {'~' if st['extrapolated'] else ''}{st['time_s']:.2f} s | " + goal + f"{how} |")
    return "\n".join(lines)


# --- dist ---------------------------------------------------------------------------------------------


def dist_markdown(result: dict[str, Any]) -> str:
    args = result["args"]
    lines = [
        f"`benchmarks.dist_bench`: {args['gib']:g} GiB of DTensor row shards, W gloo processes, local disk; "
        f"medians of {args['runs']} runs [min-max]; ratio = DCP time / ckpt time (above 1: ckpt faster).",
        "",
        "| writers | ckpt save | DCP save | save ratio | ckpt restore (cold) | DCP restore (cold) | restore ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    raw = result["raw"]
    for w in args["writers"]:
        cells = []
        for phase in ("save_s", "restore_s"):
            c, d = raw[f"ckpt/{w}/{phase}"]["values"], raw[f"dcp/{w}/{phase}"]["values"]
            cells += [fmt_s(c), fmt_s(d), ratio(med(d) / med(c))]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- s3 (schema owned by benchmarks/s3_bench.py) ------------------------------------------------------


def _one(x: Any) -> float | None:
    if isinstance(x, list):
        return max(x) if x else None
    return x if isinstance(x, int | float) else None


def _s3_where(c: dict[str, Any]) -> str:
    """What tells apart cases of one method, size and phase besides the method (e.g. the endpoint)."""
    return str(c.get("endpoint", "-"))


def s3_markdown(result: dict[str, Any]) -> str:
    cases = [c for c in result.get("cases", []) if c.get("times_s")]
    lines = [
        "`benchmarks.s3_bench` (its docstring and `s3_bench.md` describe the setup); medians [min-max]; "
        "vs ckpt = this method's time / ckpt's time for the same size, endpoint and phase (above 1: ckpt faster).",
        "",
        "| size | endpoint | phase | method | time | GiB/s | vs ckpt | peak RSS | requests |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for c in cases:
        groups.setdefault((int(c["size_bytes"]), _s3_where(c), str(c["phase"])), []).append(c)
    for (size, where, phase), cs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "save")):
        ck = next((c for c in cs if c["method"] == "ckpt"), None)
        for c in cs:
            rss, req = _one(c.get("peak_rss_bytes")), _one(c.get("requests"))
            vs = ratio(med(c["times_s"]) / med(ck["times_s"])) if ck else "-"
            lines.append(
                f"| {fmt_size(size)} | {where} | {phase} | {c['method']} | {fmt_s(c['times_s'])} | "
                f"{gibps(size, c['times_s'])} | {vs} | {fmt_bytes(rss) if rss is not None else '-'} | "
                f"{int(req) if req is not None else '-'} |"
            )
    if not cases:
        lines.append("| - | - | - | no cases in s3_bench.json | - | - | - | - | - |")
    return "\n".join(lines)


# --- cloud (schema and table owned by benchmarks/cloud_bench.py) -----------------------------------------


def cloud_markdown(result: dict[str, Any]) -> str:
    from benchmarks.cloud_bench import build_report

    return build_report(result["cases"], result["args"])


def plot_cloud(result: dict[str, Any], out: str) -> list[str]:
    return []  # the table carries it: cold and warm times per client


# --- dcp (schema and table owned by benchmarks/dcp_bench.py) -------------------------------------------


def dcp_markdown(result: dict[str, Any]) -> str:
    from benchmarks.dcp_bench import build_report

    return build_report(result["cases"], result["args"])


def plot_dcp(result: dict[str, Any], out: str) -> list[str]:
    return []  # the tables carry it


# --- cli (schema and table owned by benchmarks/cli_bench.py) -------------------------------------------


def cli_markdown(result: dict[str, Any]) -> str:
    from benchmarks.cli_bench import build_report

    return build_report(result["cases"], result["args"])


def plot_cli(result: dict[str, Any], out: str) -> list[str]:
    return []  # the table carries it


# --- keys (schema and table owned by benchmarks/keys_bench.py) ----------------------------------------


def keys_markdown(result: dict[str, Any]) -> str:
    from benchmarks.keys_bench import report

    return report(result)


def plot_keys(result: dict[str, Any], out: str) -> list[str]:
    return []  # the table carries it


# --- stall (benchmarks/stall_bench.py) ---------------------------------------------------------------


def _stall_index(result: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["backend"], c["mode"]): c for c in result.get("cases", [])}


def stall_markdown(result: dict[str, Any]) -> str:
    ix = _stall_index(result)
    lines = [
        f"`CheckpointManager.save()` of the local benchmark's state, {result['args']['runs']} runs, each case in a fresh "
        f"process making {next(iter(ix.values()))['saves_per_run'] if ix else '-'} saves in a row (retention keep_last=1). "
        "Stall = time the training thread is blocked in `save()`; sync blocks for write + commit, async for the copy "
        "into host staging buffers (first save: buffers allocated; steady: reused). Extra RSS = peak - RSS before "
        "the first save (async includes its staging copy).",
        "",
        "| backend | state | sync save (stall) | async stall, first | async stall, steady | async save until committed | "
        "steady stall / sync | extra RSS sync | extra RSS async |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for backend in ("local", "s3"):
        sy, asy = ix.get((backend, "sync")), ix.get((backend, "async"))
        if not sy or not asy:
            continue
        r = med(asy["steady_stall_s"]) / med(sy["steady_stall_s"])
        lines.append(
            f"| {backend} | {fmt_bytes(sy['state_bytes'])} | {fmt_s(sy['steady_stall_s'])} | {fmt_s(asy['first_stall_s'])} "
            f"| {fmt_s(asy['steady_stall_s'])} | {fmt_s(asy['steady_total_s'])} | {r:.2f}x "
            f"| {fmt_bytes(med(sy['extra_rss_bytes']))} | {fmt_bytes(med(asy['extra_rss_bytes']))} "
            f"({med(asy['extra_rss_bytes']) / asy['state_bytes']:.2f}x state) |"
        )
    return "\n".join(lines)


def stall_target_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    ix = _stall_index(result)
    rows = []
    for backend in ("local", "s3"):
        sy, asy = ix.get((backend, "sync")), ix.get((backend, "async"))
        if not sy or not asy:
            continue
        r = med(asy["steady_stall_s"]) / med(sy["steady_stall_s"])
        x = med(asy["extra_rss_bytes"]) / asy["state_bytes"]
        at = f"{fmt_bytes(asy['state_bytes'])}, {backend}"
        rows.append(("async save stall <= 10% of the sync save (steady state)", at, f"{r:.1%}", met(r <= 0.10)))
        rows.append(("async save extra peak memory <= 1.2x the state", at, f"{x:.2f}x", met(x <= 1.2)))
    return rows


def plot_stall(result: dict[str, Any], out: str) -> list[str]:
    plt = _plt()
    ix = _stall_index(result)
    backends = [b for b in ("local", "s3") if (b, "sync") in ix and (b, "async") in ix]
    if not backends:
        return []
    fig, ax = plt.subplots(figsize=(8, 4))
    series: dict[str, list[tuple[float, float, float] | None]] = {
        "sync save": [_spread(ix[(b, "sync")]["steady_stall_s"]) for b in backends],
        "async stall (first)": [_spread(ix[(b, "async")]["first_stall_s"]) for b in backends],
        "async stall (steady)": [_spread(ix[(b, "async")]["steady_stall_s"]) for b in backends],
    }
    _bars(ax, [f"{b}, {fmt_bytes(ix[(b, 'sync')]['state_bytes'])}" for b in backends], series, "seconds blocked (median, min-max)")
    ax.set_title("Training stall: async vs sync save")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "stall.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _spread(xs: list[float]) -> tuple[float, float, float]:
    return (med(xs), min(xs), max(xs))


# --- targets ------------------------------------------------------------------------------------------


def _ge(x: float, bar: float) -> bool:
    return round(x, 2) >= bar  # judged as shown (2 decimals), so a "0.90x" is never "not met"


S3_TARGETS = [  # (label, phase, method, other method, bar): ckpt throughput / other's >= bar
    ("S3 restore: >= 0.8x raw s3fs GET", "restore", "ckpt", "raw", 0.8),
    ("S3 restore: >= 10x DCP FsspecReader (1 rank)", "restore", "ckpt", "dcp", 10.0),
    ("S3 save: >= 0.8x raw s3fs PUT", "save", "ckpt", "raw", 0.8),
    ("S3 save: >= 2x DCP FsspecWriter (1 rank)", "save", "ckpt", "dcp", 2.0),
]


def s3_target_rows(s3: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The S3 targets at the largest size measured, per endpoint (with +latency: vs raw only)."""
    cases = [c for c in s3.get("cases", []) if c.get("times_s")]
    if not cases:
        return []
    size = max(int(c["size_bytes"]) for c in cases)
    ix = {(c["method"], c["phase"], _s3_where(c)): med(c["times_s"]) for c in cases if int(c["size_bytes"]) == size}
    rows = []
    for where in sorted({_s3_where(c) for c in cases}):
        for label, phase, mine, other, bar in S3_TARGETS:
            if where != "moto" and other != "raw":
                continue  # the issue states the latency target against raw only
            a, b = ix.get((mine, phase, where)), ix.get((other, phase, where))
            if a and b:
                rows.append((label + ("" if where == "moto" else f", through {where}"), fmt_size(size), ratio(b / a), met(_ge(b / a, bar))))
    return rows


def targets_markdown(
    local: dict[str, Any] | None,
    scale: dict[str, Any] | None,
    s3: dict[str, Any] | None = None,
    stall: dict[str, Any] | None = None,
) -> str:
    rows: list[tuple[str, str, str, str]] = []  # target, at, measured, met
    if local:
        sizes = _local_sizes(local)
        if sizes:
            below = [s for s in sizes if s <= TARGET_MIB * MiB]
            size = max(below) if below else min(sizes)
            at = fmt_size(size) + ("" if size == TARGET_MIB * MiB else " (stated for 1 GiB)")
            r = local_ratios(local, size)
            ix = _index(local)
            if "save_vs_raw" in r:
                rows.append(("local save, 1 writer: >= 0.9x raw write+fsync throughput (faster raw row)", at, ratio(r["save_vs_raw"]), met(_ge(r["save_vs_raw"], 0.9))))
            for peer, name in (("torch", "torch.save"), ("safetensors", "safetensors"), ("dcp", "DCP")):
                k = f"save_{peer}"
                if k in r:
                    rows.append((f"local save: faster than {name} ({name} time / ckpt time)", at, ratio(r[k]), met(r[k] > 1)))
            if "restore_vs_raw" in r:
                rows.append(("local restore (in place, cold): >= 0.9x raw cold read (faster raw row)", at, ratio(r["restore_vs_raw"]), met(_ge(r["restore_vs_raw"], 0.9))))
            if "restore_runai" in r:
                rows.append(("local restore: at least as fast as runai-model-streamer (both allocate; runai time / ckpt fresh time)", at, ratio(r["restore_runai"]), met(_ge(r["restore_runai"], 1.0))))
            for phase, what in (("save", "sync save"), ("restore_cold", "restore (in place)"), ("restore_cold", "restore (fresh)")):
                method = "ckpt-fresh" if "fresh" in what else "ckpt"
                c = ix.get((method, phase, size))
                if c:
                    extra = med(c["extra_rss_bytes"])
                    rows.append((f"peak memory, {what}: <= state + 256 MiB", at, f"state + {fmt_bytes(extra)}", met(extra <= 256 * MiB)))
        s = reshard_summary(local)
        if s:
            rows.append(("resharded restore 4 -> 3: <= 1.15x same layout", fmt_size(s["same"]["requested_bytes"]), ratio(s["ratio"]), met(round(s["ratio"], 2) <= 1.15)))
    if scale:
        for k, st in scale["steps"].items():
            if k in ("build", "to_json", "commit"):
                continue  # the target is on their sum, "write"; the commit path has no stated target
            rows.append((
                f"scale: {SCALE_LABELS.get(k, k)} < 2 s", f"{scale['ranks']:,} x {scale['tensors']:,}",
                f"{'~' if st['extrapolated'] else ''}{st['time_s']:.2f} s", met(st["time_s"] < 2.0),
            ))  # fmt: skip
    if s3:
        rows += s3_target_rows(s3)
    if stall:
        rows += stall_target_rows(stall)
    if not rows:
        return ""
    out = ["| target | at | measured | |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out)


# --- plots --------------------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(
    ax: Any, groups: list[str], series: dict[str, list[tuple[float, float, float] | None]], ylabel: str,
    colors: dict[str, str] | None = None,
) -> None:  # fmt: skip
    """Grouped bars: series name -> per group (median, low, high) or None."""
    n = max(1, len(series))
    width = 0.8 / n
    for i, (name, vals) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        mid = [v[0] if v else 0.0 for v in vals]
        err = [[v[0] - v[1] if v else 0.0 for v in vals], [v[2] - v[0] if v else 0.0 for v in vals]]
        ax.bar(xs, mid, width, yerr=err, capsize=2, label=name, color=(colors or {}).get(name))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def _thr(size: float, xs: list[float]) -> tuple[float, float, float]:
    return size / GiB / med(xs), size / GiB / max(xs), size / GiB / min(xs)


def plot_local(result: dict[str, Any], out: str) -> list[str]:
    plt = _plt()
    ix = _index(result)
    sizes = _local_sizes(result)
    actual = {s: next(c["size_bytes"] for c in result["cases"] if c["requested_bytes"] == s) for s in sizes}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, phase, title in zip(axes, ("save", "restore_cold", "restore_warm"), ("save (fsync)", "restore, cold page cache", "restore, warm page cache"), strict=True):
        series: dict[str, list[tuple[float, float, float] | None]] = {}
        for method, label, _, _ in LOCAL_ROWS:
            p = "copy" if method == "memcpy" and phase == "restore_warm" else phase
            vals = [(_thr(actual[s], ix[(method, p, s)]["times_s"]) if (method, p, s) in ix else None) for s in sizes]
            if any(vals):
                series[label] = vals
        colors = {label: f"C{i}" for i, (_, label, _, _) in enumerate(LOCAL_ROWS)}
        _bars(ax, [fmt_size(s) for s in sizes], series, "GiB/s (median, min-max)", colors)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle("Local disk throughput by method and state size (higher is better)")
    fig.tight_layout()
    path = os.path.join(out, "local_throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths = [path]
    s = reshard_summary(result)
    if s:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        labels = ["same layout 4 -> 4", "resharded 4 -> 3"]
        cs = [s["same"], s["reshard"]]
        mids = [med(c["times_s"]) for c in cs]
        errs = [[m - min(c["times_s"]) for m, c in zip(mids, cs, strict=True)], [max(c["times_s"]) - m for m, c in zip(mids, cs, strict=True)]]
        a1.bar(labels, mids, yerr=errs, capsize=4, color=["tab:blue", "tab:orange"])
        a1.set_ylabel("restore time, sum over readers (s)")
        a1.set_title(f"resharded / same = {s['ratio']:.2f}x (target <= 1.15x)")
        for i, c in enumerate(cs):
            readers = len(c["per_reader_s"][0])
            per = [med([run[r] for run in c["per_reader_s"]]) for r in range(readers)]
            a2.bar([f"{'4->4' if i == 0 else '4->3'} r{r}" for r in range(readers)], per, color="tab:blue" if i == 0 else "tab:orange")
        a2.set_ylabel("per reader (s, median)")
        a2.set_title("per reader, cold")
        fig.suptitle(f"Resharding cost, {fmt_size(s['same']['requested_bytes'])}, local disk")
        fig.tight_layout()
        path = os.path.join(out, "reshard.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_scale(result: dict[str, Any], out: str) -> list[str]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [k for k in ("write", "parse", "plan", "commit") if k in result["steps"]]
    vals = [result["steps"][k]["time_s"] for k in names]
    colors = ["tab:gray" if result["steps"][k]["extrapolated"] else "tab:blue" for k in names]
    ax.bar(names, vals, color=colors)
    ax.axhline(result["target_s"], color="red", linestyle="--", label=f"target {result['target_s']:g} s")
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log; gray = extrapolated)")
    ax.set_title(f"Manifest of {result['ranks']:,} ranks x {result['tensors']:,} tensors")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "scale.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_dist(result: dict[str, Any], out: str) -> list[str]:
    plt = _plt()
    raw = result["raw"]
    ws = result["args"]["writers"]
    size = result["args"]["gib"] * GiB
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, phase, title in zip(axes, ("save_s", "restore_s"), ("save", "restore (cold)"), strict=True):
        series = {m.upper() if m == "dcp" else m: [_thr(size, raw[f"{m}/{w}/{phase}"]["values"]) for w in ws] for m in ("ckpt", "dcp")}
        _bars(ax, [f"{w} writers" for w in ws], dict(series), "GiB/s (median, min-max)")  # type: ignore[arg-type]
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"Distributed, {result['args']['gib']:g} GiB, ckpt vs DCP")
    fig.tight_layout()
    path = os.path.join(out, "dist_throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_s3(result: dict[str, Any], out: str) -> list[str]:
    cases = [c for c in result.get("cases", []) if c.get("times_s")]
    if not cases:
        return []
    plt = _plt()
    phases = sorted({str(c["phase"]) for c in cases}, key=lambda p: p != "save")
    groups = sorted({(int(c["size_bytes"]), _s3_where(c)) for c in cases})
    fig, axes = plt.subplots(1, len(phases), figsize=(7 * len(phases), 4.5), squeeze=False)
    for ax, phase in zip(axes[0], phases, strict=True):
        methods = list(dict.fromkeys(c["method"] for c in cases if c["phase"] == phase))
        series: dict[str, list[tuple[float, float, float] | None]] = {}
        for m in methods:
            by = {(int(c["size_bytes"]), _s3_where(c)): c for c in cases if c["phase"] == phase and c["method"] == m}
            series[m] = [_thr(g[0], by[g]["times_s"]) if g in by else None for g in groups]
        _bars(ax, [f"{fmt_size(s)}, {w}" for s, w in groups], series, "GiB/s (median, min-max)")
        ax.set_title(phase)
        ax.legend(fontsize=8)
    fig.suptitle("S3 throughput by method, size and endpoint")
    fig.tight_layout()
    path = os.path.join(out, "s3_throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# --- the whole report -----------------------------------------------------------------------------


def machine() -> str:
    import safetensors
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return (
        f"{os.cpu_count()} CPUs, {mem:.1f} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, safetensors {safetensors.__version__}"
    )


def _part_meta(run: dict[str, Any] | None, part: str, data: dict[str, Any]) -> str:
    p = (run or {}).get("parts", {}).get(part)
    if p:
        return f"Command: `{p['command']}` (started {p['started']}, {p['wall_s'] / 60:.1f} min)."
    if "command" in data:
        return f"Command: `{data['command']}` (started {data.get('started', '?')})."
    return ""


def generate(out: str, md_path: str | None = "BENCHMARKS.md") -> str:
    """Print the tables, write the plots, rewrite the generated part of ``md_path``; return it."""
    run = _load(out, "run.json")
    parts: list[tuple[str, str, dict[str, Any], Any, Any]] = []  # name, title, data, table, plot
    for part, title, table, plot in (
        ("local", "Local disk: ckpt vs torch.save, safetensors, DCP and the raw limits", local_markdown, plot_local),
        ("scale", "Manifest scale", scale_markdown, plot_scale),
        ("dist", "Distributed save and restore vs DCP", dist_markdown, plot_dist),
        ("s3", "S3 endpoint", s3_markdown, plot_s3),
        ("stall", "Async save: training stall", stall_markdown, plot_stall),
        ("cloud", "GCS and Azure emulators: ckpt vs the raw clients", cloud_markdown, plot_cloud),
        ("dcp", "DCP storages: ckpt.dcp vs FileSystemWriter and FsspecWriter", dcp_markdown, plot_dcp),
        ("cli", "Command line start-up", cli_markdown, plot_cli),
        ("keys", "Many small tensors: ckpt vs torch.save, safetensors and DCP", keys_markdown, plot_keys),
    ):
        data = _load(out, f"{part}_bench.json")
        if data is not None:
            parts.append((part, title, data, table, plot))
    sections = []
    if run:
        status = ", ".join(f"{k}: {v['status']}" for k, v in run.get("parts", {}).items())
        sections.append(
            f"Last run: `{run['command']}`, finished {run['finished']} ({run['wall_s'] / 60:.1f} min). Each part "
            f"below comes from its latest run, whose command line it gives ({status}). Machine: {machine()}."
        )
        quick = [k for k, v in run.get("parts", {}).items() if v.get("quick")]
        if quick:
            sections.append(
                f"> **Quick mode** for {', '.join(quick)} (small sizes, 2 runs): a smoke test of the suite, "
                "not a measurement. Run `python -m benchmarks.run` for the real numbers."
            )
    else:
        sections.append(f"Generated by `python -m benchmarks.report --out {out}`. Machine: {machine()}.")
    local = next((d for p, _, d, _, _ in parts if p == "local"), None)
    scale = next((d for p, _, d, _, _ in parts if p == "scale"), None)
    s3 = next((d for p, _, d, _, _ in parts if p == "s3"), None)
    stall = next((d for p, _, d, _, _ in parts if p == "stall"), None)
    tg = targets_markdown(local, scale, s3, stall)
    if tg:
        sections += ["### Targets of the performance issue", tg]
    plots: list[str] = []
    for part, title, data, table, plot in parts:
        text = table(data)
        print(f"\n## {title}\n\n{text}\n")
        sections += [f"### {title}", _part_meta(run, part, data), text]
        try:
            plots += plot(data, out)
        except Exception as err:  # a plot is never worth failing the report for
            print(f"report: {part} plot failed: {err!r}", file=sys.stderr)
    if run and "s3" in run.get("parts", {}) and not any(p == "s3" for p, *_ in parts):
        sections += ["### S3 endpoint", f"Not measured: {run['parts']['s3']['status']}."]
    sections += [f"Raw JSON and plots in `{out}/`: " + ", ".join(f"`{os.path.basename(p)}`" for p in plots) + "."]
    if md_path and plots:  # the plots BENCHMARKS.md shows are committed next to it
        shown = os.path.join(os.path.dirname(os.path.abspath(md_path)), PLOTS_DIR)
        os.makedirs(shown, exist_ok=True)
        for p in plots:
            shutil.copyfile(p, os.path.join(shown, os.path.basename(p)))
        sections += ["### Plots", "\n\n".join(f"![{os.path.basename(p)}]({PLOTS_DIR}/{os.path.basename(p)})" for p in plots)]
    body = "\n\n".join(s for s in sections if s)
    if md_path:
        write_generated(md_path, body)
    return body


def write_generated(md_path: str, body: str) -> None:
    """Replace what lies between the markers (append them if absent); keep everything else."""
    text = "# Benchmarks\n"
    if os.path.exists(md_path):
        with open(md_path) as f:
            text = f.read()
    block = f"{BEGIN}\n\n## Generated results\n\n{body}\n\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(md_path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--md", default="BENCHMARKS.md")
    ap.add_argument("--no-md", action="store_true", help="do not touch BENCHMARKS.md")
    args = ap.parse_args(argv)
    generate(args.out, None if args.no_md else args.md)
    print(f"report: done at {time.strftime('%H:%M:%S')}", file=sys.stderr)


if __name__ == "__main__":
    main()
