"""The copy planner: what to copy, check or skip for each file of the steps to copy, given what
the destination already holds. Pure (no I/O); :mod:`ckpt.lifecycle.copy` runs the plan."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ckpt.errors import CheckpointExistsError, PlanError
from ckpt.format.manifest import Manifest

Action = Literal["copy", "check", "skip", "replace"]


@dataclass(frozen=True, slots=True)
class FileTask:
    """One data file to bring to the destination.

    ``action``: ``copy`` (absent there), ``check`` (there with the right size: re-read its crc32c,
    skip it if it matches, else replace it), ``skip`` (there with the right size, not checked),
    ``replace`` (there with the wrong size: delete it and copy). ``step``: the first step (in
    ascending order) that references it; its manifest gives the checksum blocks."""

    path: str
    size: int
    crc32c: int
    step: int
    action: Action


@dataclass(frozen=True, slots=True)
class CopyPlan:
    commit: tuple[int, ...]  # steps to commit at the destination, ascending
    present: tuple[int, ...]  # steps already committed there with identical manifests
    tasks: tuple[FileTask, ...]  # every file of the steps to commit, in order of their first step
    needs: Mapping[int, tuple[str, ...]] = field(default_factory=dict)  # step -> its files' paths

    @property
    def bytes_to_copy(self) -> int:
        return sum(t.size for t in self.tasks if t.action in ("copy", "replace"))

    @property
    def bytes_to_check(self) -> int:
        return sum(t.size for t in self.tasks if t.action == "check")


def plan_copy(
    sources: Sequence[Manifest],
    dst_files: Mapping[str, int],
    dst_manifests: Mapping[int, bytes],
    *,
    dst_url: str = "destination",
    check_existing: bool = True,
) -> CopyPlan:
    """Which files to copy to bring ``sources`` to the destination. Pure (no I/O).

    Args:
        sources: the source manifests to copy (any order).
        dst_files: every file at the destination, path (relative to its root) -> size.
        dst_manifests: the raw manifest bytes at the destination of those of the steps of
            ``sources`` that have one there.
        check_existing: plan ``check`` (re-read the crc32c) rather than ``skip`` for a file
            already at the destination with the right size.

    Raises:
        CheckpointExistsError: a step is committed at the destination with a different manifest.
        PlanError: two source manifests record different sizes or crc32c for one file.
    """
    present: list[int] = []
    commit: list[int] = []
    for m in sorted(sources, key=lambda m: m.step):
        there = dst_manifests.get(m.step)
        if there is None:
            commit.append(m.step)
        elif there == m.to_json():
            present.append(m.step)
        else:
            raise CheckpointExistsError(
                f"{dst_url}: step {m.step} is already committed there with a different manifest "
                f"than the source's (attempt {m.attempt}); nothing was copied"
            )
    by_step = {m.step: m for m in sources}
    tasks: dict[str, FileTask] = {}
    needs: dict[int, tuple[str, ...]] = {}
    for step in commit:
        m = by_step[step]
        for path in sorted(m.files):
            f = m.files[path]
            seen = tasks.get(path)
            if seen is not None:
                if (seen.size, seen.crc32c) != (f.size, f.crc32c):
                    raise PlanError(
                        f"file {path}: step {seen.step} records {seen.size} bytes, crc32c "
                        f"{seen.crc32c:#010x}; step {step} records {f.size} bytes, crc32c {f.crc32c:#010x}"
                    )
                continue
            size_there = dst_files.get(path)
            action: Action
            if size_there is None:
                action = "copy"
            elif size_there != f.size:
                action = "replace"
            else:
                action = "check" if check_existing else "skip"
            tasks[path] = FileTask(path, f.size, f.crc32c, step, action)
        needs[step] = tuple(sorted(m.files))
    return CopyPlan(tuple(commit), tuple(present), tuple(tasks.values()), needs)


# --- running ---------------------------------------------------------------------------------------
