"""Test kit, shipped so users can test their own setups: a recording, fault-injecting fsspec
file system.

``FaultyFileSystem`` wraps any fsspec file system (``target_protocol`` + ``target_options``)
and records every call ckpt makes through it (operation, path, byte range). A :class:`Recorder`
holds the log and the fault rules; pass it in ``storage_options``::

    rec = Recorder()
    opts = {"target_protocol": "memory", "recorder": rec}
    ckpt.save("faulty://bucket/run", state, step=1, storage_options=opts)
    rec.calls_of("cat_file")  # the ranged reads that were made

Rules can raise an error, or truncate what a read returns, for calls matching an operation
and a path substring, after the first ``skip`` matches.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem


@dataclass(frozen=True, slots=True)
class Call:
    op: str
    path: str
    start: int | None = None
    end: int | None = None
    nbytes: int | None = None  # bytes moved (written or returned)


@dataclass
class Rule:
    op: str  # operation name, or "*" for any
    path_contains: str = ""
    error: BaseException | None = None  # raise this
    truncate_to: int | None = None  # reads return at most this many bytes
    skip: int = 0  # let this many matching calls through first
    times: int = 1 << 30  # then fire at most this often
    fired: int = 0
    gate: threading.Event | None = None  # block the call until this is set (then apply the rest)


@dataclass
class Recorder:
    calls: list[Call] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, call: Call) -> Rule | None:
        with self.lock:
            self.calls.append(call)
            for rule in self.rules:
                if rule.op in ("*", call.op) and rule.path_contains in call.path:
                    if rule.skip > 0:
                        rule.skip -= 1
                        continue
                    if rule.fired < rule.times:
                        rule.fired += 1
                        return rule
        return None

    def calls_of(self, op: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.op == op]

    def clear(self) -> None:
        with self.lock:
            self.calls.clear()


class FaultyFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """Delegates to a target file system, recording each call and applying the fault rules."""

    protocol = "faulty"
    cachable = False

    def __init__(
        self,
        target_protocol: str = "memory",
        target_options: dict[str, Any] | None = None,
        recorder: Recorder | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.target = fsspec.filesystem(target_protocol, **(target_options or {}))
        self.recorder = recorder if recorder is not None else Recorder()
        # ckpt's commit is only as atomic as the target's create-only write
        self.ckpt_atomic_create = target_protocol in ("memory", "s3", "s3a")

    def _hook(self, call: Call) -> Rule | None:
        rule = self.recorder.record(call)
        if rule is not None and rule.gate is not None:
            rule.gate.wait()
        if rule is not None and rule.error is not None:
            raise rule.error
        return rule

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        self._hook(Call("pipe_file", path, nbytes=len(value)))
        self.target.pipe_file(path, value, mode=mode, **kwargs)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        rule = self._hook(Call("cat_file", path, start, end))
        data: bytes = self.target.cat_file(path, start=start, end=end, **kwargs)
        if rule is not None and rule.truncate_to is not None:
            data = data[: rule.truncate_to]
        return data

    def size(self, path: str) -> int:
        self._hook(Call("size", path))
        return int(self.target.size(path))

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        self._hook(Call("info", path))
        out: dict[str, Any] = self.target.info(path, **kwargs)
        return out

    def exists(self, path: str, **kwargs: Any) -> bool:
        self._hook(Call("exists", path))
        return bool(self.target.exists(path, **kwargs))

    def find(self, path: str, *args: Any, **kwargs: Any) -> Any:
        self._hook(Call("find", path))
        return self.target.find(path, *args, **kwargs)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        self._hook(Call("ls", path))
        return self.target.ls(path, detail=detail, **kwargs)

    def rm(self, path: str, recursive: bool = False, maxdepth: int | None = None) -> None:
        self._hook(Call("rm", path))
        self.target.rm(path, recursive=recursive, maxdepth=maxdepth)

    def invalidate_cache(self, path: str | None = None) -> None:
        self.target.invalidate_cache(path)

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        path = path[len("faulty://") :] if path.startswith("faulty://") else path
        return path.rstrip("/")


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
