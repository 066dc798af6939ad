"""Test kit, shipped so users can test their own setups: the fault kit (:mod:`ckpt.testing.faults`:
:class:`FaultyStorage` over any storage backend, :class:`FaultyFileSystem` below it, the
:class:`Recorder` and its :class:`Rule` objects) and the storage conformance suite
(:mod:`ckpt.testing.storage_tests`, imported on its own: it needs pytest); the proxies in front
of an S3 endpoint (:mod:`ckpt.testing.proxy`, :mod:`ckpt.testing.fault_proxy`) and a synthetic
checkpoint of many ranks x tensors for scale tests (:mod:`ckpt.testing.scale`), each imported on
its own.

Importing this package registers nothing: call :func:`register_faulty` before opening a
``faulty://`` URL.
"""

from __future__ import annotations

from ckpt.testing.faults import Call, FaultyFileSystem, Recorder, Rule, rank_of, register_faulty
from ckpt.testing.faulty_storage import FaultyStorage, wrap_storage

__all__ = [
    "Call",
    "FaultyFileSystem",
    "FaultyStorage",
    "Recorder",
    "Rule",
    "rank_of",
    "register_faulty",
    "wrap_storage",
]
