"""Bytes other processes fetched, read as if from storage: what a shared restore's executor reads
through (``ckpt.engine.executor.Reader``) once the segments it needs have arrived
(``ckpt.parallel.torchrun.restore``, ``ckpt.parallel.ray.restore_shared``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ckpt.engine.restore_plan import ReadOp
from ckpt.errors import PlanError
from ckpt.storage import Storage

Fetched = tuple[str, int, int, memoryview]  # (path, start, end, the bytes [start, end) of path)


class FetchedSegments:
    """Fetched segments as what ``executor.read_plan`` reads through."""

    local_disk = False

    def __init__(self, storage: Storage, segments: Sequence[Fetched]) -> None:
        self.storage, self.io_timeout_s = storage, storage.io_timeout_s
        self.by_path: dict[str, list[tuple[int, int, memoryview]]] = {}
        for p, a, b, view in segments:
            self.by_path.setdefault(p, []).append((a, b, view))
        for v in self.by_path.values():
            v.sort(key=lambda x: x[0])

    def where(self, rel: str) -> str:
        return self.storage.where(rel)

    def covers(self, op: ReadOp) -> bool:
        """Whether the segments hold every byte of read ``op``."""
        pos = op.range.start
        for a, b, _ in self.by_path.get(op.path, []):
            if a <= pos < b:
                pos = b
            if pos >= op.range.end:
                return True
        return bool(pos >= op.range.end)

    @staticmethod
    def overlaps(op: ReadOp, seg: Fetched) -> bool:
        return bool(seg[0] == op.path and seg[1] < op.range.end and op.range.start < seg[2])

    def _copy(self, rel: str, pos: int, buf: memoryview) -> None:
        done = 0
        for a, b, data in self.by_path[rel]:
            if done >= len(buf):
                break
            at = pos + done
            if a <= at < b:
                n = min(len(buf) - done, b - at)
                buf[done : done + n] = data[at - a : at - a + n]
                done += n
        if done < len(buf):
            raise PlanError(f"{self.where(rel)}: bytes from {pos + done} were not fetched (a bug in the shared restore)")

    def read_pieces(self, rel: str, start: int, pieces: Sequence[list[memoryview]], landed: Callable[[int], None]) -> None:
        pos = start
        for k, piece in enumerate(pieces):
            for buf in piece:
                self._copy(rel, pos, buf)
                pos += len(buf)
            landed(k)

    def read_into_sized(self, rel: str, start: int, buffers: list[memoryview], *, file_size: int) -> None:
        self.read_pieces(rel, start, [buffers], lambda k: None)
