"""The ``ckpt`` argument parser: every command, its options and their types.

Each command names its function as ``"module.cmd_x"`` under :mod:`ckpt.cli`; the module is
imported only when that command runs (:class:`Command`), so ``ckpt --help`` imports no command
module and a command imports only what it needs."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

from ckpt.cli._common import split_root_at_step
from ckpt.units import parse_size

_ONE_SIDE = "an fsspec storage option for {} only (repeatable; overrides --storage-option)"
_ROOT_AT_STEP = "checkpoint root (path or fsspec URL)"
_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def build_parser() -> argparse.ArgumentParser:
    from ckpt import __version__

    parser = argparse.ArgumentParser(
        prog="ckpt",
        description="Inspect, verify and retire ckpt checkpoints on a local disk or any fsspec "
        "store.",
        epilog="Exit codes: 0 ok, 1 verification found problems, 2 usage error, "
        "3 checkpoint not found, 4 other error. See docs/CLI.md.",
    )
    parser.add_argument("--version", action="version", version=f"ckpt {__version__}")
    parser.add_argument(
        "--traceback", action="store_true", help="show the Python traceback of unexpected errors"
    )
    _storage_option_arg(parser, "global_storage_options")
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    _add_inspect(sub)
    _add_maintain(sub)
    _add_cp(sub)
    _add_interop(sub)
    return parser


def apply_root_at_step(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``ROOT@STEP`` is shorthand for ``ROOT --step STEP`` (show, verify and export; ``cp``
    takes the union of SRC@STEP and its --step options itself)."""
    if args.command not in ("show", "verify", "export"):
        return
    root, step = split_root_at_step(args.root)
    if step is None:
        return
    if args.all or (args.step is not None and args.step != step):
        parser.error(f"{args.command}: ROOT@{step} conflicts with --step/--all")
    args.root, args.step = root, step


# --- commands ----------------------------------------------------------------------------------


def _add_inspect(sub: _Commands) -> None:
    with _command(sub, "ls", "inspect.cmd_ls", "list committed steps", "List committed steps.") as ls:
        _root(ls)

    with _command(
        sub,
        "du",
        "inspect.cmd_du",
        "bytes each step references and adds",
        "Storage use per committed step: the bytes of the files it references (what a copy of it "
        "holds), the bytes of files no older step references (what it added), and the root's total "
        "stored once. Steps of incremental saves share files.",
    ) as du:
        _root(du)

    with _command(
        sub,
        "show",
        "inspect.cmd_show",
        "summarise one checkpoint's manifest",
        "Summarise a manifest.",
        all=False,
    ) as show:
        _root(show, at_step=True)
        _step_arg(show, "show")

    with _command(
        sub,
        "verify",
        "inspect.cmd_verify",
        "re-read and check every byte of a checkpoint",
        "Check sizes, whole-file and per-block crc32c and safetensors headers against the "
        "manifest.",
    ) as ver:
        _root(ver, at_step=True)
        which = ver.add_mutually_exclusive_group()
        _step_arg(which, "verify")
        which.add_argument("--all", action="store_true", help="verify every committed step")
        ver.add_argument(
            "--quick",
            action="store_true",
            help="read no data: compare each file's size, and the crc32c the store keeps for it "
            "(S3, GCS), with the manifest (one metadata request per file)",
        )
        ver.add_argument(
            "--threads", type=_positive, default=8, help="files checked concurrently (default 8)"
        )


def _add_maintain(sub: _Commands) -> None:
    with _command(
        sub,
        "rm",
        "maintain.cmd_rm",
        "retire committed checkpoints",
        "Retire checkpoints: delete each manifest first (the step ceases to exist), then the data "
        "files no remaining checkpoint references.",
    ) as rm:
        _root(rm)
        rm.add_argument("steps", metavar="STEP", type=_step, nargs="+", help="the steps to retire")
        _dry_run(rm)

    with _command(
        sub,
        "gc",
        "maintain.cmd_gc",
        "delete garbage: failed attempts, temporary files, stale uploads",
        "Delete what no committed checkpoint references and nothing has touched for the grace "
        "period: data of failed or abandoned saves, temporary files, stale multipart uploads.",
    ) as gc:
        _root(gc)
        gc.add_argument(
            "--grace-hours",
            type=_hours,
            default=24.0,
            help="only collect what is older than this (default 24): longer than any save takes",
        )
        _dry_run(gc)


