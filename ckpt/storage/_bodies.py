"""Upload bodies and streamed downloads for the object-store backends: the data of a file cut into request
bodies in memory of their own, and a response body streamed into the caller's buffers."""

from __future__ import annotations

import io
import mmap
from collections.abc import Iterable
from typing import Any

# Upload bodies: private anonymous memory, faulted in by the kernel in one go where it can
# (MAP_POPULATE, Linux: 1 GiB to moto went from 9.3 s to 8.5 s; plain mmap faulting page by page
# was 10 s). Elsewhere, or on Windows (no flags), the platform default.
_MAP_FLAGS: dict[str, int] = (
    {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)}
    if hasattr(mmap, "MAP_ANONYMOUS")
    else {}
)


class Body(io.RawIOBase):
    """A request body in memory of its own (an anonymous mapping): a seekable, readable file
    that botocore can checksum and rewind and aiohttp streams in pieces."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self._map = mmap.mmap(-1, max(n, 1), **_MAP_FLAGS)
        self.view = memoryview(self._map)[:n]
        self._size = n
        self._pos = 0

    def truncate_to(self, n: int) -> None:
        self._size = min(self._size, n)

    def __len__(self) -> int:
        return self._size

    def getvalue(self) -> bytes:
        return bytes(self.view[: self._size])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf: Any) -> int:
        k = max(0, min(len(buf), self._size - self._pos))
        memoryview(buf).cast("B")[:k] = self.view[self._pos : self._pos + k]
        self._pos += k
        return k

    def close(self) -> None:
        if not self.closed:
            self.view.release()
            self._map.close()
        super().close()


class Chunks:
    """The data of a file as it comes (chunks of any size), cut into bodies of any size: a chunk
    that straddles two bodies is split (as views), its rest kept for the next."""

    def __init__(self, chunks: Iterable[memoryview | bytes]) -> None:
        self._source = iter(chunks)
        self._rest = memoryview(b"")

    def take(self, n: int) -> tuple[Body, int]:
        """The next ``n`` bytes (fewer: the data ended) as a request body, and their count.
        One copy of the chunks, into a :class:`Body`: anonymous memory mapped for this body
        alone and unmapped when it is dropped. (A ``BytesIO`` grown to a part's size comes from
        the allocator, whose dynamic mmap threshold soon serves 16 MiB blocks from its arenas
        and keeps them: ~85 MiB more peak RSS on a 1 GiB save. A ``bytes`` body would be
        wrapped in a ``BytesIO`` sharing it, which copies it whole when aiohttp asks for its
        buffer.)"""
        body = Body(n)
        view = body.view
        got = 0
        while got < n:
            if not self._rest:
                chunk = next(self._source, None)
                if chunk is None:
                    break
                self._rest = memoryview(chunk).cast("B")
                continue
            k = min(len(self._rest), n - got)
            view[got : got + k] = self._rest[:k]
            self._rest = self._rest[k:]
            got += k
        body.truncate_to(got)
        return body, got

    def exhausted(self) -> bool:
        """Whether no byte is left (pulls the source until a non-empty chunk or its end)."""
        while not self._rest:
            chunk = next(self._source, None)
            if chunk is None:
                return True
            self._rest = memoryview(chunk).cast("B")
        return False


async def stream_into(body: Any, buffers: list[memoryview]) -> int:
    """Copy a streaming response body into ``buffers`` in order; the bytes copied (it stops at
    the end of the body or of the buffers, whichever comes first)."""
    content = getattr(getattr(body, "raw_stream", None), "content", None)
    # aiohttp (a response's StreamReader, or one inside botocore's body): the next received
    # chunk, as is (no join)
    readany = getattr(content, "readany", None) or getattr(body, "readany", None)
    done = 0
    rest = memoryview(b"")
    for buf in buffers:
        pos = 0
        while pos < len(buf):
            if not rest:
                chunk = await readany() if readany is not None else await body.read(len(buf) - pos)
                if not chunk:
                    return done
                rest = memoryview(chunk)
            n = min(len(rest), len(buf) - pos)
            buf[pos : pos + n] = rest[:n]
            rest = rest[n:]
            pos += n
            done += n
    if readany is not None:
        await readany()  # the end of the body (b""): the connection goes back to the pool
    return done
