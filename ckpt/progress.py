"""Progress of a save, restore, verify or copy, as the bytes move: a callback, or a tqdm bar.

Every one of ``ckpt.save``, ``ckpt.restore``, ``ckpt.verify`` and ``ckpt.copy`` takes
``progress=``:

- a callable, given a :class:`Progress` record each time bytes or files are done (from the
  worker threads that move them: keep it quick and thread-safe) and at each phase change;
- ``True``: a tqdm byte bar on stderr (notebooks and scripts);
- ``None`` / ``False`` (the default): nothing.

Within one operation ``bytes_done`` only grows and ends at ``bytes_total`` when it succeeds (a
file an object store makes ckpt upload again is not counted twice); so does ``files_done``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from ckpt.units import human_size

Op = Literal["save", "restore", "verify", "copy"]


@dataclass(frozen=True, slots=True)
class Progress:
    """Where one operation stands."""

    op: Op
    phase: str  # save: "write", "commit", "done"; restore: "read", "done"; verify: "check", "done"; copy: "copy", "done"
    step: int | None
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    seconds: float = 0.0  # since the operation began
    # the operation's storage retries so far, by "operation: reason" (filled at each phase
    # change, so the final "done" record holds the whole call's)
    retries: Mapping[str, int] = field(default_factory=dict)


ProgressFn: TypeAlias = Callable[[Progress], None]
ProgressArg: TypeAlias = "ProgressFn | bool | None"


class Meter:
    """Counts one operation's bytes and files (thread-safe) and reports them to the caller's
    ``progress`` (a callable, True for a tqdm bar, or None/False for nothing)."""

    def __init__(self, op: Op, progress: ProgressArg, *, step: int | None = None,
                 retries: Callable[[], Mapping[str, int]] | None = None) -> None:  # fmt: skip
        self.op, self.step = op, step
        self.retries = retries  # the operation's storage retries so far (its Storage's counter)
        self._t0 = time.perf_counter()
        self._fn: ProgressFn | None = progress if callable(progress) else None
        self._bar_wanted = progress is True
        self._bar: Any = None
        self._lock = threading.Lock()
        self.phase_name = ""
        self.bytes_done = self.bytes_total = self.files_done = self.files_total = 0

    @property
    def active(self) -> bool:
        return self._fn is not None or self._bar_wanted

    def phase(self, name: str, *, bytes_total: int | None = None, files_total: int | None = None) -> None:
        """Enter phase ``name`` (with the totals it moves, if known now) and report it."""
        with self._lock:
            self.phase_name = name
            if bytes_total is not None:
                self.bytes_total = bytes_total
            if files_total is not None:
                self.files_total = files_total
            snapshot = self._snapshot(with_retries=True)
        if self._bar_wanted and name not in ("done", "commit"):
            self._open_bar()
        self._report(snapshot, 0)

    def add(self, nbytes: int = 0, files: int = 0) -> None:
        """``nbytes`` more bytes and ``files`` more files done."""
        if not (nbytes or files) or not self.active:
            return
        with self._lock:
            self.bytes_done += nbytes
            self.files_done += files
            snapshot = self._snapshot()
        self._report(snapshot, nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _snapshot(self, with_retries: bool = False) -> Progress:
        counted = self.retries() if with_retries and self.retries is not None else {}
        retries = {k: n for k, n in counted.items() if n}
        return Progress(self.op, self.phase_name, self.step, self.bytes_done, self.bytes_total,
                        self.files_done, self.files_total, time.perf_counter() - self._t0, retries)  # fmt: skip

    def _open_bar(self) -> None:
        if self._bar is not None:
            return
        from tqdm import tqdm

        what = self.op if self.step is None else f"{self.op} step {self.step}"
        self._bar = tqdm(total=self.bytes_total, desc=what, unit="B", unit_scale=True, unit_divisor=1024,
                         leave=False, dynamic_ncols=True)  # fmt: skip

    def _report(self, p: Progress, nbytes: int) -> None:
        if self._fn is not None:
            self._fn(p)
        if self._bar is not None:
            if self._bar.total != p.bytes_total:
                self._bar.total = p.bytes_total
            if nbytes:
                self._bar.update(nbytes)


class FileCounter:
    """The bytes of one file, counted once even if its write starts over (a restarted upload
    reads its chunks again): ``seen(end)`` reports only what lies past the furthest end yet."""

    __slots__ = ("_counted", "_meter")

    def __init__(self, meter: Meter) -> None:
        self._meter = meter
        self._counted = 0

    def seen(self, end: int) -> None:
        if end > self._counted:
            self._meter.add(end - self._counted)
            self._counted = end


def summary(nbytes: int, seconds: float, retries: Mapping[str, int] | None = None) -> str:
    """``1.0 GiB in 0.52 s (1.9 GiB/s)``, and the retries by operation and reason if any: the
    tail of ckpt's INFO lines."""
    rate = f"{human_size(int(nbytes / seconds))}/s" if seconds > 0 else "-"
    text = f"{human_size(nbytes)} in {seconds:.2f} s ({rate})"
    if retries:
        text += "; retries: " + ", ".join(f"{k} x{n}" for k, n in sorted(retries.items()) if n)
    return text
