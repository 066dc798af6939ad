"""The ``ckpt`` command line: ``ls``, ``show`` and ``verify`` over any checkpoint root.

This module owns argument parsing, human and ``--json`` output, progress bars and exit codes;
the work itself is done by :mod:`ckpt.verifier` and the storage and manifest modules.

Usage::

    ckpt [--storage-option KEY=VALUE]... ls ROOT [--json]
    ckpt [--storage-option KEY=VALUE]... show ROOT[@STEP] [--step N] [--json]
    ckpt [--storage-option KEY=VALUE]... verify ROOT[@STEP] [--step N | --all] [--threads N] [--json]
    ckpt --traceback COMMAND ...   (show the traceback of errors that are not ckpt's own)

``--storage-option`` may also follow the command. Values are parsed as JSON when they parse
(``true``, ``5``, ``{"region_name": "eu-west-1"}``), else taken as strings. Option values are
never printed: they may hold credentials.

Exit codes (stable; scripts may rely on them):

- 0: success (for ``verify``: every checked checkpoint is intact);
- 1: ``verify`` found problems: a checkpoint is corrupt (or, with ``--all``, a step's manifest
  does not validate);
- 2: usage error (bad arguments);
- 3: checkpoint not found (no such step, or no checkpoint at all under ROOT);
- 4: any other error: a manifest that does not validate, a storage failure, a missing
  backend package, an unknown protocol, a storage option the backend refuses, missing
  credentials (``--traceback`` shows the traceback of errors that are not ckpt's own);
- 141: stdout was closed early by its reader (``ckpt ls | head -1``), as a shell reports a
  process killed by SIGPIPE.

With ``--json`` exactly one JSON document goes to stdout on exit codes 0 and 1; on 2, 3 and 4
stdout is empty. Errors and warnings go to stderr as ``ckpt: error: ...`` and
``ckpt: warning: ...``, never as a traceback (unless ``--traceback``). See docs/CLI.md for the
JSON schemas.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from ckpt import executor, garbage, retirement
from ckpt.errors import (
    CheckpointNotFoundError,
    CkptError,
    CkptWarning,
    CorruptCheckpointError,
    ManifestError,
    StorageError,
)
from ckpt.manifest import Manifest
from ckpt.restorer import read_step, resolve_step
from ckpt.storage import Storage
from ckpt.verifier import Problem, VerifyReport, verify_manifest

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_ERROR",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "EXIT_USAGE",
    "human_size",
    "main",
]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_ERROR = 4
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE

_ROOT_AT_STEP = re.compile(r"(?s)(.+)@(\d+)")
_LIST_THREADS = 8  # manifests read concurrently by `ls`


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (the console script exits with it)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        _split_root_at_step(parser, args)
    except SystemExit as exc:  # argparse: 2 for usage errors, 0 for --help / --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    opts: dict[str, Any] = {}
    for key, value in [*(args.global_storage_options or []), *(args.storage_options or [])]:
        opts[key] = value
    command: Callable[[argparse.Namespace, dict[str, Any]], int] = args.func
    with warnings.catch_warnings():
        warnings.simplefilter("always", CkptWarning)
        warnings.showwarning = _show_warning
        try:
            return command(args, opts)
        except CheckpointNotFoundError as err:
            _error(err)
            return EXIT_NOT_FOUND
        except CorruptCheckpointError as err:
            _error(err)
            return EXIT_PROBLEMS
        except CkptError as err:
            _error(err)
            return EXIT_ERROR
        except BrokenPipeError:  # the reader went away (`ckpt ls | head -1`): not our error
            _silence_stdout()
            return EXIT_BROKEN_PIPE
        except (OSError, ImportError) as err:  # backend unreachable, s3fs not installed, ...
            _error(err)
            return EXIT_ERROR
        except Exception as err:  # e.g. botocore's NoCredentialsError, a refused option
            if args.traceback:
                raise
            print(f"ckpt: error: {type(err).__name__}: {_clean(str(err))}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            print("ckpt: interrupted", file=sys.stderr)
            return 130


# --- arguments ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from ckpt import __version__

    parser = argparse.ArgumentParser(
        prog="ckpt",
        description="Inspect, verify and retire ckpt checkpoints on a local disk or any fsspec store.",
        epilog="Exit codes: 0 ok, 1 verification found problems, 2 usage error, "
        "3 checkpoint not found, 4 other error. See docs/CLI.md.",
    )
    parser.add_argument("--version", action="version", version=f"ckpt {__version__}")
    parser.add_argument(
        "--traceback", action="store_true", help="show the Python traceback of unexpected errors"
    )
    _storage_option_arg(parser, "global_storage_options")
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("ls", help="list committed steps", description="List committed steps.")
    ls.add_argument("root", metavar="ROOT", help="checkpoint root: a path or fsspec URL")
    _common(ls)
    ls.set_defaults(func=_cmd_ls)

    show = sub.add_parser(
        "show", help="summarise one checkpoint's manifest", description="Summarise a manifest."
    )
    show.add_argument("root", metavar="ROOT[@STEP]", help="checkpoint root (path or fsspec URL)")
    show.add_argument("--step", type=_step, help="the step to show (default: the latest)")
    _common(show)
    show.set_defaults(func=_cmd_show, all=False)

    ver = sub.add_parser(
        "verify",
        help="re-read and check every byte of a checkpoint",
        description="Check sizes, whole-file and per-block crc32c and safetensors headers "
        "against the manifest.",
    )
    ver.add_argument("root", metavar="ROOT[@STEP]", help="checkpoint root (path or fsspec URL)")
    which = ver.add_mutually_exclusive_group()
    which.add_argument("--step", type=_step, help="the step to verify (default: the latest)")
    which.add_argument("--all", action="store_true", help="verify every committed step")
    ver.add_argument(
        "--threads", type=_positive, default=8, help="files checked concurrently (default 8)"
    )
    _common(ver)
    ver.set_defaults(func=_cmd_verify)

    rm = sub.add_parser(
        "rm",
        help="retire committed checkpoints",
        description="Retire checkpoints: delete each manifest first (the step ceases to exist), then "
        "the data files no remaining checkpoint references.",
    )
    rm.add_argument("root", metavar="ROOT", help="checkpoint root: a path or fsspec URL")
    rm.add_argument("steps", metavar="STEP", type=_step, nargs="+", help="the steps to retire")
    rm.add_argument("--dry-run", action="store_true", help="say what would be deleted; delete nothing")
    _common(rm)
    rm.set_defaults(func=_cmd_rm)

    gc = sub.add_parser(
        "gc",
        help="delete garbage: failed attempts, temporary files, stale uploads",
        description="Delete what no committed checkpoint references and nothing has touched for the "
        "grace period: data of failed or abandoned saves, temporary files, stale multipart uploads.",
    )
    gc.add_argument("root", metavar="ROOT", help="checkpoint root: a path or fsspec URL")
    gc.add_argument("--grace-hours", type=_hours, default=24.0,
                    help="only collect what is older than this (default 24): longer than any save takes")  # fmt: skip
    gc.add_argument("--dry-run", action="store_true", help="say what would be deleted; delete nothing")
    _common(gc)
    gc.set_defaults(func=_cmd_gc)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document to stdout")
    _storage_option_arg(p, "storage_options")


def _storage_option_arg(p: argparse.ArgumentParser, dest: str) -> None:
    p.add_argument(
        "--storage-option",
        dest=dest,
        action="append",
        type=_storage_option,
        metavar="KEY=VALUE",
        help="an fsspec storage option, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable; "
        "the value is parsed as JSON when it parses)",
    )


def _storage_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        # the message must not echo the text: it may be a secret given without its key
        raise argparse.ArgumentTypeError("expected KEY=VALUE")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def _step(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise argparse.ArgumentTypeError(f"step must be a non-negative integer, not {text!r}")
    return int(text)


def _hours(text: str) -> float:
    try:
        h = float(text)
    except ValueError:
        h = -1.0
    if not 0 <= h < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative number of hours, not {text!r}")
    return h


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return int(text)


def _split_root_at_step(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``ROOT@STEP`` is shorthand for ``ROOT --step STEP`` (show and verify)."""
    if args.command not in ("show", "verify"):
        return
    match = _ROOT_AT_STEP.fullmatch(args.root)
    if match is None:
        return
    step = int(match.group(2))
    if args.all or (args.step is not None and args.step != step):
        parser.error(f"{args.command}: ROOT@{step} conflicts with --step/--all")
    args.root, args.step = match.group(1), step


