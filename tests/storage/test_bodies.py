"""Request bodies cut from a file's chunks (``ckpt.storage._bodies.Chunks``) and the CRC-32C each
one carries for a service that checks uploads: combined from the CRCs the producer gave with its
chunks (``Checked``), so those bytes are never hashed again; hashed here only where no CRC came
with them."""

from __future__ import annotations

import os

import crc32c

from ckpt.storage import Checked
from ckpt.storage._bodies import Chunks

KiB = 1 << 10


def _checked(data: bytes, sizes: list[int]) -> list[Checked]:
    out, pos = [], 0
    for n in sizes:
        piece = memoryview(data)[pos : pos + n]
        out.append(Checked(piece, crc32c.crc32c(piece)))
        pos += n
    assert pos == len(data)
    return out


def _cut(data: Chunks, n: int, at_least: int | None = None) -> list[tuple[bytes, int | None]]:
    bodies = []
    while True:
        body, got = data.take(n, at_least=at_least)
        if got == 0:
            return bodies
        bodies.append((body.getvalue(), body.crc32c))


def test_bodies_ending_on_chunk_boundaries_hash_nothing() -> None:
    """The executor's chunks (a header, then blocks) cut into parts that may end early on a
    chunk boundary: every part's CRC-32C is right and not one byte was hashed again."""
    data = os.urandom(100 + 10 * 64 * KiB + 123)
    chunks = Chunks(_checked(data, [100] + [64 * KiB] * 10 + [123]), crc=True)
    bodies = _cut(chunks, 200 * KiB, at_least=150 * KiB)
    assert b"".join(b for b, _ in bodies) == data
    assert len(bodies) == 4  # 3 blocks (+ the header) per part, then the rest
    for body, crc in bodies:
        assert crc == crc32c.crc32c(body)
    assert chunks.hashed == 0


def test_a_checked_chunk_split_between_two_bodies() -> None:
    """Without room to end early, a chunk is split: its first piece is hashed, the second's CRC
    is derived from the chunk's own (crc(rest) = shift(crc(piece)) ^ crc(tail))."""
    data = os.urandom(3 * 1000 + 17)
    chunks = Chunks(_checked(data, [1000, 1000, 1017]), crc=True)
    bodies = _cut(chunks, 1300)
    assert [len(b) for b, _ in bodies] == [1300, 1300, 417]
    for body, crc in bodies:
        assert crc == crc32c.crc32c(body)
    assert chunks.hashed == 300 + 600  # the first piece of each chunk split: [1000, 1300), [2000, 2600)


def test_plain_chunks_are_hashed_once_and_never_end_a_body_early() -> None:
    data = os.urandom(5000)
    view = memoryview(data)
    chunks = Chunks([view[:1234], bytes(view[1234:4000]), view[4000:]], crc=True)
    bodies = _cut(chunks, 2048, at_least=1000)
    assert [len(b) for b, _ in bodies] == [2048, 2048, 904]  # at_least only spares checked chunks
    for body, crc in bodies:
        assert crc == crc32c.crc32c(body)
    assert chunks.hashed == len(data)


def test_without_crc_nothing_is_hashed() -> None:
    data = os.urandom(3000)
    chunks = Chunks(_checked(data, [1000, 2000]))
    bodies = _cut(chunks, 1500, at_least=500)
    assert [len(b) for b, _ in bodies] == [1500, 1500]
    assert all(crc is None for _, crc in bodies)
    assert chunks.hashed == 0
