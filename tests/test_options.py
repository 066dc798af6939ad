"""Option defaults that depend on the backend."""

from __future__ import annotations

import pytest

import ckpt
from ckpt.options import LOCAL_MAX_GAP_BYTES, REMOTE_MAX_GAP_BYTES


def test_coalescing_gap_defaults_per_backend() -> None:
    opts = ckpt.RestoreOptions()
    assert opts.gap_bytes(local=True) == LOCAL_MAX_GAP_BYTES
    assert opts.gap_bytes(local=False) == REMOTE_MAX_GAP_BYTES
    assert LOCAL_MAX_GAP_BYTES < REMOTE_MAX_GAP_BYTES  # a pread is cheap, a request is not


def test_explicit_gap_wins_everywhere() -> None:
    opts = ckpt.RestoreOptions(max_gap_bytes=0)
    assert opts.gap_bytes(local=True) == opts.gap_bytes(local=False) == 0
    with pytest.raises(ValueError, match="max_gap_bytes"):
        ckpt.RestoreOptions(max_gap_bytes=-1)


def test_read_size_defaults_per_backend() -> None:
    from ckpt.options import LOCAL_READ_CHUNK_BYTES, REMOTE_READ_CHUNK_BYTES

    opts = ckpt.RestoreOptions()
    assert opts.chunk_bytes(local=True) == LOCAL_READ_CHUNK_BYTES
    assert opts.chunk_bytes(local=False) == REMOTE_READ_CHUNK_BYTES
    assert ckpt.RestoreOptions(read_chunk_bytes=1 << 20).chunk_bytes(local=False) == 1 << 20
    with pytest.raises(ValueError, match="read_chunk_bytes"):
        ckpt.RestoreOptions(read_chunk_bytes=0)
