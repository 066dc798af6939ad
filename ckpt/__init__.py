"""ckpt: a distributed checkpoint store for training clusters.

Writers save tensor shards as safetensors files to any fsspec store under a JSON manifest that
is the single commit point; restore reads exactly the bytes each reader needs.
"""

from __future__ import annotations

from ckpt.errors import *  # noqa: F403  (the whole hierarchy is public)
from ckpt.errors import __all__ as _errors_all
from ckpt.format.manifest import FORMAT_VERSION, Manifest
from ckpt.interop.adopt import adopt
from ckpt.interop.hf import export_hf
from ckpt.interop.zarr import export_zarr, import_zarr  # zarr itself is imported on first use
from ckpt.lifecycle.attempt import Attempt, Report
from ckpt.lifecycle.cleanup import GcPlan, Retired, collect, retire
from ckpt.lifecycle.copy import CopyOptions, CopyReport, copy
from ckpt.lifecycle.restore import restore
from ckpt.lifecycle.retention import RetentionPolicy
from ckpt.lifecycle.save import begin, commit, describe, holders, save, write_shards
from ckpt.lifecycle.steps import latest_step, list_steps, read_manifest
from ckpt.lifecycle.verify import VerifyReport, verify
from ckpt.manager import CheckpointManager, ManagerOptions
from ckpt.options import RestoreOptions, RetryPolicy, SaveOptions
from ckpt.progress import Progress
from ckpt.state.shard import Shard
from ckpt.storage.redaction import install as _install_redaction

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``ckpt.dcp`` on first use: torch.distributed.checkpoint is imported only by its users."""
    if name == "dcp":
        import importlib

        return importlib.import_module("ckpt.dcp")
    raise AttributeError(f"module 'ckpt' has no attribute {name!r}")


_install_redaction()  # the storage clients' DEBUG records name credentials: redacted as they are made (ckpt.storage.redaction)

__all__ = [
    "FORMAT_VERSION",
    "Attempt",
    "CheckpointManager",
    "GcPlan",
    "CopyOptions",
    "CopyReport",
    "ManagerOptions",
    "Manifest",
    "Progress",
    "Report",
    "RestoreOptions",
    "Retired",
    "RetentionPolicy",
    "RetryPolicy",
    "SaveOptions",
    "Shard",
    "VerifyReport",
    "adopt",
    "begin",
    "collect",
    "commit",
    "copy",
    "describe",
    "export_hf",
    "export_zarr",
    "holders",
    "import_zarr",
    "latest_step",
    "list_steps",
    "read_manifest",
    "restore",
    "retire",
    "save",
    "verify",
    "write_shards",
    *_errors_all,
]
