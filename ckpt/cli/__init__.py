"""The ``ckpt`` command line: nine commands over any checkpoint root (a path or fsspec URL).

- ``ls``, ``show``, ``verify``: list steps, summarise a manifest, re-read and check every byte
  (``--quick``: sizes and the store's checksums only) (:mod:`ckpt.cli.inspect`);
- ``rm``, ``gc``: retire checkpoints, delete garbage (:mod:`ckpt.cli.maintain`);
- ``cp``, ``export``, ``import``, ``adopt``: copy to another root, export as Zarr or in the
  Hugging Face layout, import a Zarr export, commit a manifest over existing safetensors files
  (:mod:`ckpt.cli.transfer`).

The parser is built in :mod:`ckpt.cli._args`; exit codes, ``ROOT@STEP`` and output helpers are
in :mod:`ckpt.cli._common`; the work itself is done by the library (``ckpt.lifecycle``,
``ckpt.interop``). Usage (``--storage-option`` may also follow the command)::

    ckpt [--storage-option KEY=VALUE]... ls ROOT [--json]
    ckpt [--storage-option KEY=VALUE]... show ROOT[@STEP] [--step N] [--json]
    ckpt [--storage-option KEY=VALUE]... verify ROOT[@STEP] [--step N | --all] [--quick]
         [--threads N] [--json]
    ckpt [--storage-option KEY=VALUE]... rm ROOT STEP... [--dry-run] [--json]
    ckpt [--storage-option KEY=VALUE]... gc ROOT [--grace-hours H] [--dry-run] [--json]
    ckpt [--storage-option KEY=VALUE]... cp SRC[@STEP] DST [--step N]... [--src-opt KEY=VALUE]...
         [--dst-opt KEY=VALUE]... [--threads N] [--chunk-size BYTES] [--max-inflight BYTES]
         [--limit-rate BYTES] [--no-check-existing] [--quiet] [--json]
    ckpt [--storage-option KEY=VALUE]... export --format zarr|hf ROOT[@STEP] DST [--step N]
         [--prefix P] [--strip-prefix] [--rename OLD=NEW] [--separator S]
         [--max-shard-size 5GB] [--level N] [--dst-storage-option KEY=VALUE]... [--json]
    ckpt [--storage-option KEY=VALUE]... import --format zarr SRC ROOT [--step N]
         [--src-storage-option KEY=VALUE]... [--json]
    ckpt [--storage-option KEY=VALUE]... adopt DIR_OR_URL [--step N] [--json]
    ckpt --traceback COMMAND ...   (show the traceback of errors that are not ckpt's own)

Values of ``--storage-option`` are parsed as JSON when they parse (``true``, ``5``,
``{"region_name": "eu-west-1"}``), else taken as strings. Option values are never printed:
they may hold credentials. Sizes (``--chunk-size``, ``--max-inflight``, ``--limit-rate``,
``--max-shard-size``) are read by :func:`ckpt.units.parse_size`: ``5GB`` = 5*10**9 bytes,
``5GiB`` = 5*2**30.

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
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ckpt.cli._args import apply_root_at_step, build_parser
from ckpt.cli._common import (
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    EXIT_NOT_FOUND,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    clean,
    error,
    show_warning,
    silence_stdout,
)
from ckpt.errors import CheckpointNotFoundError, CkptError, CkptWarning, CorruptCheckpointError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        apply_root_at_step(parser, args)
    except SystemExit as exc:  # argparse: 2 for usage errors, 0 for --help / --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    opts: dict[str, Any] = {}
    for key, value in [*(args.global_storage_options or []), *(args.storage_options or [])]:
        opts[key] = value
    command: Callable[[argparse.Namespace, dict[str, Any]], int] = args.func
    with warnings.catch_warnings():
        warnings.simplefilter("always", CkptWarning)
        warnings.showwarning = show_warning
        try:
            return command(args, opts)
        except CheckpointNotFoundError as err:
            error(err)
            return EXIT_NOT_FOUND
        except CorruptCheckpointError as err:
            error(err)
            return EXIT_PROBLEMS
        except CkptError as err:
            error(err)
            return EXIT_ERROR
        except BrokenPipeError:  # the reader went away (`ckpt ls | head -1`): not our error
            silence_stdout()
            return EXIT_BROKEN_PIPE
        except (OSError, ImportError) as err:  # backend unreachable, s3fs not installed, ...
            error(err)
            return EXIT_ERROR
        except Exception as err:  # e.g. botocore's NoCredentialsError, a refused option
            if args.traceback:
                raise
            print(f"ckpt: error: {type(err).__name__}: {clean(str(err))}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            print("ckpt: interrupted", file=sys.stderr)
            return 130
