"""The read-only entry points (list_steps, latest_step, read_manifest, verify and the CLI on top
of them) end within their I/O deadline when a storage call hangs: StorageTimeoutError naming the
operation, never a wait without end."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
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
