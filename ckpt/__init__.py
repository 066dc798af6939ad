"""ckpt: a distributed checkpoint store for training clusters.

Writers save tensor shards as safetensors files to any fsspec store under a JSON manifest that
is the single commit point; restore reads exactly the bytes each reader needs.

``import ckpt`` is cheap: only the error hierarchy is imported with the package; every other
public name is imported on first use (PEP 562, :data:`_LAZY`), so the ``ckpt`` command line and
code that only reads manifests never pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ckpt.errors import *  # noqa: F403  (the whole hierarchy is public)
from ckpt.errors import __all__ as _errors_all
from ckpt.storage.redaction import install as _install_redaction

if TYPE_CHECKING:  # what mypy and IDEs see; at run time these come from __getattr__
    from ckpt import dcp as dcp
    from ckpt.format.manifest import FORMAT_VERSION, Manifest
    from ckpt.interop.adopt import adopt
    from ckpt.interop.hf import export_hf
    from ckpt.interop.zarr import export_zarr, import_zarr
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

__version__ = "0.1.0"

# public name -> the module that defines it (imported by __getattr__ on first use)
_LAZY: dict[str, str] = {
    "FORMAT_VERSION": "ckpt.format.manifest",
    "Manifest": "ckpt.format.manifest",
    "adopt": "ckpt.interop.adopt",
    "export_hf": "ckpt.interop.hf",
    "export_zarr": "ckpt.interop.zarr",
    "import_zarr": "ckpt.interop.zarr",
    "Attempt": "ckpt.lifecycle.attempt",
    "Report": "ckpt.lifecycle.attempt",
    "GcPlan": "ckpt.lifecycle.cleanup",
    "Retired": "ckpt.lifecycle.cleanup",
    "collect": "ckpt.lifecycle.cleanup",
    "retire": "ckpt.lifecycle.cleanup",
    "CopyOptions": "ckpt.lifecycle.copy",
    "CopyReport": "ckpt.lifecycle.copy",
    "copy": "ckpt.lifecycle.copy",
    "restore": "ckpt.lifecycle.restore",
    "RetentionPolicy": "ckpt.lifecycle.retention",
    "begin": "ckpt.lifecycle.save",
    "commit": "ckpt.lifecycle.save",
    "describe": "ckpt.lifecycle.save",
    "holders": "ckpt.lifecycle.save",
    "save": "ckpt.lifecycle.save",
    "write_shards": "ckpt.lifecycle.save",
    "latest_step": "ckpt.lifecycle.steps",
    "list_steps": "ckpt.lifecycle.steps",
    "read_manifest": "ckpt.lifecycle.steps",
    "VerifyReport": "ckpt.lifecycle.verify",
    "verify": "ckpt.lifecycle.verify",
    "CheckpointManager": "ckpt.manager",
    "ManagerOptions": "ckpt.manager",
    "RestoreOptions": "ckpt.options",
    "RetryPolicy": "ckpt.options",
    "SaveOptions": "ckpt.options",
    "Progress": "ckpt.progress",
    "Shard": "ckpt.state.shard",
}


def __getattr__(name: str) -> object:
    """A public name on first use: its module is imported then (``ckpt.dcp`` too, so
    torch.distributed.checkpoint is imported only by its users). The value is cached in the
    package's namespace, so later lookups do not come back here."""
    if name == "dcp":
        return importlib.import_module("ckpt.dcp")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "dcp"})


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
