"""Every entry point (list_steps, latest_step, read_manifest, verify, collect, copy and the CLI:
ls, show, verify, rm, gc) ends within its I/O deadline when a storage call hangs:
StorageTimeoutError naming the operation, never a wait without end. The deadline is the
storage's (Storage.io_timeout_s); a streamed write has it per chunk."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.storage import LocalStorage
from ckpt.testing import Recorder, Rule

TIMEOUT_S = 0.3


def _hung_root(tmp_path: Path, op: str, path_contains: str = "") -> tuple[str, dict[str, Any], Recorder]:
    root = str(tmp_path / "run")
    ckpt.save(root, {"w": torch.arange(4096.0)}, step=1, options=ckpt.SaveOptions(fsync=False))
    rec = Recorder(rules=[Rule(op, path_contains=path_contains, hang=True)])
    return f"faulty://{root}", {"target_protocol": "file", "recorder": rec}, rec


CALLS: dict[str, Callable[[str, dict[str, Any]], object]] = {
    "list_steps": lambda r, o: ckpt.list_steps(r, storage_options=o, io_timeout_s=TIMEOUT_S),
    "latest_step": lambda r, o: ckpt.latest_step(r, storage_options=o, io_timeout_s=TIMEOUT_S),
    "read_manifest": lambda r, o: ckpt.read_manifest(r, 1, storage_options=o, io_timeout_s=TIMEOUT_S),
    "verify": lambda r, o: ckpt.verify(r, 1, storage_options=o, io_timeout_s=TIMEOUT_S),
}
# the storage call each entry point cannot do without: a listing, a manifest read, a data read
HANG: dict[str, tuple[str, str]] = {
    "list_steps": ("*", "steps"),
    "latest_step": ("*", "steps"),
    "read_manifest": ("cat_file", "manifest.json"),
    "verify": ("cat_file", ".safetensors"),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_hung_call_ends_within_the_deadline(name: str, tmp_path: Path) -> None:
    op, where = HANG[name]
    root, opts, rec = _hung_root(tmp_path, op, where)
    t0 = time.monotonic()
    try:
        with pytest.raises(ckpt.StorageTimeoutError, match=r"no answer within 0\.3 s"):
            CALLS[name](root, opts)
        assert time.monotonic() - t0 < TIMEOUT_S + 2.0
        assert rec.injected, "the hang never fired"
    finally:
        rec.release()  # let the abandoned thread finish


@pytest.mark.parametrize("name", sorted(CALLS))
def test_without_a_fault_the_calls_succeed(name: str, tmp_path: Path) -> None:
    root, opts, rec = _hung_root(tmp_path, "never-called")
    out = CALLS[name](root, opts)
    assert out is not None
    assert not rec.injected


# --- the deadline rides with the storage: every entry point has one --------------------------------

# each gives the message of the StorageTimeoutError it ends in; the CLI has no deadline option of
# its own: it gets the storage's (``ckpt_io_timeout_s``, a storage option like ``ckpt_retry``)
ENTRY_POINTS: dict[str, tuple[Callable[[str], str], str, str]] = {  # (call, the op that hangs, on)
    "ckpt ls": (lambda r: _cli("ls", r), "list_files", "steps"),
    "ckpt show": (lambda r: _cli("show", r), "read", "manifest.json"),
    "ckpt verify": (lambda r: _cli("verify", r), "read_into", ".safetensors"),
    "ckpt rm": (lambda r: _cli("rm", r, "1"), "size", "manifest.json"),
    "ckpt gc": (lambda r: _cli("gc", r), "list_files", ""),
    "ckpt.collect": (lambda r: _error(lambda: ckpt.collect(r, io_timeout_s=TIMEOUT_S)), "list_files", ""),
    "ckpt.copy": (
        lambda r: _error(lambda: ckpt.copy(r, f"{r}/../copy", src_storage_options={"ckpt_io_timeout_s": TIMEOUT_S})),
        "read_into",
        ".safetensors",
    ),
}


def _cli(*argv: str) -> str:
    from ckpt.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([*argv, "--storage-option", f"ckpt_io_timeout_s={TIMEOUT_S}"])
    assert rc == 4, f"exit code {rc}: {err.getvalue()}"  # an error, not a finding (1)
    return err.getvalue()


def _error(call: Callable[[], object]) -> str:
    with pytest.raises(ckpt.StorageTimeoutError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_entry_point_has_the_storage_deadline(name: str, tmp_path: Path) -> None:
    from ckpt.testing import wrap_storage

    call, op, where = ENTRY_POINTS[name]
    root = str(tmp_path / "run")
    ckpt.save(root, {"w": torch.arange(4096.0)}, step=1, options=ckpt.SaveOptions(fsync=False))
    rec = Recorder(rules=[Rule(op, path_contains=where, hang=True, times=1)])
    valve = threading.Timer(8.0, rec.release)  # without a deadline the call would wait forever
    valve.start()
    t0 = time.monotonic()
    try:
        with wrap_storage(rec, only=root):
            message = call(root)
        assert "no answer within 0.3 s" in message
        assert time.monotonic() - t0 < TIMEOUT_S + 2.0, "the call waited past its deadline"
        assert rec.injected, "the hang never fired"
    finally:
        valve.cancel()
        rec.release()


def test_a_streamed_write_has_the_deadline_per_chunk(tmp_path: Path) -> None:
    """A write that keeps taking chunks is never cut, however long it takes in all; one whose
    data stops coming for longer than the deadline is."""
    from ckpt.storage import open_storage

    storage = open_storage(str(tmp_path), io_timeout_s=TIMEOUT_S)

    def slow() -> Iterator[bytes]:
        for _ in range(8):  # 0.8 s in all, 0.1 s a chunk
            time.sleep(0.1)
            yield b"x" * 10

    storage.write_file("slow.bin", slow, size=80, fsync=False)
    assert storage.read("slow.bin") == b"x" * 80
    pumped = _Pumped(str(tmp_path))  # a backend taking the chunks on a thread of its own
    pumped.io_timeout_s = TIMEOUT_S
    pumped.write_file("pumped.bin", slow, size=80, fsync=False)
    assert storage.read("pumped.bin") == b"x" * 80
    stop = threading.Event()

    def stalled() -> Iterator[bytes]:
        yield b"x" * 10
        stop.wait()
        raise OSError("the source stalled")

    try:
        with pytest.raises(ckpt.StorageTimeoutError, match=r"stalled\.bin: write: no answer within 0\.3 s"):
            storage.write_file("stalled.bin", stalled, size=20, fsync=False)
    finally:
        stop.set()
    # the deadline is the storage's: a storage option sets it (None: none), over the keyword
    assert open_storage(str(tmp_path), {"ckpt_io_timeout_s": None}, io_timeout_s=5.0).io_timeout_s is None
    assert open_storage(str(tmp_path), {"ckpt_io_timeout_s": 2}).io_timeout_s == 2.0
    with pytest.raises(ValueError, match="ckpt_io_timeout_s"):
        open_storage(str(tmp_path), {"ckpt_io_timeout_s": 0})


class _Pumped(LocalStorage):
    def write_file(self, rel: str, chunks: Any, *, size: int, fsync: bool) -> None:
        got: list[bytes] = []
        pump = threading.Thread(target=lambda: got.extend(chunks() if callable(chunks) else chunks))
        pump.start()
        pump.join()
        super().write_file(rel, got, size=size, fsync=fsync)
