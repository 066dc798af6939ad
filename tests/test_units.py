"""ckpt.units: one meaning for sizes everywhere (decimal SI units, binary IEC units, bytes)."""

from __future__ import annotations

import pytest

from ckpt.units import human_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5_000_000_000),
        ("5GiB", 5 * 2**30),
        ("5G", 5_000_000_000),
        ("5gb", 5_000_000_000),
        ("5gib", 5 * 2**30),
        ("5Gi", 5 * 2**30),
        ("1000", 1000),
        ("1000B", 1000),
        ("1", 1),
        ("64K", 64_000),
        ("64KB", 64_000),
        ("64KiB", 64 * 1024),
        ("16M", 16_000_000),
        ("16MB", 16_000_000),
        ("16MiB", 16 * 2**20),
        ("2TB", 2 * 10**12),
        ("2TiB", 2 * 2**40),
        ("1PB", 10**15),
        ("1PiB", 2**50),
        ("1.5GiB", 3 * 2**29),
        ("1.5GB", 1_500_000_000),
        ("0.29KB", 290),  # exact: 0.29 * 1000 in floats is 289.99999999999994
        (".5K", 500),
        ("2.KB", 2000),
        ("1.0000001", 1),  # rounded down to whole bytes
        (" 5 GB ", 5_000_000_000),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "lots", "GB", "-1", "+5", "5XB", "5 G B", "5GiBs", "1e3", "5KiKiB", "1,000", "5 bytes"],
)
def test_parse_size_rejects_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match="not a size") as info:
        parse_size(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["0", "0B", "0.5", "0GiB", 0, -5])
def test_parse_size_rejects_less_than_one_byte(text: str | int) -> None:
    with pytest.raises(ValueError, match="at least 1 byte") as info:
        parse_size(text)
    assert repr(text) in str(info.value)


def test_parse_size_rejects_other_types() -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(True)
    with pytest.raises(ValueError, match="not a size"):
        parse_size(1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (2**20, "1.0 MiB"),
        (int(1.2 * 2**30), "1.2 GiB"),
        (5 * 2**40, "5.0 TiB"),
        (2**50, "1.0 PiB"),
        (5 * 2**60, "5120.0 PiB"),
    ],
)
def test_human_size(n: int, expected: str) -> None:
    assert human_size(n) == expected


@pytest.mark.parametrize("n", [1, 1023, 1024, 1536, 2**20, 3 * 2**29, 5 * 2**40])
def test_human_size_reads_back_within_its_rounding(n: int) -> None:
    shown = human_size(n).replace(" ", "")
    assert abs(parse_size(shown) - n) <= n * 0.05
