"""A process's random number generator states as a state ckpt stores (no pickle): Python's
``random``, NumPy's global generator, torch's CPU generator and, where CUDA is available, every
CUDA device's. What the framework integrations save per process and put back on resume."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture() -> dict[str, Any]:
    out: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def apply(rng: dict[str, Any]) -> None:
    """Put back what :func:`capture` took (as ckpt restores it: tuples may come back as lists)."""
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(rng["numpy"]))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
