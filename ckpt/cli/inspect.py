"""``ckpt ls``, ``ckpt du``, ``ckpt show`` and ``ckpt verify``: the commands that only read.

None of them imports torch; the manifest model (numpy) comes with the first manifest read and
the verifier (crc32c, safetensors headers) with ``verify``, so ``ckpt ls`` of an empty root
imports neither."""

from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckpt._concurrency import run_all
from ckpt.cli._common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    clean,
    count,
    open_root,
    print_json,
    problem_json,
    progress_bar,
    table,
)
from ckpt.errors import CheckpointNotFoundError, ManifestError
from ckpt.format.layout import manifest_path
from ckpt.lifecycle.steps import committed_steps, read_head, read_step, resolve_step
from ckpt.units import human_size

if TYPE_CHECKING:
    from ckpt.format.manifest import FileEntry, Head, Manifest
    from ckpt.lifecycle.verify import Problem, VerifyReport
    from ckpt.progress import Progress
    from ckpt.storage import Storage

_LIST_THREADS = 8  # manifests read concurrently by `ls`


# --- ls ----------------------------------------------------------------------------------------


def _summaries(storage: Storage) -> tuple[list[int], dict[int, _Summary | ManifestError]]:
    """The committed steps (ascending) and each one's summary, or why its manifest is invalid."""
    steps = committed_steps(storage)
    if not steps:
        raise CheckpointNotFoundError(f"{storage.url}: no checkpoints")
    found: dict[int, _Summary | ManifestError] = {}

    def load(step: int) -> None:  # keeps a summary, not the manifest (memory: one at a time per thread)
        try:
            found[step] = _Summary.of(read_head(storage, step))
        except ManifestError as err:
            found[step] = err
        except CheckpointNotFoundError:
            pass  # retired between the listing and the read

    run_all(load, steps, num_threads=_LIST_THREADS)
    return [s for s in steps if s in found], found


