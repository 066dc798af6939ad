"""Options for save and restore: frozen dataclasses, the one home of every default.

Options travel as arguments (they are small and picklable, so they reach Ray workers intact);
ckpt reads no environment variables of its own.

Pure (no I/O).
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class SaveOptions:
    """How a writer lays out and writes its shard files."""

    block_bytes: int = 4 * MiB  # checksum block: a ranged reader over-reads at most this much
    max_file_bytes: int = 512 * MiB  # start a new shard file past this (a bigger tensor gets its own)
    write_chunk_bytes: int = 16 * MiB  # one write()/multipart part
    max_inflight_bytes: int = 256 * MiB  # bytes buffered for upload at once (object stores)
    num_threads: int = 8  # files written concurrently
    split_bytes: int = 32 * MiB  # replicated regions at least this big are split among their holders
    fsync: bool = True  # local disks: fsync shard files and directories before the commit
    update_latest: bool = True  # write the LATEST hint after a commit
    allow_non_atomic_commit: bool = False  # permit backends without a create-only primitive

    def __post_init__(self) -> None:
        for name in ("block_bytes", "max_file_bytes", "write_chunk_bytes", "max_inflight_bytes", "num_threads", "split_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SaveOptions.{name} must be positive")


@dataclass(frozen=True, slots=True)
class RestoreOptions:
    """How restore plans and runs its reads."""

    verify: bool = True  # check the crc32c of every block read (fail closed)
    max_gap_bytes: int = 1 * MiB  # coalesce two reads of one file whose gap is at most this
    read_chunk_bytes: int = 32 * MiB  # split reads larger than this, for parallelism
    max_inflight_bytes: int = 512 * MiB  # bytes in flight (scratch and network buffers) at once
    num_threads: int = 8  # concurrent reads

    def __post_init__(self) -> None:
        for name in ("read_chunk_bytes", "max_inflight_bytes", "num_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RestoreOptions.{name} must be positive")
        if self.max_gap_bytes < 0:
            raise ValueError("RestoreOptions.max_gap_bytes must be >= 0")
