"""The dtype table: safetensors code <-> torch dtype <-> item size.

An explicit literal table, so every code we persist is one we recognise. The ``rank`` column
is the order the reference safetensors writer uses to lay tensors out in a file (larger rank
first, then by name); following it keeps our headers byte-identical to the reference.

Pure (no I/O), and torch-free until a torch dtype is asked for: reading and checking manifests
and safetensors headers (the ``ckpt`` command line) needs only codes and sizes, so torch is
imported by :attr:`DType.torch_dtype` and :data:`BY_TORCH` on first use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckpt.errors import StateError, UnsupportedDtypeError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class DType:
    code: str  # the safetensors dtype string, e.g. "BF16"
    torch_name: str  # the torch dtype's attribute name, e.g. "bfloat16"
    itemsize: int  # bytes per element
    rank: int  # the reference writer's layout order (descending)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype (imports torch)."""
        return _torch_dtypes()[self.code]


_TABLE: tuple[DType, ...] = (
    DType("BOOL", "bool", 1, 0),
    DType("U8", "uint8", 1, 4),
    DType("I8", "int8", 1, 5),
    DType("F8_E5M2", "float8_e5m2", 1, 6),
    DType("F8_E4M3", "float8_e4m3fn", 1, 7),
    DType("I16", "int16", 2, 9),
    DType("U16", "uint16", 2, 10),
    DType("F16", "float16", 2, 11),
    DType("BF16", "bfloat16", 2, 12),
    DType("I32", "int32", 4, 13),
    DType("U32", "uint32", 4, 14),
    DType("F32", "float32", 4, 15),
    DType("C64", "complex64", 8, 16),
    DType("F64", "float64", 8, 17),
    DType("I64", "int64", 8, 18),
    DType("U64", "uint64", 8, 19),
)

BY_CODE: dict[str, DType] = {d.code: d for d in _TABLE}

if TYPE_CHECKING:
    BY_TORCH: dict[torch.dtype, DType]  # torch dtype -> entry; built on first use (__getattr__)


@functools.cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {d.code: getattr(torch, d.torch_name) for d in _TABLE}


@functools.cache
def _by_torch() -> dict[torch.dtype, DType]:
    return {_torch_dtypes()[d.code]: d for d in _TABLE}


def __getattr__(name: str) -> object:
    """``BY_TORCH`` on first use (it imports torch)."""
    if name == "BY_TORCH":
        return _by_torch()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def from_code(code: object, *, where: str) -> DType:
    """Look up a dtype code read from storage; unknown codes are a typed error."""
    if not isinstance(code, str) or code not in BY_CODE:
        raise UnsupportedDtypeError(
            f"{where}: unknown dtype {code!r}; expected one of {sorted(BY_CODE)}"
        )
    return BY_CODE[code]


def from_torch(dtype: torch.dtype, *, key: str) -> DType:
    """Look up the entry for a tensor's dtype; dtypes safetensors cannot hold are refused."""
    try:
        return _by_torch()[dtype]
    except KeyError:
        raise StateError(
            f"key {key!r}: dtype {dtype} cannot be stored in safetensors; "
            f"supported: {sorted(str(d) for d in _by_torch())}"
        ) from None
