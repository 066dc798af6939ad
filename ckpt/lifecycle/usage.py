"""Storage use of a root: what each step references, and what it alone added (``ckpt du``).

Incremental saves (docs/FORMAT.md 4.9) make steps share files: the bytes a step references (what
a self-contained copy of it holds) and the bytes the root stores differ. Pure (no I/O): from each
step's files and their sizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ckpt.format.manifest import FileEntry


@dataclass(frozen=True, slots=True)
class StepUsage:
    step: int
    referenced_bytes: int  # every file the step's manifest names
    new_bytes: int  # files no older step names: what this step added to the root
    shared_bytes: int  # files an older step names too (referenced - new)


@dataclass(frozen=True, slots=True)
class Usage:
    steps: tuple[StepUsage, ...]  # ascending
    referenced_bytes: int  # sum over the steps (what copies of each would hold)
    stored_bytes: int  # every distinct file once: what the root holds for these steps

    @property
    def ratio(self) -> float:
        """Referenced over stored: how much incremental saves saved (1.0: nothing shared)."""
        return self.referenced_bytes / self.stored_bytes if self.stored_bytes else 1.0


def usage(files_by_step: Mapping[int, Mapping[str, FileEntry]]) -> Usage:
    """Each step's referenced, new and shared bytes, oldest first, and the totals."""
    seen: set[str] = set()
    rows: list[StepUsage] = []
    stored = referenced_all = 0
    for step in sorted(files_by_step):
        files = files_by_step[step]
        referenced = sum(f.size for f in files.values())
        new = sum(f.size for p, f in files.items() if p not in seen)
        seen.update(files)
        rows.append(StepUsage(step, referenced, new, referenced - new))
        stored += new
        referenced_all += referenced
    return Usage(tuple(rows), referenced_all, stored)
