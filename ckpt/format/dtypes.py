"""The dtype table: safetensors code <-> torch dtype <-> item size.

An explicit literal table, so every code we persist is one we recognise. The ``rank`` column
is the order the reference safetensors writer uses to lay tensors out in a file (larger rank
first, then by name); following it keeps our headers byte-identical to the reference.

Pure (no I/O).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ckpt.errors import StateError, UnsupportedDtypeError


@dataclass(frozen=True, slots=True)
class DType:
    code: str  # the safetensors dtype string, e.g. "BF16"
    torch_dtype: torch.dtype
    itemsize: int  # bytes per element
    rank: int  # the reference writer's layout order (descending)


_TABLE: tuple[DType, ...] = (
    DType("BOOL", torch.bool, 1, 0),
    DType("U8", torch.uint8, 1, 4),
    DType("I8", torch.int8, 1, 5),
    DType("F8_E5M2", torch.float8_e5m2, 1, 6),
    DType("F8_E4M3", torch.float8_e4m3fn, 1, 7),
    DType("I16", torch.int16, 2, 9),
    DType("U16", torch.uint16, 2, 10),
    DType("F16", torch.float16, 2, 11),
    DType("BF16", torch.bfloat16, 2, 12),
    DType("I32", torch.int32, 4, 13),
    DType("U32", torch.uint32, 4, 14),
    DType("F32", torch.float32, 4, 15),
    DType("C64", torch.complex64, 8, 16),
    DType("F64", torch.float64, 8, 17),
    DType("I64", torch.int64, 8, 18),
    DType("U64", torch.uint64, 8, 19),
)

BY_CODE: dict[str, DType] = {d.code: d for d in _TABLE}
BY_TORCH: dict[torch.dtype, DType] = {d.torch_dtype: d for d in _TABLE}


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
        return BY_TORCH[dtype]
    except KeyError:
        raise StateError(
            f"key {key!r}: dtype {dtype} cannot be stored in safetensors; "
            f"supported: {sorted(str(d) for d in BY_TORCH)}"
        ) from None