def _open(root: str, opts: dict[str, Any]) -> Storage:
    try:
        return Storage(root, opts)
    except (ValueError, TypeError) as err:  # unknown protocol, an option the backend refuses
        raise StorageError(f"cannot open {root!r}: {err}") from None


# --- output helpers ----------------------------------------------------------------------------


def human_size(n: int) -> str:
    """Bytes in binary units: ``512 B``, ``4.0 KiB``, ``1.2 GiB``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def _clean(text: str) -> str:
    """Text from storage, safe for a terminal: control characters are escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _table(rows: list[list[str]], right: set[int], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _print_json(doc: object) -> None:
    print(json.dumps(doc, indent=2))


def _error(err: BaseException) -> None:
    print(f"ckpt: error: {_clean(str(err)) or type(err).__name__}", file=sys.stderr)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    print(f"ckpt: warning: {_clean(str(message))}", file=sys.stderr)


def _problem_json(error: str, file: str, key: str | None, message: str) -> dict[str, Any]:
    return {"error": error, "file": file, "key": key, "message": message}


# --- ls ----------------------------------------------------------------------------------------


def _cmd_ls(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    storage = _open(args.root, opts)
    steps = storage.step_dirs()
    if not steps:
        raise CheckpointNotFoundError(f"{storage.url}: no checkpoints")
    found: dict[int, Manifest | ManifestError] = {}

    def load(step: int) -> None:
        try:
            found[step] = read_step(storage, step)
        except ManifestError as err:
            found[step] = err
        except CheckpointNotFoundError:
            pass  # retired between the listing and the read

    executor.run_all(load, steps, num_threads=_LIST_THREADS)
    listed = [s for s in steps if s in found]
    if args.json:
        _print_json({"root": storage.url, "steps": [_ls_json(s, found[s]) for s in listed]})
        return EXIT_OK
    rows = [["STEP", "CREATED", "SIZE", "TENSORS", "FILES", "WORLD"]]
    invalid: dict[int, str] = {}
    for s in listed:
        m = found[s]
        if isinstance(m, Manifest):
            rows.append(
                [
                    str(s),
                    _clean(m.created),
                    human_size(m.total_bytes),
                    str(len(m.tensors)),
                    str(len(m.files)),
                    str(m.world_size),
                ]
            )
        else:
            rows.append([str(s), "INVALID", "", "", "", ""])
            invalid[s] = _clean(str(m))
    lines = _table(rows, right={0, 2, 3, 4, 5})
    print(lines[0])
    for line, s in zip(lines[1:], listed, strict=True):
        print(f"{line}  {invalid[s]}" if s in invalid else line)
    return EXIT_OK


def _cmd_rm(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    storage = _open(args.root, opts)
    done = retirement.retire(storage, args.steps, dry_run=args.dry_run)  # every step read first
    if args.json:
        _print_json({"root": storage.url, "dry_run": args.dry_run, "retired": [
            {"step": r.step, "files_deleted": list(r.files_deleted), "files_kept": list(r.files_kept)} for r in done
        ]})  # fmt: skip
        return EXIT_OK
    verb, deleted = ("would retire", "would delete") if args.dry_run else ("retired", "deleted")
    for r in done:
        kept = f"; kept {_count(len(r.files_kept), 'file')} another checkpoint references" if r.files_kept else ""
        print(f"{verb} step {r.step}: {deleted} {_count(len(r.files_deleted), 'data file')}{kept}")
    return EXIT_OK


def _cmd_gc(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    storage = _open(args.root, opts)
    plan = garbage.collect(storage, grace_s=args.grace_hours * 3600.0, dry_run=args.dry_run)
    if args.json:
        _print_json({"root": storage.url, "dry_run": args.dry_run, "deleted": list(plan.delete),
                     "deleted_bytes": plan.delete_bytes, "aborted_uploads": [u.key for u in plan.abort],
                     "too_recent": list(plan.too_recent), "blocked_by": list(plan.blocked_by)})  # fmt: skip
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {_count(len(plan.delete), 'file')} ({human_size(plan.delete_bytes)})"
          + (f", {'would abort' if args.dry_run else 'aborted'} {_count(len(plan.abort), 'stale upload')}" if plan.abort else ""))  # fmt: skip
    if plan.too_recent:
        print(f"kept {_count(len(plan.too_recent), 'unreferenced file')} younger than {args.grace_hours:g} h "
              "(a save may still be writing them)")  # fmt: skip
    for m in plan.blocked_by:
        print(f"collected no data: {m} does not validate, so what it references is unknown")
    return EXIT_OK


def _ls_json(step: int, m: Manifest | ManifestError) -> dict[str, Any]:
    if isinstance(m, Manifest):
        return {
            "step": step,
            "valid": True,
            "created": m.created,
            "attempt": m.attempt,
            "total_bytes": m.total_bytes,
            "num_tensors": len(m.tensors),
            "num_files": len(m.files),
            "num_objects": len(m.objects),
            "world_size": m.world_size,
            "problem": None,
        }
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


# --- show --------------------------------------------------------------------------------------


def _cmd_show(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    storage = _open(args.root, opts)
    m = resolve_step(storage, args.step)
    if args.json:
        _print_json(_show_json(storage, m))
        return EXIT_OK
    meta = [f"{_clean(k)} = {_clean(v)}" for k, v in sorted(m.user_metadata.items())] or ["(none)"]
    head = [
        ["root", storage.url],
        ["step", str(m.step)],
        ["attempt", m.attempt],
        ["created", _clean(m.created)],
        ["format_version", str(m.format_version)],
        ["world_size", str(m.world_size)],
        ["block_bytes", human_size(m.block_bytes)],
        ["total size", f"{human_size(m.total_bytes)} in {_count(len(m.files), 'file')}"],
        ["user_metadata", meta[0]],
        *[["", line] for line in meta[1:]],
    ]
    for line in _table(head, right=set()):
        print(line)
    print(f"files ({len(m.files)}):")
    if m.files:
        rows = [["PATH", "SIZE"]] + [[p, human_size(f.size)] for p, f in sorted(m.files.items())]
        for line in _table(rows, right={1}, indent="  "):
            print(line)
    print(f"tensors ({len(m.tensors)}):")
    if m.tensors:
        rows = [["KEY", "DTYPE", "SHAPE", "SHARDS", "SIZE"]]
        for key, t in m.tensors.items():
            rows.append(
                [_clean(key), t.dtype, _shape(t.shape), str(len(t.shards)), human_size(t.nbytes)]
            )
        for line in _table(rows, right={3, 4}, indent="  "):
            print(line)
    print(f"objects ({len(m.objects)}):")
    for key in m.objects:
        print(f"  {_clean(key)}")
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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# --- verify ------------------------------------------------------------------------------------


def _cmd_verify(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    storage = _open(args.root, opts)
    targets: list[tuple[int, Manifest | ManifestError]] = []
    if args.all:
        for step in storage.step_dirs():
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
            rel = f"steps/{step:012d}/manifest.json"
            doc = _verify_json_step(
                step, None, [_problem_json(type(m).__name__, rel, None, str(m))]
            )
            if not args.json:
                print(f"step {step}: INVALID manifest")
                print(f"  {type(m).__name__}: {_clean(str(m))}")
        else:
            report = _run_verify(storage, m, args)
            doc = _verify_json_step(step, report, [_finding_json(p) for p in report.findings])
            if not args.json:
                _print_report(report)
        all_ok = all_ok and doc["ok"]
        results.append(doc)
    if args.json:
        _print_json({"root": storage.url, "ok": all_ok, "steps": results})
    return EXIT_OK if all_ok else EXIT_PROBLEMS


def _run_verify(storage: Storage, m: Manifest, args: argparse.Namespace) -> VerifyReport:
    from tqdm import tqdm

    bar = tqdm(
        total=m.total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"step {m.step}",
        file=sys.stderr,
        disable=args.json or not sys.stderr.isatty(),
        leave=False,
    )
    lock = threading.Lock()

    def progress(n: int) -> None:
        with lock:
            bar.update(n)

    try:
        return verify_manifest(storage, m, num_threads=args.threads, progress=progress)
    finally:
        bar.close()


def _print_report(r: VerifyReport) -> None:
    files, blocks = _count(r.files_checked, "file"), _count(r.blocks_checked, "block")
    what = f"{files}, {human_size(r.bytes_read)}, {blocks} checked"
    if r.ok:
        print(f"step {r.step}: OK ({what})")
        return
    print(f"step {r.step}: FAILED, {_count(len(r.findings), 'problem')} ({what})")
    for p in r.findings:
        print(f"  {p.error.__name__}: {_clean(p.message)}")


def _finding_json(p: Problem) -> dict[str, Any]:
    return _problem_json(p.error.__name__, p.file, p.key, p.message)


def _verify_json_step(
    step: int, r: VerifyReport | None, problems: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "step": step,
        "ok": not problems,
        "manifest_valid": r is not None,
        "files_checked": r.files_checked if r else 0,
        "bytes_read": r.bytes_read if r else 0,
        "blocks_checked": r.blocks_checked if r else 0,
        "problems": problems,
    }
