"""The cyclic garbage collector, paused over phases that make many small containers.

Decoding a manifest and planning a restore make tens of thousands of lists and dicts; each
collection that triggers walks every live object of the process, a training state's tensors and
dicts included. On a 20k-tensor state, a restore of 10 keys took 40-60 ms with the collector off
and 200-300 ms with it on. What these phases make holds no reference cycles, so pausing leaves
nothing for the collector to find later; it is turned back on (if it was on) when they end.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused(pause: bool = True) -> Iterator[None]:
    """The collector off for the ``with`` block (a no-op if ``pause`` is false or it is off)."""
    if not pause or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
