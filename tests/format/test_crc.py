"""CRC-32C combine, against the crc32c package on real bytes."""

from __future__ import annotations

import os

import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.format.crc import combine


@settings(max_examples=200, deadline=None)
@given(a=st.binary(max_size=300), b=st.binary(max_size=300), fast=st.booleans())
def test_combine_equals_the_crc_of_the_concatenation(a: bytes, b: bytes, fast: bool) -> None:
    assert combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b), fast=fast) == crc32c.crc32c(a + b)


def test_a_file_crc_from_its_block_crcs() -> None:
    data = os.urandom(5 * 65536 + 123)
    block = 65536
    whole = crc32c.crc32c(data[:17])  # a header
    for off in range(17, len(data), block):
        blk = data[off : off + block]
        whole = combine(whole, crc32c.crc32c(blk), len(blk), fast=len(blk) == block)
    assert whole == crc32c.crc32c(data)


def test_combine_of_every_length_path() -> None:
    """Short pieces (zeros hashed), a piece of exactly the zero buffer's length, and one longer
    than it (operators composed per power of two) all combine exactly."""
    a = os.urandom(1000)
    for n in (1, 15321, 1 << 20, (1 << 20) + 5, 3 << 20):
        b = os.urandom(n)
        assert combine(crc32c.crc32c(a), crc32c.crc32c(b), n) == crc32c.crc32c(a + b), n