def cmd_ls(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    storage = open_root(args.root, opts)
    listed, found = _summaries(storage)
    if args.json:
        print_json({"root": storage.url, "steps": [_ls_json(s, found[s]) for s in listed]})
        return EXIT_OK
    rows = [["STEP", "CREATED", "SIZE", "TENSORS", "FILES", "WORLD"]]
    invalid: dict[int, str] = {}
    for s in listed:
        m = found[s]
        if isinstance(m, ManifestError):
            rows.append([str(s), "INVALID", "", "", "", ""])
            invalid[s] = clean(str(m))
        else:
            rows.append(
                [
                    str(s),
                    clean(m.created),
                    human_size(m.total_bytes),
                    str(m.tensors),
                    str(m.files),
                    str(m.world_size),
                ]
            )
    lines = table(rows, right={0, 2, 3, 4, 5})
    print(lines[0])
    for line, s in zip(lines[1:], listed, strict=True):
        print(f"{line}  {invalid[s]}" if s in invalid else line)
    return EXIT_OK


@dataclass(frozen=True, slots=True)
class _Summary:
    """What ``ckpt ls`` and ``ckpt du`` show of a step's manifest."""

    created: str
    attempt: str
    total_bytes: int
    tensors: int
    files: int
    objects: int
    world_size: int
    sizes: dict[str, FileEntry]  # its files

    @classmethod
    def of(cls, m: Head) -> _Summary:
        return cls(m.created, m.attempt, m.total_bytes, m.num_tensors, len(m.files), m.num_objects, m.world_size,
                   m.files)  # fmt: skip


# --- du ----------------------------------------------------------------------------------------


def cmd_du(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    from ckpt.lifecycle.usage import usage

    storage = open_root(args.root, opts)
    listed, found = _summaries(storage)
    valid = {s: m.sizes for s in listed if isinstance(m := found[s], _Summary)}
    u = usage(valid)
    invalid = [s for s in listed if s not in valid]
    if args.json:
        print_json({
            "root": storage.url,
            "steps": [{"step": r.step, "referenced_bytes": r.referenced_bytes, "new_bytes": r.new_bytes,
                       "shared_bytes": r.shared_bytes} for r in u.steps],
            "referenced_bytes": u.referenced_bytes,
            "stored_bytes": u.stored_bytes,
            "invalid_steps": invalid,
        })  # fmt: skip
        return EXIT_OK
    rows = [["STEP", "REFERENCED", "NEW", "SHARED"]]
    rows += [[str(r.step), human_size(r.referenced_bytes), human_size(r.new_bytes), human_size(r.shared_bytes)]
             for r in u.steps]  # fmt: skip
    rows.append(["total", human_size(u.referenced_bytes), human_size(u.stored_bytes), ""])
    for line in table(rows, right={0, 1, 2, 3}):
        print(line)
    print(f"{count(len(u.steps), 'step')}: {human_size(u.referenced_bytes)} referenced in all, "
          f"{human_size(u.stored_bytes)} stored ({u.ratio:.2f}x)")  # fmt: skip
    for s in invalid:
        print(f"step {s}: INVALID, not counted: {clean(str(found[s]))}")
    return EXIT_OK


def _ls_json(step: int, m: _Summary | ManifestError) -> dict[str, Any]:
    if isinstance(m, ManifestError):
        return {
            "step": step,
            "valid": False,
            "created": None,
            "attempt": None,
            "total_bytes": None,
            "num_tensors": None,
            "num_files": None,
            "num_objects": None,
            "world_size": None,
            "problem": {"error": type(m).__name__, "message": str(m)},
        }
    return {
        "step": step,
        "valid": True,
        "created": m.created,
        "attempt": m.attempt,
        "total_bytes": m.total_bytes,
        "num_tensors": m.tensors,
        "num_files": m.files,
        "num_objects": m.objects,
        "world_size": m.world_size,
        "problem": None,
    }


# --- show --------------------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    storage = open_root(args.root, opts)
    m = resolve_step(storage, args.step)
    if args.json:
        print_json(_show_json(storage, m))
        return EXIT_OK
    meta = [f"{clean(k)} = {clean(v)}" for k, v in sorted(m.user_metadata.items())] or ["(none)"]
    head = [
        ["root", storage.url],
        ["step", str(m.step)],
        ["attempt", m.attempt],
        ["created", clean(m.created)],
        ["format_version", str(m.format_version)],
        ["world_size", str(m.world_size)],
        ["block_bytes", human_size(m.block_bytes)],
        ["total size", f"{human_size(m.total_bytes)} in {count(len(m.files), 'file')}"],
        ["user_metadata", meta[0]],
        *[["", line] for line in meta[1:]],
    ]
    for line in table(head, right=set()):
        print(line)
    print(f"files ({len(m.files)}):")
    if m.files:
        rows = [["PATH", "SIZE"]] + [[p, human_size(f.size)] for p, f in sorted(m.files.items())]
        for line in table(rows, right={1}, indent="  "):
            print(line)
    print(f"tensors ({len(m.tensors)}):")
    if m.tensors:
        rows = [["KEY", "DTYPE", "SHAPE", "SHARDS", "SIZE"]]
        for key, t in m.tensors.items():
            rows.append(
                [clean(key), t.dtype, _shape(t.shape), str(len(t.shards)), human_size(t.nbytes)]
            )
        for line in table(rows, right={3, 4}, indent="  "):
            print(line)
    print(f"objects ({len(m.objects)}):")
    for key in m.objects:
        print(f"  {clean(key)}")
    return EXIT_OK


def _show_json(storage: Storage, m: Manifest) -> dict[str, Any]:
    return {
        "root": storage.url,
        "step": m.step,
        "attempt": m.attempt,
        "created": m.created,
        "format_version": m.format_version,
        "world_size": m.world_size,
        "block_bytes": m.block_bytes,
        "total_bytes": m.total_bytes,
        "user_metadata": dict(m.user_metadata),
        "files": [
            {"path": p, "size": f.size, "crc32c": f.crc32c} for p, f in sorted(m.files.items())
        ],
        "tensors": [
            {
                "key": k,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "num_shards": len(t.shards),
                "nbytes": t.nbytes,
            }
            for k, t in m.tensors.items()
        ],
        "objects": list(m.objects),
    }


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# --- verify ------------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    storage = open_root(args.root, opts)
    targets: list[tuple[int, Manifest | ManifestError]] = []
    if args.all:
        for step in committed_steps(storage):
            try:
                targets.append((step, read_step(storage, step)))
            except ManifestError as err:
                targets.append((step, err))
            except CheckpointNotFoundError:
                continue  # retired between the listing and the read
        if not targets:
            raise CheckpointNotFoundError(f"{storage.url}: no checkpoints")
    else:
        latest = resolve_step(storage, args.step)  # a bad manifest raises here: exit 4
        targets.append((latest.step, latest))
    results: list[dict[str, Any]] = []
    all_ok = True
    for step, m in targets:
        if isinstance(m, ManifestError):
            problem = problem_json(type(m).__name__, manifest_path(step), None, str(m))
            doc = _verify_json_step(step, None, [problem])
            if not args.json:
                print(f"step {step}: INVALID manifest")
                print(f"  {type(m).__name__}: {clean(str(m))}")
        else:
            report = _run_verify(storage, m, args)
            doc = _verify_json_step(step, report, [_finding_json(p) for p in report.findings])
            if not args.json:
                _print_report(report)
        all_ok = all_ok and doc["ok"]
        results.append(doc)
    if args.json:
        print_json({"root": storage.url, "ok": all_ok, "steps": results})
    return EXIT_OK if all_ok else EXIT_PROBLEMS


def _run_verify(storage: Storage, m: Manifest, args: argparse.Namespace) -> VerifyReport:
    from ckpt.lifecycle.verify import verify_manifest

    if args.quick:  # a HEAD per file: nothing to show progress of
        return verify_manifest(storage, m, num_threads=args.threads, quick=True)
    bar = progress_bar(m.total_bytes, f"step {m.step}", disable=args.json)
    lock = threading.Lock()

    def progress(p: Progress) -> None:
        with lock:
            if p.bytes_done > bar.n:
                bar.update(p.bytes_done - bar.n)

    try:
        return verify_manifest(storage, m, num_threads=args.threads, progress=progress)
    finally:
        bar.close()


def _print_report(r: VerifyReport) -> None:
    files, blocks = count(r.files_checked, "file"), count(r.blocks_checked, "block")
    what = f"{files}, {human_size(r.bytes_read)}, {blocks} checked"
    if r.quick:
        what = f"{files}: sizes and the store's crc32c checked, no data read"
        if r.size_only:
            what += f"; {len(r.size_only)} by size only (the store keeps no crc32c for them)"
    if r.ok:
        print(f"step {r.step}: OK ({what})")
        return
    print(f"step {r.step}: FAILED, {count(len(r.findings), 'problem')} ({what})")
    for p in r.findings:
        print(f"  {p.error.__name__}: {clean(p.message)}")


def _finding_json(p: Problem) -> dict[str, Any]:
    return problem_json(p.error.__name__, p.file, p.key, p.message)


def _verify_json_step(
    step: int, r: VerifyReport | None, problems: list[dict[str, Any]]
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "step": step,
        "ok": not problems,
        "manifest_valid": r is not None,
        "files_checked": r.files_checked if r else 0,
        "bytes_read": r.bytes_read if r else 0,
        "blocks_checked": r.blocks_checked if r else 0,
        "problems": problems,
    }
    if r is not None and r.quick:
        doc.update(quick=True, size_only=list(r.size_only))
    return doc
