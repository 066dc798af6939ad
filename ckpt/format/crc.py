"""CRC-32C arithmetic the ``crc32c`` package does not offer: combining the CRCs of two pieces
into the CRC of their concatenation, so that a file's CRC comes from its blocks' CRCs without a
second pass over the bytes.

``crc(A + B) == combine(crc(A), crc(B), len(B))`` (the zlib ``crc32_combine`` construction:
appending ``n`` bytes is a linear map over GF(2) applied to ``crc(A)``). Appending a fixed
length (the checksum block) is precomputed as four byte-indexed tables, so each combine is four
lookups; other lengths up to 1 MiB hash ``n`` zero bytes (the shift is affine: see
:func:`combine`), longer ones compose operators for the powers of two in ``n``. Pure.
"""

from __future__ import annotations

import functools

import crc32c

_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected
_ZEROS = memoryview(bytes(1 << 20))  # combine() of up to 1 MiB hashes zeros (C speed, no table)


def _times(mat: tuple[int, ...], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _compose(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The operator that applies ``b`` then ``a``."""
    return tuple(_times(a, b[i]) for i in range(32))


@functools.cache
def _zero_bytes_op(log2_bytes: int) -> tuple[int, ...]:
    """The operator that appends ``2**log2_bytes`` zero bytes to a CRC register."""
    if log2_bytes == 0:
        one_bit = (_POLY, *(1 << (i - 1) for i in range(1, 32)))
        op = one_bit
        for _ in range(3):  # 8 bits
            op = _compose(op, op)
        return op
    half = _zero_bytes_op(log2_bytes - 1)
    return _compose(half, half)


@functools.cache
def _shift_tables(nbytes: int) -> tuple[tuple[int, ...], ...]:
    """Four 256-entry tables of the operator appending ``nbytes`` zero bytes, by input byte."""
    op = _operator(nbytes)
    return tuple(tuple(_times(op, v << (8 * k)) for v in range(256)) for k in range(4))


def _operator(nbytes: int) -> tuple[int, ...]:
    op: tuple[int, ...] = tuple(1 << i for i in range(32))  # identity
    k = 0
    while nbytes:
        if nbytes & 1:
            op = _compose(_zero_bytes_op(k), op)
        nbytes >>= 1
        k += 1
    return op


def combine(crc_a: int, crc_b: int, len_b: int, *, fast: bool = False) -> int:
    """The CRC-32C of ``A + B`` from ``crc(A)``, ``crc(B)`` and ``len(B)``. ``fast`` caches
    lookup tables for ``len_b`` (worth it for a length used many times, like a block size)."""
    if len_b == 0:
        return crc_a
    if fast:
        t = _shift_tables(len_b)
        shifted = t[0][crc_a & 0xFF] ^ t[1][(crc_a >> 8) & 0xFF] ^ t[2][(crc_a >> 16) & 0xFF] ^ t[3][crc_a >> 24]
    elif len_b <= len(_ZEROS):
        # Appending n zero bytes is affine in the register: f(c) = L(c) ^ f(0), so L(crc_a) is
        # f(crc_a) ^ f(0), two C-speed (hardware) CRCs of zeros; no Python loop per bit.
        zeros = _ZEROS[:len_b]
        shifted = crc32c.crc32c(zeros, value=crc_a) ^ crc32c.crc32c(zeros)
    else:
        shifted = crc_a
        k = 0
        n = len_b
        while n:
            if n & 1:
                shifted = _times(_zero_bytes_op(k), shifted)
            n >>= 1
            k += 1
    return shifted ^ crc_b
