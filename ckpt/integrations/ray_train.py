"""Ray Train's checkpoint API over ckpt: ``Result.checkpoint``, ``CheckpointConfig``, Tune and
restarts see ckpt's commits; Ray never holds (nor deletes) the data.

    from ckpt.integrations.ray_train import Reporter

    def train_loop(config):                       # on every Ray Train worker
        mgr = ckpt.CheckpointManager(root, ...)
        reporter = Reporter(mgr)
        start = reporter.restore(target)           # the step ray.train.get_checkpoint() names
        for step in range(start or 0, steps):
            ...
            mgr.save(step, state)
            reporter.report({"loss": loss}, step)  # every worker, every step: ray.train.report

After each save the manager commits, :meth:`Reporter.report` hands Ray a *pointer checkpoint*
(rank 0's: a directory holding one small JSON file, :data:`POINTER`, naming the root and the
step, never the data) with the metrics, so ``Result.checkpoint``, ``best_checkpoints``, Tune's
schedulers and ``CheckpointConfig(num_to_keep=...)`` work; Ray deleting a pointer never touches
ckpt's steps, which only ckpt's retention retires. On a (re)start :meth:`Reporter.restore`
restores the newest intact committed step: the one ``ray.train.get_checkpoint()`` names, or a
newer one committed after the last report (ckpt never saves a step twice, so a rerun from an
older step would collide with it). Where the installed Ray has
``ray.train.get_preemption_info`` (Ray Train v2), ``report`` also polls it and, when a node is
about to be reclaimed, makes the manager's next ``save()`` a just-in-time save
(``CheckpointManager.request_save``).

``report`` is a barrier across the workers, as ``ray.train.report`` is: every worker calls it
the same number of times. This module is the only one in ckpt.integrations that imports Ray.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray.train

from ckpt.errors import CkptWarning, ManifestError
from ckpt.manager import CheckpointManager

POINTER = "ckpt-pointer.json"  # the one file of a pointer checkpoint
FORMAT = "ckpt-pointer/1"


@dataclass(frozen=True, slots=True)
class Pointer:
    """What a pointer checkpoint names: a committed step under a ckpt root."""

    root: str
    step: int


def write_pointer(directory: str, pointer: Pointer) -> None:
    with open(os.path.join(directory, POINTER), "w") as f:
        json.dump({"format": FORMAT, "root": pointer.root, "step": pointer.step}, f)


def read_pointer(checkpoint: Any) -> Pointer | None:
    """The pointer a Ray ``Checkpoint`` holds; None (with a CkptWarning) for a checkpoint that is
    not a ckpt pointer."""
    with checkpoint.as_directory() as d:
        path = os.path.join(d, POINTER)
        if not os.path.exists(path):
            warnings.warn(f"{checkpoint}: not a ckpt pointer checkpoint (no {POINTER}); ignored", CkptWarning, stacklevel=3)
            return None
        with open(path) as f:
            data = json.load(f)
    if not (isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("root"), str)
            and type(data.get("step")) is int):  # fmt: skip
        raise ManifestError(f"{checkpoint}: {POINTER} is not a {FORMAT} record: {str(data)[:200]!r}")
    return Pointer(data["root"], data["step"])


class Reporter:
    """Ray Train's ``report`` / ``get_checkpoint`` / preemption for one worker's manager."""

    def __init__(self, manager: CheckpointManager, *, watch_preemption: bool = True) -> None:
        self.manager = manager
        self.rank = ray.train.get_context().get_world_rank()
        self.watch_preemption = watch_preemption and hasattr(ray.train, "get_preemption_info")
        self.reported: int | None = None  # the newest step handed to Ray as a checkpoint
        self.preempted = False  # a preemption was announced (the just-in-time save requested)

    def resume_step(self) -> int | None:
        """The step Ray's latest reported checkpoint names, if it points at this manager's root
        and is still committed; else None (the newest committed step is restored)."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        pointer = read_pointer(checkpoint)
        if pointer is None:
            return None
        if pointer.root != self.manager.root:
            warnings.warn(f"Ray's checkpoint points at {pointer.root}, not {self.manager.root}: "
                          "restoring this manager's newest step", CkptWarning, stacklevel=2)  # fmt: skip
            return None
        return pointer.step

    def restore(self, target: object) -> int | None:
        """Fill ``target`` from the newest committed step (the manager's restore, with its
        fallback over damaged steps); the step restored, or None when there is none yet.

        That is the step ``ray.train.get_checkpoint()`` names or a newer one: a pointer is
        reported only after its step committed, and a save can commit after the last report
        (a worker killed in between). ckpt never saves a step twice, so going back to the
        reported step would make the rerun's saves of the newer steps collide with them; a
        pointer naming a step newer than the one restored (retired, or damaged and skipped) is
        warned about."""
        wanted = self.resume_step()
        restored = self.manager.restore(target)
        if wanted is not None and (restored is None or restored < wanted):
            warnings.warn(f"{self.manager.root}: Ray's last reported checkpoint is step {wanted}, but the newest "
                          f"intact committed step is {restored}; restored that", CkptWarning, stacklevel=2)  # fmt: skip
        self.reported = wanted if restored is not None and wanted is not None and wanted >= restored else restored
        return restored

    def report(self, metrics: Mapping[str, Any], step: int | None = None) -> bool:
        """``ray.train.report(metrics)`` on every worker, with a pointer to the newest committed
        step (rank 0's) when a save committed since the last report. Returns whether a
        preemption was announced at this call (the manager's next ``save()`` then saves)."""
        announced = False
        if self.watch_preemption and not self.preempted:
            info = ray.train.get_preemption_info()  # a barrier: every worker gets the same answer
            if info is not None:
                self.preempted = announced = True
                self.manager.request_save()
        committed = self.manager.committed_step
        out = dict(metrics)
        if step is not None:
            out.setdefault("step", step)
        if committed is None or committed == self.reported or self.rank != 0:
            if committed is not None:
                self.reported = committed
            ray.train.report(out)
            return announced
        out["ckpt_step"] = committed
        with tempfile.TemporaryDirectory(prefix="ckpt-pointer-") as d:
            write_pointer(d, Pointer(self.manager.root, committed))
            ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(d))
        self.reported = committed
        return announced