def _add_cp(sub: _Commands) -> None:
    with _command(
        sub,
        "cp",
        "transfer.cmd_cp",
        "copy committed checkpoints to another root, verified and resumable",
        "Copy one, several or all committed checkpoints from SRC to DST (any two fsspec roots): "
        "every crc32c is checked on the way, the manifest is committed last (create-only), and a "
        "re-run after an interruption copies only what is missing.",
        sides=("src", "dst"),
    ) as cp:
        cp.add_argument("src", metavar="SRC[@STEP]", help="source root (path or fsspec URL)")
        cp.add_argument("dst", metavar="DST", help="destination root (path or fsspec URL)")
        cp.add_argument(
            "--step",
            type=_step,
            action="append",
            help="a step to copy (repeatable; with SRC@STEP, the union; default: every step)",
        )
        cp.add_argument("--threads", type=_positive, help="files copied concurrently (default 8)")
        for flag, what in (
            ("--chunk-size", "bytes per read and write, e.g. 16MiB (default 16MiB)"),
            (
                "--max-inflight",
                "read buffers held at once over all files, e.g. 256MiB (default 256MiB)",
            ),
            (
                "--limit-rate",
                "copy at most this many bytes per second, e.g. 50MB (default: no limit)",
            ),
        ):
            cp.add_argument(flag, type=_size, metavar="BYTES", help=what)
        cp.add_argument(
            "--no-check-existing",
            action="store_true",
            help="skip a destination file of the right size without re-reading its crc32c",
        )
        cp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_interop(sub: _Commands) -> None:
    with _command(
        sub,
        "export",
        "transfer.cmd_export",
        "export a checkpoint as a Zarr v3 group or in the Hugging Face safetensors layout",
        "Export one checkpoint. --format zarr: one Zarr v3 group at DST (a compressed, chunked "
        "array per tensor, plain data and metadata as attributes), readable by plain zarr. "
        "--format hf: model.safetensors.index.json + model-0000i-of-0000n.safetensors at DST, "
        "sharded tensors consolidated, tensors only.",
        sides=("dst",),
        all=False,
    ) as exp:
        exp.add_argument("--format", required=True, choices=("zarr", "hf"), help="zarr or hf")
        _root(exp, at_step=True)
        exp.add_argument(
            "dst", metavar="DST", help="destination directory or URL (must not hold an export)"
        )
        _step_arg(exp, "export")
        exp.add_argument(
            "--prefix", help="hf: export only tensors whose key starts with this, e.g. model/"
        )
        exp.add_argument(
            "--strip-prefix", action="store_true", help="hf: remove --prefix from the names"
        )
        exp.add_argument(
            "--rename",
            metavar="OLD=NEW",
            type=_rename,
            help="hf: replace a leading OLD of each name (after --strip-prefix) with NEW",
        )
        exp.add_argument(
            "--separator", help="hf: join key segments with this instead of '/', e.g. '.'"
        )
        exp.add_argument(
            "--max-shard-size",
            default="5GB",
            metavar="SIZE",
            help="hf: the largest file, e.g. 5GB (10**9 units) or 2GiB (default 5GB)",
        )
        exp.add_argument(
            "--level", type=int, default=3, help="zarr: zstd compression level (default 3)"
        )

    with _command(
        sub,
        "import",
        "transfer.cmd_import",
        "commit a Zarr archive made by `ckpt export --format zarr` as a checkpoint",
        "Import a Zarr v3 group written by `ckpt export --format zarr` into ROOT as a committed "
        "checkpoint (normal save path, create-only commit), bitwise identical.",
        sides=("src",),
    ) as imp:
        imp.add_argument("--format", required=True, choices=("zarr",), help="zarr")
        imp.add_argument("src", metavar="SRC", help="the Zarr group (path or fsspec URL)")
        imp.add_argument("root", metavar="ROOT", help=_ROOT_AT_STEP)
        _step_arg(imp, "commit", "the exported one")

    with _command(
        sub,
        "adopt",
        "transfer.cmd_adopt",
        "commit a manifest over existing safetensors files, without copying them",
        "Write a checkpoint manifest over a directory of safetensors files (a Hugging Face "
        "export, a model.safetensors): headers are validated, every file is read once for its "
        "crc32c values, nothing is copied or changed. ckpt never deletes adopted files.",
    ) as adopt:
        adopt.add_argument("root", metavar="DIR_OR_URL", help="the directory holding the files")
        adopt.add_argument("--step", type=_step, default=0, help="the step to commit (default 0)")


# --- shared options and argument types ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """A command's function, ``"module.cmd_x"`` under :mod:`ckpt.cli`, imported when it runs."""

    target: str

    def __call__(self, args: argparse.Namespace, opts: dict[str, Any]) -> int:
        module, name = self.target.rsplit(".", 1)
        func = getattr(importlib.import_module(f"ckpt.cli.{module}"), name)
        result: int = func(args, opts)
        return result


@contextlib.contextmanager
def _command(
    sub: _Commands,
    name: str,
    func: str,
    help: str,
    description: str,
    *,
    sides: tuple[str, ...] = (),
    **defaults: Any,
) -> Iterator[argparse.ArgumentParser]:
    """The subcommand ``name`` run by ``func`` (``"module.cmd_x"``, see :class:`Command`): the ``with`` block adds its own arguments, then
    come the options every command shares (``--json``, ``--storage-option``, and for a command
    with two roots, the storage options of each of its ``sides``)."""
    p = sub.add_parser(name, help=help, description=description)
    yield p
    p.add_argument("--json", action="store_true", help="print one JSON document to stdout")
    _storage_option_arg(p, "storage_options")
    for side in sides:
        # cp, with both sides, also takes the short form --src-opt / --dst-opt
        short = (f"--{side}-opt",) if len(sides) > 1 else ()
        p.add_argument(
            f"--{side}-storage-option",
            *short,
            dest=f"{side}_storage_options",
            action="append",
            type=_storage_option,
            metavar="KEY=VALUE",
            help=_ONE_SIDE.format(side.upper()),
        )
    p.set_defaults(func=Command(func), **defaults)


def _root(p: argparse.ArgumentParser, *, at_step: bool = False) -> None:
    if at_step:
        p.add_argument("root", metavar="ROOT[@STEP]", help=_ROOT_AT_STEP)
    else:
        p.add_argument("root", metavar="ROOT", help="checkpoint root: a path or fsspec URL")


def _step_arg(p: argparse._ActionsContainer, verb: str, default: str = "the latest") -> None:
    p.add_argument("--step", type=_step, help=f"the step to {verb} (default: {default})")


def _dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run", action="store_true", help="say what would be deleted; delete nothing"
    )


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


def _size(text: str) -> int:
    """A positive byte count in the units of :mod:`ckpt.units` (``16MiB``, ``5GB``, ``4096``)."""
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _rename(text: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep or not old:
        raise argparse.ArgumentTypeError(f"expected OLD=NEW, not {text!r}")
    return old, new
