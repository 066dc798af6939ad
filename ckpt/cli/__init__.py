"""The ``ckpt`` command line: ``ls``, ``show`` and ``verify`` over any checkpoint root.

This module owns argument parsing, human and ``--json`` output, progress bars and exit codes;
the work itself is done by :mod:`ckpt.lifecycle.verify` and the storage and manifest modules.

Usage::

    ckpt [--storage-option KEY=VALUE]... ls ROOT [--json]
    ckpt [--storage-option KEY=VALUE]... show ROOT[@STEP] [--step N] [--json]
    ckpt [--storage-option KEY=VALUE]... verify ROOT[@STEP] [--step N | --all] [--threads N] [--json]
    ckpt [--storage-option KEY=VALUE]... cp SRC[@STEP] DST [--step N]... [--src-opt KEY=VALUE]...
         [--dst-opt KEY=VALUE]... [--threads N] [--limit-rate BYTES] [--quiet] [--json]
    ckpt [--storage-option KEY=VALUE]... export --format zarr|hf ROOT[@STEP] DST [--prefix P] [--strip-prefix] [--max-shard-size 5GB]
    ckpt [--storage-option KEY=VALUE]... import --format zarr SRC ROOT [--step N]
    ckpt [--storage-option KEY=VALUE]... adopt DIR_OR_URL [--step N]
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

from ckpt.engine import executor
from ckpt.errors import (
    CheckpointNotFoundError,
    CkptError,
    CkptWarning,
    CorruptCheckpointError,
    ManifestError,
    StorageError,
)
from ckpt.format.manifest import Manifest
from ckpt.lifecycle import garbage
from ckpt.lifecycle import retire as retirement
from ckpt.lifecycle.steps import committed_steps, read_step, resolve_step
from ckpt.lifecycle.verify import Problem, VerifyReport, verify_manifest
from ckpt.storage import Storage, open_storage

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

    cp = sub.add_parser(
        "cp",
        help="copy committed checkpoints to another root, verified and resumable",
        description="Copy one, several or all committed checkpoints from SRC to DST (any two "
        "fsspec roots): every crc32c is checked on the way, the manifest is committed last "
        "(create-only), and a re-run after an interruption copies only what is missing.",
    )
    cp.add_argument("src", metavar="SRC[@STEP]", help="source root (path or fsspec URL)")
    cp.add_argument("dst", metavar="DST", help="destination root (path or fsspec URL)")
    cp.add_argument("--step", type=_step, action="append",
                    help="a step to copy (repeatable; with SRC@STEP, the union; default: every step)")  # fmt: skip
    cp.add_argument("--threads", type=_positive, help="files copied concurrently (default 8)")
    cp.add_argument("--chunk-size", type=_byte_count, metavar="BYTES",
                    help="bytes per read and write, e.g. 16M (default 16M)")  # fmt: skip
    cp.add_argument("--max-inflight", type=_byte_count, metavar="BYTES",
                    help="read buffers held at once over all files, e.g. 256M (default 256M)")  # fmt: skip
    cp.add_argument("--limit-rate", type=_byte_count, metavar="BYTES",
                    help="copy at most this many bytes per second, e.g. 50M (default: no limit)")  # fmt: skip
    cp.add_argument("--no-check-existing", action="store_true",
                    help="skip a destination file of the right size without re-reading its crc32c")  # fmt: skip
    cp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _common(cp)
    for side in ("src", "dst"):
        cp.add_argument(
            f"--{side}-storage-option", f"--{side}-opt", dest=f"{side}_storage_options",
            action="append", type=_storage_option, metavar="KEY=VALUE",
            help=f"an fsspec storage option for {side.upper()} only (repeatable; overrides --storage-option)",
        )  # fmt: skip
    cp.set_defaults(func=_cmd_cp)

    exp = sub.add_parser(
        "export",
        help="export a checkpoint as a Zarr v3 group or in the Hugging Face safetensors layout",
        description="Export one checkpoint. --format zarr: one Zarr v3 group at DST (a compressed, "
        "chunked array per tensor, plain data and metadata as attributes), readable by plain zarr. "
        "--format hf: model.safetensors.index.json + model-0000i-of-0000n.safetensors at DST, "
        "sharded tensors consolidated, tensors only.",
    )
    exp.add_argument("--format", required=True, choices=("zarr", "hf"), help="zarr or hf")
    exp.add_argument("root", metavar="ROOT[@STEP]", help="checkpoint root (path or fsspec URL)")
    exp.add_argument("dst", metavar="DST", help="destination directory or URL (must not hold an export)")
    exp.add_argument("--step", type=_step, help="the step to export (default: the latest)")
    exp.add_argument("--prefix", help="hf: export only tensors whose key starts with this, e.g. model/")
    exp.add_argument("--strip-prefix", action="store_true", help="hf: remove --prefix from the names")
    exp.add_argument("--rename", metavar="OLD=NEW", type=_rename,
                     help="hf: replace a leading OLD of each name (after --strip-prefix) with NEW")  # fmt: skip
    exp.add_argument("--separator", help="hf: join key segments with this instead of '/', e.g. '.'")
    exp.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                     help="hf: the largest file, e.g. 5GB (10**9 units) or 2GiB (default 5GB)")  # fmt: skip
    exp.add_argument("--level", type=int, default=3, help="zarr: zstd compression level (default 3)")
    _common(exp)
    _storage_option_arg_for(exp, "dst")
    exp.set_defaults(func=_cmd_export, all=False)

    imp = sub.add_parser(
        "import",
        help="commit a Zarr archive made by `ckpt export --format zarr` as a checkpoint",
        description="Import a Zarr v3 group written by `ckpt export --format zarr` into ROOT as a "
        "committed checkpoint (normal save path, create-only commit), bitwise identical.",
    )
    imp.add_argument("--format", required=True, choices=("zarr",), help="zarr")
    imp.add_argument("src", metavar="SRC", help="the Zarr group (path or fsspec URL)")
    imp.add_argument("root", metavar="ROOT", help="checkpoint root (path or fsspec URL)")
    imp.add_argument("--step", type=_step, help="the step to commit (default: the exported one)")
    _common(imp)
    _storage_option_arg_for(imp, "src")
    imp.set_defaults(func=_cmd_import)

    adopt = sub.add_parser(
        "adopt",
        help="commit a manifest over existing safetensors files, without copying them",
        description="Write a checkpoint manifest over a directory of safetensors files (a Hugging "
        "Face export, a model.safetensors): headers are validated, every file is read once for "
        "its crc32c values, nothing is copied or changed. ckpt never deletes adopted files.",
    )
    adopt.add_argument("root", metavar="DIR_OR_URL", help="the directory holding the files")
    adopt.add_argument("--step", type=_step, default=0, help="the step to commit (default 0)")
    _common(adopt)
    adopt.set_defaults(func=_cmd_adopt)
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
    """``ROOT@STEP`` is shorthand for ``ROOT --step STEP`` (show, verify and export)."""
    if args.command not in ("show", "verify", "export"):
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
        return open_storage(root, opts)
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
    steps = committed_steps(storage)
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


# --- cp ----------------------------------------------------------------------------------------

_BYTE_COUNT = re.compile(r"(\d+)([KMGT]?)(i?B)?", re.IGNORECASE)


def _byte_count(text: str) -> int:
    """A positive byte count: ``1048576``, ``64K``, ``16M``, ``2G`` (binary units)."""
    match = _BYTE_COUNT.fullmatch(text.strip())
    if match is None or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive byte count such as 16M, not {text!r}")
    return int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))


def _cmd_cp(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    from tqdm import tqdm

    from ckpt.lifecycle import copy as copier

    src_root, steps = args.src, list(args.step or [])
    match = _ROOT_AT_STEP.fullmatch(src_root)
    if match is not None:
        src_root = match.group(1)
        steps.append(int(match.group(2)))
    src_opts = {**opts, **dict(args.src_storage_options or [])}
    dst_opts = {**opts, **dict(args.dst_storage_options or [])}
    _open(src_root, src_opts)  # an unknown protocol or a refused option: exit 4 with a clear line
    _open(args.dst, dst_opts)
    given = {"num_threads": args.threads, "chunk_bytes": args.chunk_size,
             "max_inflight_bytes": args.max_inflight, "max_bytes_per_s": args.limit_rate}  # fmt: skip
    options = copier.CopyOptions(
        check_existing=not args.no_check_existing,
        **{k: v for k, v in given.items() if v is not None},
    )
    bars: list[Any] = []  # the progress bar, made once the plan gives the total
    lock = threading.Lock()

    def sized(plan: copier.CopyPlan) -> None:
        bars.append(tqdm(total=plan.bytes_to_copy + plan.bytes_to_check, unit="B", unit_scale=True,
                         unit_divisor=1024, desc="cp", file=sys.stderr, leave=False,
                         disable=args.quiet or not sys.stderr.isatty()))  # fmt: skip

    def progress(n: int) -> None:
        with lock:
            bars[0].update(n)

    try:
        report = copier.copy(
            src_root, args.dst, steps or None, src_storage_options=src_opts,
            dst_storage_options=dst_opts, options=options, progress=progress, on_plan=sized,
        )  # fmt: skip
    finally:
        for bar in bars:
            bar.close()
    if args.json:
        _print_json(report.to_json())
        return EXIT_OK
    if report.steps_copied:
        done = ", ".join(map(str, report.steps_copied))
        print(f"copied step{'s' if len(report.steps_copied) > 1 else ''} {done} to {report.dst}: "
              f"{_count(report.files_copied, 'file')} ({human_size(report.bytes_copied)}) in "
              f"{report.seconds:.2f} s, {report.mb_per_s:.1f} MB/s")  # fmt: skip
    if report.files_skipped:
        print(f"skipped {_count(report.files_skipped, 'file')} already at the destination")
    if report.files_replaced:
        print(f"replaced {_count(report.files_replaced, 'incomplete file')} at the destination")
    if report.steps_present:
        present = ", ".join(map(str, report.steps_present))
        print(f"already at the destination (identical manifest): step{'s' if len(report.steps_present) > 1 else ''} {present}")
    return EXIT_OK


# --- export, import, adopt ---------------------------------------------------------------------


def _storage_option_arg_for(p: argparse.ArgumentParser, side: str) -> None:
    p.add_argument(
        f"--{side}-storage-option", dest=f"{side}_storage_options", action="append",
        type=_storage_option, metavar="KEY=VALUE",
        help=f"an fsspec storage option for {side.upper()} only (repeatable; overrides --storage-option)",
    )  # fmt: skip


def _rename(text: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep or not old:
        raise argparse.ArgumentTypeError(f"expected OLD=NEW, not {text!r}")
    return old, new


def _cmd_export(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    from ckpt.interop import _read as interop

    dst_opts = {**opts, **dict(args.dst_storage_options or [])}
    _open(args.root, opts)
    if args.format == "zarr":
        from ckpt.interop.zarr import export_zarr

        z = export_zarr(args.root, args.dst, args.step, storage_options=opts,
                        dst_storage_options=dst_opts, level=args.level)  # fmt: skip
        doc: dict[str, Any] = {"format": "zarr", "step": z.step, "dst": args.dst, "num_tensors": z.num_tensors,
                               "tensor_bytes": z.tensor_bytes, "seconds": round(z.seconds, 3)}  # fmt: skip
        line = f"exported step {z.step} to {args.dst}: {_count(z.num_tensors, 'tensor')} ({human_size(z.tensor_bytes)}) in {z.seconds:.2f} s"
    else:
        from ckpt.interop.hf import export_hf

        try:
            limit = interop.parse_size(args.max_shard_size)
        except ValueError as err:
            print(f"ckpt: error: --max-shard-size: {err}", file=sys.stderr)
            return EXIT_USAGE
        h = export_hf(args.root, args.dst, args.step, storage_options=opts, dst_storage_options=dst_opts,
                      max_shard_bytes=limit, prefix=args.prefix, strip_prefix=args.strip_prefix,
                      rename=args.rename, separator=args.separator)  # fmt: skip
        doc = {"format": "hf", "step": h.step, "dst": args.dst, "files": list(h.files),
               "num_tensors": len(h.weight_map), "total_size": h.total_size,
               "skipped_objects": list(h.skipped_objects), "seconds": round(h.seconds, 3)}  # fmt: skip
        line = (f"exported step {h.step} to {args.dst}: {_count(len(h.weight_map), 'tensor')} "
                f"({human_size(h.total_size)}) in {_count(len(h.files), 'file')}"
                + (f"; skipped {_count(len(h.skipped_objects), 'non-tensor value')}" if h.skipped_objects else ""))  # fmt: skip
    if args.json:
        _print_json(doc)
    else:
        print(_clean(line))
    return EXIT_OK


def _cmd_import(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    from ckpt.interop.zarr import import_zarr

    src_opts = {**opts, **dict(args.src_storage_options or [])}
    _open(args.root, opts)
    m = import_zarr(args.src, args.root, args.step, src_storage_options=src_opts, storage_options=opts)
    if args.json:
        _print_json({"root": args.root, "step": m.step, "num_tensors": len(m.tensors),
                     "num_files": len(m.files), "total_bytes": m.total_bytes})  # fmt: skip
    else:
        print(_clean(f"imported step {m.step} into {args.root}: {_count(len(m.tensors), 'tensor')}, "
                     f"{_count(len(m.files), 'file')} ({human_size(m.total_bytes)})"))  # fmt: skip
    return EXIT_OK


def _cmd_adopt(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    from ckpt.interop.adopt import adopt

    _open(args.root, opts)
    m = adopt(args.root, step=args.step, storage_options=opts)
    if args.json:
        _print_json({"root": args.root, "step": m.step, "files": sorted(m.files),
                     "num_tensors": len(m.tensors), "total_bytes": m.total_bytes})  # fmt: skip
    else:
        print(_clean(f"adopted {_count(len(m.files), 'file')} ({human_size(m.total_bytes)}, "
                     f"{_count(len(m.tensors), 'tensor')}) under {args.root} as step {m.step}"))  # fmt: skip
    return EXIT_OK
