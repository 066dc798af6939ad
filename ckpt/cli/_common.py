"""What every ``ckpt`` command shares: exit codes, ``ROOT@STEP``, opening a root, and output
(tables, JSON, errors and warnings on stderr, text from storage made safe for a terminal)."""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, TextIO

from ckpt.errors import StorageError
from ckpt.storage import Storage, open_storage

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_ERROR = 4
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE

_ROOT_AT_STEP = re.compile(r"(?s)(.+)@(\d+)")


def split_root_at_step(text: str) -> tuple[str, int | None]:
    """``ROOT@STEP`` -> ``(ROOT, STEP)``; anything else -> ``(text, None)``."""
    match = _ROOT_AT_STEP.fullmatch(text)
    if match is None:
        return text, None
    return match.group(1), int(match.group(2))


def open_root(root: str, opts: dict[str, Any]) -> Storage:
    """The storage at ``root``; an unknown protocol or a refused option is a StorageError."""
    try:
        return open_storage(root, opts)
    except (ValueError, TypeError) as err:  # unknown protocol, an option the backend refuses
        raise StorageError(f"cannot open {root!r}: {err}") from None


# --- output ------------------------------------------------------------------------------------


def clean(text: str) -> str:
    """Text from storage, safe for a terminal: control characters are escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def plural(n: int) -> str:
    return "s" if n > 1 else ""


def table(rows: list[list[str]], right: set[int], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def print_json(doc: object) -> None:
    print(json.dumps(doc, indent=2))


def problem_json(error: str, file: str, key: str | None, message: str) -> dict[str, Any]:
    return {"error": error, "file": file, "key": key, "message": message}


def error(err: BaseException) -> None:
    print(f"ckpt: error: {clean(str(err)) or type(err).__name__}", file=sys.stderr)


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    print(f"ckpt: warning: {clean(str(message))}", file=sys.stderr)


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def progress_bar(total: int, desc: str, disable: bool) -> Any:
    """A tqdm byte counter on stderr, shown only when stderr is a terminal and not ``disable``."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        disable=disable or not sys.stderr.isatty(),
        leave=False,
    )
