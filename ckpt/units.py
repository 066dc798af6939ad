"""Byte sizes, read and written with one meaning everywhere in ckpt.

Reading (:func:`parse_size`, used by every size option of the command line and by
``export_hf(max_shard_bytes=...)``), case-insensitive:

- a bare number is bytes: ``1000``, ``1000B``;
- decimal SI units are powers of 1000: ``K``/``KB`` = 10**3, ``M``/``MB`` = 10**6,
  ``G``/``GB`` = 10**9, ``T``/``TB`` = 10**12, ``P``/``PB`` = 10**15;
- binary units are powers of 1024: ``KiB`` = 2**10, ``MiB`` = 2**20, ``GiB`` = 2**30,
  ``TiB`` = 2**40, ``PiB`` = 2**50 (``Ki``, ``Mi``, ... without the ``B`` too);
- the number may have a fractional part (``1.5GiB``); the result is rounded down to whole
  bytes and must be at least 1.

Writing (:func:`human_size`, used for every size the command line prints) uses binary units
with one decimal: ``512 B``, ``4.0 KiB``, ``1.2 GiB``.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["human_size", "parse_size"]

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*", re.IGNORECASE)

_UNITS: dict[str, int] = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgtp", start=1):
    _UNITS[_letter] = _UNITS[_letter + "b"] = 1000**_power
    _UNITS[_letter + "i"] = _UNITS[_letter + "ib"] = 1024**_power


def parse_size(text: str | int) -> int:
    """A positive number of bytes from ``text``: ``5GB`` = 5*10**9, ``5GiB`` = 5*2**30,
    ``16M`` = 16*10**6, ``1.5GiB``, ``4096`` (bytes). An int is taken as bytes.

    Raises ValueError, naming ``text``, for anything else or for less than 1 byte."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"not a size: {text!r}; expected e.g. 5GB, 512MiB or a number of bytes")
    if isinstance(text, int):
        n = text
    else:
        match = _SIZE.fullmatch(text)
        scale = _UNITS.get(match.group(2).lower()) if match else None
        if match is None or scale is None:
            raise ValueError(
                f"not a size: {text!r}; expected e.g. 5GB (5*10**9 bytes), 512MiB (512*2**20 "
                "bytes) or a number of bytes"
            )
        n = int(Fraction(match.group(1)) * scale)  # exact: no float rounding, then floor
    if n < 1:
        raise ValueError(f"a size must be at least 1 byte, not {text!r}")
    return n


def human_size(n: int) -> str:
    """Bytes in binary units: ``512 B``, ``4.0 KiB``, ``1.2 GiB``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"
