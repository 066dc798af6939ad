"""Concurrency primitives every layer uses: a byte budget, a thread pool that bounds every call
by a deadline, and one bounded call. No I/O of its own; the executor and the storage layer import
it (storage cannot import the engine): :class:`ckpt.storage.Storage` runs every call of its
contract through :func:`bounded`, under the storage's ``io_timeout_s``.

A call runs under at most one deadline per thread: :func:`bounded` (or a bounded
:func:`run_all`) runs it on a daemon thread that remembers its deadline, and a storage call made
there runs directly under that deadline unless its own is shorter. :func:`progress` restarts
the clock of the deadline the calling thread runs under (a streamed write takes a chunk).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import TypeVar

from ckpt.errors import StorageTimeoutError

T = TypeVar("T")
R = TypeVar("R")
DEFAULT_IO_TIMEOUT_S = 600.0  # Storage.io_timeout_s (open_storage), SaveOptions/RestoreOptions.io_timeout_s
_deadline = threading.local()  # .timeout_s, .touch: the deadline this thread runs under, if any


def progress() -> None:
    """The call running on this thread made progress (a streamed write took its next chunk):
    the deadline it runs under starts again. Nothing where the thread runs under none."""
    progress_of_this_thread()()


def progress_of_this_thread() -> Callable[[], None]:
    """:func:`progress` for the deadline this thread runs under now, callable from any thread
    (a backend may consume a stream on a thread of its own)."""
    touch: Callable[[], None] | None = getattr(_deadline, "touch", None)
    return touch if touch is not None else _nothing


def _nothing() -> None:
    return


class ByteBudget:
    """A counting semaphore over bytes: ``acquire(n)`` blocks while more than the cap is out.
    A single request larger than the cap is admitted alone."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self._used and self._used + n > self._cap:
                self._cond.wait()
            self._used += n

    def release(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()


def run_all(
    fn: Callable[[T], None],
    items: Sequence[T],
    *,
    num_threads: int,
    timeout_s: float | None = None,
    what: Callable[[T], str] | None = None,
) -> None:
    """Run ``fn`` over ``items`` on a thread pool; re-raise the first error, cancel the rest.

    With ``timeout_s``, every call of ``fn`` (one storage operation) must end within that many
    seconds of its start or of its last :func:`progress`, else StorageTimeoutError naming
    ``what(item)`` (the file and the operation). A Python thread cannot be stopped: a hung
    call's thread is abandoned (a daemon thread, so it never holds up the interpreter's exit)
    and may still complete later; no new item starts."""
    if not items:
        return
    if timeout_s is not None:
        _run_bounded(fn, items, num_threads=num_threads, timeout_s=timeout_s, what=what or repr)
        return
    if len(items) == 1 or num_threads == 1:
        for it in items:
            fn(it)
        return
    with ThreadPoolExecutor(max_workers=min(num_threads, len(items)), thread_name_prefix="ckpt-io") as pool:
        futures: list[Future[None]] = [pool.submit(fn, it) for it in items]
        _done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            f.cancel()
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]


def _run_bounded(
    fn: Callable[[T], None], items: Sequence[T], *, num_threads: int, timeout_s: float, what: Callable[[T], str]
) -> None:
    """``run_all`` with a deadline per call, on daemon threads (see ``run_all``)."""
    cond = threading.Condition()
    todo = list(reversed(items))
    running: dict[int, tuple[T, float]] = {}  # worker -> (its item, its start or last progress)
    errors: list[BaseException] = []
    live = min(num_threads, len(items))

    def touch(wid: int) -> None:
        with cond:
            if wid in running:
                running[wid] = (running[wid][0], time.monotonic())

    def worker(wid: int) -> None:
        nonlocal live
        _deadline.timeout_s = timeout_s
        _deadline.touch = lambda: touch(wid)
        while True:
            with cond:
                if errors or not todo:
                    live -= 1
                    cond.notify_all()
                    return
                it = todo.pop()
                running[wid] = (it, time.monotonic())
            try:
                fn(it)
            except BaseException as err:  # handed to the waiting thread
                with cond:
                    errors.append(err)
            finally:
                with cond:
                    running.pop(wid, None)
                    cond.notify_all()

    for wid in range(live):
        threading.Thread(target=worker, args=(wid,), name=f"ckpt-io-{wid}", daemon=True).start()
    with cond:
        while live:
            now = time.monotonic()
            late = [(t0, it) for it, t0 in running.values() if now - t0 >= timeout_s]
            if late:
                todo.clear()  # start nothing more; the hung call is abandoned
                if errors:
                    raise errors[0]  # the first failure is the one to report
                _t0, it = min(late, key=lambda x: x[0])
                raise StorageTimeoutError(
                    f"{what(it)}: no answer within {timeout_s:g} s (io_timeout_s); the call was "
                    "abandoned and may still complete in the background"
                )
            left = [t0 + timeout_s - now for _it, t0 in running.values()]
            cond.wait(min(left) if left else None)
    if errors:
        raise errors[0]


def bounded(fn: Callable[[], R], *, timeout_s: float | None, what: str) -> R:
    """``fn()`` (one storage operation); with ``timeout_s``, StorageTimeoutError naming
    ``what`` if it does not end in time (its thread is abandoned, see ``run_all``). Called on a
    thread that runs under a deadline already (a bounded call or pool), ``fn`` runs right there,
    under that deadline, unless ``timeout_s`` is shorter; either way its end is
    :func:`progress` for that deadline (a pool's item of several calls: each call must end in
    time, not the item)."""
    held: float | None = getattr(_deadline, "timeout_s", None)
    if timeout_s is None or (held is not None and held <= timeout_s):
        out = fn()
    else:
        box: list[R] = []
        run_all(lambda _: box.append(fn()), [None], num_threads=1, timeout_s=timeout_s, what=lambda _: what)
        out = box[0]
    progress()  # a call that ended: the deadline this thread runs under (if any) starts again
    return out
