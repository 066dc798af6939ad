"""The one exception hierarchy of ckpt.

Every error ckpt raises on purpose is a :class:`CkptError`. Each class also subclasses the
builtin that callers would naturally catch (``FileNotFoundError``, ``FileExistsError``,
``ValueError``, ``OSError``, ``TypeError``, ``KeyError``), so ``except FileNotFoundError`` keeps
working. Messages name the file, key or rank, what was expected and what was found.

Pure (no I/O).
"""

from __future__ import annotations

__all__ = [
    "BaseRetiredError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "CkptError",
    "CkptWarning",
    "ConditionalWriteUnsupportedError",
    "CorruptCheckpointError",
    "HeaderError",
    "IntegrityMetadataError",
    "InvalidByteRangeError",
    "ManifestChecksumError",
    "ManifestError",
    "ManifestLocationError",
    "ManifestParseError",
    "ManifestSchemaError",
    "ManifestTooLargeError",
    "MissingKeyError",
    "MissingShardError",
    "NoIntactCheckpointError",
    "NotSafetensorsError",
    "OpaqueBytesError",
    "OverlappingRangesError",
    "PlanError",
    "RootTypeError",
    "ShardCoverageError",
    "ShardSizeMismatchError",
    "StateError",
    "StorageError",
    "StorageTimeoutError",
    "TargetMismatchError",
    "TensorSizeError",
    "UnsafePathError",
    "UnsupportedDtypeError",
    "UnsupportedFormatError",
    "WorkerFailedError",
]


class CkptError(Exception):
    """Root of every error ckpt raises on purpose."""


class CkptWarning(UserWarning):
    """Root of every warning ckpt emits."""


# --- the manifest (the commit record) -----------------------------------------------------


class ManifestError(CkptError, ValueError):
    """A manifest is malformed, hostile or inconsistent. The checkpoint is not usable."""


class ManifestTooLargeError(ManifestError):
    """The manifest is larger than the cap; refused before parsing."""


class ManifestParseError(ManifestError):
    """Not UTF-8, not JSON, trailing data, duplicate keys, NaN/Infinity or nesting too deep."""


class ManifestSchemaError(ManifestError):
    """A field is missing, unknown, of the wrong type or out of range."""


class UnsupportedFormatError(ManifestError):
    """``format_version`` is missing or newer than this library reads."""


class UnsupportedDtypeError(ManifestError):
    """A dtype code that ckpt does not know."""


class UnsafePathError(ManifestError):
    """A file path in a manifest could escape the root (traversal, scheme, absolute path...)."""


class InvalidByteRangeError(ManifestError):
    """A byte range is negative, reversed or beyond the recorded file size."""


class OverlappingRangesError(ManifestError):
    """Two entries alias the same bytes of one file."""


class TensorSizeError(ManifestError):
    """``prod(shape) * itemsize`` disagrees with a byte range, or exceeds a cap."""


class ShardCoverageError(ManifestError):
    """The shards of a tensor overlap, leave gaps or fall outside its global shape."""


class IntegrityMetadataError(ManifestError):
    """A checksum is missing, malformed or of an unknown algorithm (verification fails closed)."""


class ManifestChecksumError(ManifestError):
    """The manifest's own crc32c does not match its bytes: it was damaged after it was written."""


class ManifestLocationError(ManifestError):
    """A manifest's ``step`` does not match where it was found (a replayed or moved manifest)."""


# --- presence -------------------------------------------------------------------------------


class CheckpointNotFoundError(CkptError, FileNotFoundError):
    """No committed checkpoint at that root/step."""


class CheckpointExistsError(CkptError, FileExistsError):
    """The step is already committed by another attempt (create-only commit lost the race)."""


class BaseRetiredError(CkptError):
    """The base step of an incremental save was retired (or replaced) while the save ran, so the
    bytes it references may be deleted: the save was withdrawn (its manifest deleted again).
    ``ckpt.save`` and the manager then save the step in full."""


# --- data objects -------------------------------------------------------------------------


class CorruptCheckpointError(CkptError, ValueError):
    """Stored bytes disagree with the manifest. Nothing is returned from a corrupt read."""


class ChecksumMismatchError(CorruptCheckpointError):
    """A CRC32C over a block, shard or file does not match the manifest."""


class ShardSizeMismatchError(CorruptCheckpointError):
    """A shard file is truncated or extended compared with the manifest."""


class HeaderError(CorruptCheckpointError):
    """A safetensors header is malformed, hostile or disagrees with the manifest."""


class NotSafetensorsError(HeaderError):
    """Where a safetensors file is expected, the bytes are something else (too short, an
    implausible header length, a header that is not a JSON object: a zip, a torch.save file, a
    pickled data...). ckpt never falls back to another loader."""


class MissingShardError(CorruptCheckpointError, FileNotFoundError):
    """A file the manifest references does not exist."""


class NoIntactCheckpointError(CorruptCheckpointError):
    """A restore that walks back over damaged steps (``fallback=True``, the manager's resume)
    found none intact; the message names each step skipped and why."""


# --- save-side and request errors --------------------------------------------------------


class StateError(CkptError, TypeError):
    """A value in the state cannot be saved; the message names its key path."""


class RootTypeError(CkptError, TypeError):
    """A root (or a copy's source or destination) is neither a string nor an ``os.PathLike``."""


class PlanError(CkptError, ValueError):
    """Reports or requests are inconsistent (duplicate regions, bad shard geometry...)."""


class MissingKeyError(CkptError, KeyError):
    """A requested key is not in the checkpoint."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class OpaqueBytesError(CkptError, TypeError):
    """A PyTorch DCP non-tensor value would be stored or handed back as opaque bytes (DCP's
    default planners pickle them) without the ``allow_opaque_bytes`` opt-in; the message names
    its key and the ckpt.dcp planner that stores it as typed JSON instead."""


class TargetMismatchError(CkptError, ValueError):
    """A restore target does not match the saved structure, dtype or shape."""


class StorageError(CkptError, OSError):
    """The storage backend failed (after retries). Carries the operation and the path."""


class StorageTimeoutError(StorageError, TimeoutError):
    """A storage operation did not finish within ``io_timeout_s``; names the file and the
    operation. The thread running it cannot be stopped from Python: it is abandoned (a daemon
    thread) and may still complete later."""


class ConditionalWriteUnsupportedError(PlanError):
    """The object store ignores ``If-None-Match: *`` (the conditional-write probe failed), so
    concurrent commits could overwrite each other; refused unless the user declares single-writer
    use with ``SaveOptions(allow_non_atomic_commit=True)``."""


class WorkerFailedError(CkptError):
    """One or more writers failed; ``failures`` maps rank to its error."""

    def __init__(self, message: str, failures: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.failures: dict[int, str] = dict(failures or {})
