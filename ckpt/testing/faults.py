"""The fault kit, shipped so users can test their own setups (the TensorStore file-hook / DCP
``FaultyStorageWriter`` pattern): a :class:`Recorder` holding a call log and fault :class:`Rule` list,
applied at one of two layers.

**The storage contract** (:class:`FaultyStorage`): wraps any :class:`~ckpt.storage.Storage`
(the real ``LocalStorage``, ``S3Storage``, ``FsspecStorage``) and records each contract call
(``op`` is the method name: ``write_file``, ``put_if_absent``, ``put``, ``read``, ``read_into``,
``size``, ``stat``, ``exists``, ``list_files``, ``delete``...; ``path`` the path relative to the root),
applying the rules before or after delegating. This is the layer to fault the production code of
a backend. ckpt's entry points build their storage with :func:`ckpt.storage.open_storage`; the
test seam :func:`wrap_storage` makes them build a ``FaultyStorage`` around it instead::

    rec = Recorder(rules=[Rule("put_if_absent", path_contains="manifest.json", kill=True)])
    with wrap_storage(rec):
        ckpt.save("/tmp/run", state, step=1)  # the real LocalStorage, dying at the commit
    rec.calls_of("read_into")

``wrap_storage`` touches no production code: for the duration of the ``with`` block it rebinds
the name ``open_storage`` in ``ckpt.storage`` and in every loaded ``ckpt.*`` module that imported
it (``from ckpt.storage import open_storage``) to a function that calls the real one and wraps
its result, and puts the real one back on exit (including in modules imported meanwhile). It is
process-wide (every thread of the process; a forked child inherits it), not reentrant across
threads, and ``only=`` restricts it to roots starting with a given string.

**Below the contract** (:class:`FaultyFileSystem`, protocol ``faulty://``): wraps any fsspec
file system (``target_protocol`` + ``target_options``), so ckpt runs its *generic* fsspec backend
over it; use it where the fault below the storage layer is the point (a torn write on a backend
without atomic writes, fsspec-level calls). Register the protocol first with
:func:`register_faulty` (explicit and idempotent; ``ckpt.testing`` does not register it on
import), then pass the recorder in ``storage_options``::

    register_faulty()
    rec = Recorder(rules=[Rule("pipe_file", path_contains="manifest.json", kill=True)])
    opts = {"target_protocol": "file", "recorder": rec}
    ckpt.save("faulty:///tmp/run", state, step=1, storage_options=opts)  # dies at the commit
    rec.calls_of("cat_file")  # the ranged reads that were made

A :class:`Rule` matches calls by operation (``"*"``: any), path substring, an optional writer
rank and an optional predicate, lets the first ``skip`` matches through, then fires at most
``times`` times. When it fires it applies, in this order:

- ``delay_s``: sleep that long;
- ``gate``: block until the event is set; ``hang=True``: block until :meth:`Recorder.release`
  (a hung storage call; tests release it at teardown so abandoned threads end);
- ``kill=True``: ``os.kill(os.getpid(), SIGKILL)``: the process dies at that exact operation;
- ``error``: raise it (an exception instance, or a zero-argument callable returning one, so
  that concurrent calls do not share one exception object);
- ``truncate_to``: a read returns at most this many bytes (``cat_file``, ``open`` for reading;
  ``read``; ``read_into`` fills that many bytes, then raises ``ShardSizeMismatchError`` as for a
  file that ends early); a write stores only the first ``truncate_to`` bytes and reports success
  (``pipe_file``, ``write_file``, ``put_if_absent``, ``put``: a torn write, as on a backend
  without atomic writes).

``after=True`` applies the kill or the error *after* the operation took effect (the write
landed, then the process died or the response was lost).

Ranks: a data file ``data/<step>-<attempt>/<rank:05d>-<k>.safetensors`` belongs to the writer
``rank``; any other path (manifest, LATEST, listings) belongs to ``Recorder.rank``, the rank of
the process that owns the recorder (None by default). ``Rule(rank=r)`` fires only on calls whose
rank is ``r``, so one recorder shared by several in-process writers can fault a single rank's
files, and a per-process recorder (``Recorder(rank=r)``) can fault everything that process does.

FaultyStorage's operations: every method of the contract (``write_file``, ``put_if_absent``,
``put``, ``sync_dirs``, ``sync_files``, ``read``, ``read_into``, ``size``, ``stat``, ``exists``, ``list_files``,
``delete``, ``delete_tree``, ``remove_empty_dir``, ``multipart_uploads``, ``abort_upload``,
``check_no_links``, ``conditional_writes_work``); an injected error is translated like one the
backend raised (an ``OSError`` becomes a ``StorageError`` naming the path). Its capabilities
(``atomic_create``, ``local_disk``, ``streams_chunks``) are the inner storage's.

FaultyFileSystem's wrapped operations: ``pipe_file``, ``cat_file``, ``_open`` (``open``), ``info``, ``size``,
``exists``, ``isfile``, ``isdir``, ``find``, ``ls``, ``rm``, ``rm_file``, ``rmdir``, ``mkdir``,
``makedirs``, ``cp_file``, ``mv``, ``put_file``, ``get_file``, ``touch``, ``modified``,
``created``. Other :class:`AbstractFileSystem` methods are built on these and so pass through the
hooks too.

Atomic create: ckpt commits with a create-only write that must be exclusive *and* all-or-nothing.
``ckpt_atomic_create`` is True for ``memory`` (create-only writes then hold the process-wide
memory lock ckpt uses) and ``s3``. Other targets report False (fsspec's generic create is
exists-then-write: neither exclusive nor all-or-nothing), so ckpt refuses to commit unless
``SaveOptions(allow_non_atomic_commit=True)``. ``atomic_create=True`` over a local target
(``file``/``local``) makes the wrapper write a temporary file in the same directory and
``os.link`` it to the final name for a create (``EEXIST``: lost) or ``os.replace`` it for an
overwrite: no reader ever sees a partial file and a kill leaves at most a ``.*.tmp`` file; it
then counts as atomic. (Over any other target ``atomic_create=`` only sets the claim.)
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractFileSystem

import ckpt.storage
from ckpt.format import layout

T = TypeVar("T")


def rank_of(path: str) -> int | None:
    """The writer rank a data file path belongs to (None for any other path)."""
    return layout.writer_of(path)


@dataclass(frozen=True, slots=True)
class Call:
    op: str
    path: str
    start: int | None = None
    end: int | None = None
    nbytes: int | None = None  # bytes moved (written or returned)
    rank: int | None = None  # the data file's writer, else the recorder's rank


@dataclass
class Rule:
    op: str  # operation name, or "*" for any
    path_contains: str = ""
    error: BaseException | Callable[[], BaseException] | None = None  # raise this
    truncate_to: int | None = None  # reads return / writes store at most this many bytes
    skip: int = 0  # let this many matching calls through first
    times: int = 1 << 30  # then fire at most this often
    fired: int = 0
    gate: threading.Event | None = None  # block the call until this is set (then apply the rest)
    rank: int | None = None  # fire only on calls of this rank (see the module docstring)
    delay_s: float = 0.0  # sleep this long first
    hang: bool = False  # block until Recorder.release() (then apply the rest)
    kill: bool = False  # SIGKILL this process at the operation
    after: bool = False  # kill / raise after the operation took effect instead of before
    when: Callable[[Call], bool] | None = None  # an extra predicate on the call

    def matches(self, call: Call) -> bool:
        return (
            self.op in ("*", call.op)
            and self.path_contains in call.path
            and (self.rank is None or self.rank == call.rank)
            and (self.when is None or self.when(call))
        )

    def make_error(self) -> BaseException | None:
        if self.error is None or isinstance(self.error, BaseException):
            return self.error
        return self.error()


@dataclass
class Recorder:
    calls: list[Call] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    rank: int | None = None  # this process's rank: the rank of calls on non-data paths
    injected: list[tuple[Call, Rule]] = field(default_factory=list)  # every fault that fired
    released: threading.Event = field(default_factory=threading.Event)  # ends every hang

    def record(self, call: Call) -> Rule | None:
        with self.lock:
            self.calls.append(call)
            for rule in self.rules:
                if rule.matches(call):
                    if rule.skip > 0:
                        rule.skip -= 1
                        continue
                    if rule.fired < rule.times:
                        rule.fired += 1
                        self.injected.append((call, rule))
                        return rule
        return None

    def calls_of(self, op: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.op == op]

    def clear(self) -> None:
        with self.lock:
            self.calls.clear()

    def release(self) -> None:
        """Unblock every call hung by a ``hang`` rule, now and from now on."""
        self.released.set()


class FaultyFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """Delegates to a target file system, recording each call and applying the fault rules."""

    protocol = "faulty"
    cachable = False

    def __init__(
        self,
        target_protocol: str = "memory",
        target_options: dict[str, Any] | None = None,
        recorder: Recorder | None = None,
        atomic_create: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.target = fsspec.filesystem(target_protocol, **(target_options or {}))
        self.recorder = recorder if recorder is not None else Recorder()
        self._memory = isinstance(self.target, MemoryFileSystem)
        # ckpt's commit is only as atomic as the target's create-only write (module docstring)
        auto = ckpt.storage.trusts_create_only(self.target)
        self.ckpt_atomic_create = auto if atomic_create is None else atomic_create
        # a local target is made atomic by the wrapper itself, on request
        self._local = isinstance(self.target, LocalFileSystem) and self.ckpt_atomic_create

    # --- the hook ----------------------------------------------------------------------------

    def _call(self, op: str, path: str, start: int | None = None, end: int | None = None,
              nbytes: int | None = None) -> Call:  # fmt: skip
        rank = rank_of(path)
        return Call(op, path, start, end, nbytes, self.recorder.rank if rank is None else rank)

    def _hook(self, call: Call) -> Rule | None:
        """Record ``call``; apply the part of a firing rule that acts before the operation."""
        rule = self.recorder.record(call)
        if rule is None:
            return None
        _hold(rule, self.recorder)
        if not rule.after:
            _fire(rule)
        return rule

    def _done(self, rule: Rule | None) -> None:
        """Apply the part of a firing rule that acts after the operation took effect."""
        if rule is not None and rule.after:
            _fire(rule)

    def _run(self, op: str, path: str, fn: Callable[[], T]) -> T:
        """``fn()`` (the target's operation ``op`` on ``path``) between the two parts of the hook."""
        rule = self._hook(self._call(op, path))
        out = fn()
        self._done(rule)
        return out

    # --- writes ------------------------------------------------------------------------------

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        rule = self._hook(self._call("pipe_file", path, nbytes=len(value)))
        if rule is not None and rule.truncate_to is not None:
            value = bytes(value[: rule.truncate_to])
        if self._local:
            self._pipe_local(path, value, create=mode == "create")
        elif self._memory and mode == "create":
            from ckpt.storage._fsspec import (
                MEMORY_LOCK as _MEMORY_LOCK,  # ckpt's memory:// create-only lock
            )

            with _MEMORY_LOCK:
                self.target.pipe_file(path, value, mode=mode, **kwargs)
        else:
            self.target.pipe_file(path, value, mode=mode, **kwargs)
        self._done(rule)

    def _pipe_local(self, path: str, value: bytes, *, create: bool) -> None:
        """All-or-nothing local write: a temporary file, then link (create) or replace."""
        full = self.target._strip_protocol(path)
        d = os.path.dirname(full)
        os.makedirs(d, exist_ok=True)
        tmp = f"{d}/.{os.path.basename(full)}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(value)
            if create:
                os.link(tmp, full)  # FileExistsError: somebody created it first
            else:
                os.replace(tmp, full)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, autocommit: bool = True,
              cache_options: Any = None, **kwargs: Any) -> Any:  # fmt: skip
        rule = self._hook(self._call("open", path))
        f = self.target.open(path, mode, block_size=block_size, autocommit=autocommit,
                             cache_options=cache_options, **kwargs)  # fmt: skip
        if rule is not None and rule.truncate_to is not None and "r" in mode:
            data = f.read()[: rule.truncate_to]
            f.close()
            f = io.BytesIO(data)
        self._done(rule)
        return f

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        self._run("touch", path, lambda: self.target.touch(path, truncate=truncate, **kwargs))

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self._run("mkdir", path, lambda: self.target.mkdir(path, create_parents=create_parents, **kwargs))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._run("makedirs", path, lambda: self.target.makedirs(path, exist_ok=exist_ok))

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        self._run("cp_file", path2, lambda: self.target.cp_file(path1, path2, **kwargs))

    def mv(self, path1: str, path2: str, recursive: bool = False, maxdepth: int | None = None, **kwargs: Any) -> None:
        self._run("mv", path2, lambda: self.target.mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs))

    def put_file(self, lpath: str, rpath: str, **kwargs: Any) -> None:
        self._run("put_file", rpath, lambda: self.target.put_file(lpath, rpath, **kwargs))

    def get_file(self, rpath: str, lpath: str, **kwargs: Any) -> None:
        self._run("get_file", rpath, lambda: self.target.get_file(rpath, lpath, **kwargs))

    # --- reads -------------------------------------------------------------------------------

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        rule = self._hook(self._call("cat_file", path, start, end))
        data: bytes = self.target.cat_file(path, start=start, end=end, **kwargs)
        if rule is not None and rule.truncate_to is not None:
            data = data[: rule.truncate_to]
        self._done(rule)
        return data

    def size(self, path: str) -> int:
        return int(self._run("size", path, lambda: self.target.size(path)))

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        out: dict[str, Any] = self._run("info", path, lambda: self.target.info(path, **kwargs))
        return out

    def exists(self, path: str, **kwargs: Any) -> bool:
        return bool(self._run("exists", path, lambda: self.target.exists(path, **kwargs)))

    def isfile(self, path: str) -> bool:
        return bool(self._run("isfile", path, lambda: self.target.isfile(path)))

    def isdir(self, path: str) -> bool:
        return bool(self._run("isdir", path, lambda: self.target.isdir(path)))

    def modified(self, path: str) -> Any:
        return self._run("modified", path, lambda: self.target.modified(path))

    def created(self, path: str) -> Any:
        return self._run("created", path, lambda: self.target.created(path))

    def find(self, path: str, *args: Any, **kwargs: Any) -> Any:
        return self._run("find", path, lambda: self.target.find(path, *args, **kwargs))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        return self._run("ls", path, lambda: self.target.ls(path, detail=detail, **kwargs))

    # --- deletes -----------------------------------------------------------------------------

    def rm(self, path: str, recursive: bool = False, maxdepth: int | None = None) -> None:
        self._run("rm", path, lambda: self.target.rm(path, recursive=recursive, maxdepth=maxdepth))

    def rm_file(self, path: str) -> None:
        self._run("rm_file", path, lambda: self.target.rm_file(path))

    def rmdir(self, path: str) -> None:
        self._run("rmdir", path, lambda: self.target.rmdir(path))

    def invalidate_cache(self, path: str | None = None) -> None:
        self.target.invalidate_cache(path)

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        path = path[len("faulty://") :] if path.startswith("faulty://") else path
        return path.rstrip("/")


def _hold(rule: Rule, recorder: Recorder) -> None:
    """The waiting part of a firing rule: its delay, its gate, a hang until released."""
    if rule.delay_s > 0:
        time.sleep(rule.delay_s)
    if rule.gate is not None:
        rule.gate.wait()
    if rule.hang:
        recorder.released.wait()


def _fire(rule: Rule) -> None:
    if rule.kill:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # the signal is delivered asynchronously; never go on
    err = rule.make_error()
    if err is not None:
        raise err



# --- the faulty:// protocol -----------------------------------------------------------------------


def register_faulty() -> None:
    """Register :class:`FaultyFileSystem` as fsspec's ``faulty`` protocol (needed before a
    ``faulty://`` URL is opened). Idempotent; a ``faulty`` protocol of another kit is an error
    rather than silently replaced (one from a reloaded copy of this module is replaced)."""
    have = fsspec.registry.get("faulty")
    if have is FaultyFileSystem:
        return
    if have is not None and getattr(have, "__qualname__", "") != FaultyFileSystem.__qualname__:
        raise ValueError(f"fsspec protocol 'faulty' is already registered to {have!r}")
    fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
