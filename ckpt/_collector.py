"""The cyclic garbage collector, paused over work that makes many small containers.

Decoding a manifest and restoring from it make tens of thousands of lists and dicts; each
collection that triggers walks every live object of the process, a training state's tensors and
dicts included. On a 20k-tensor state, a restore of 10 keys took 40-60 ms with the collector off
and 200-300 ms with it on. A restore keeps it paused from the manifest read to the result
(``lifecycle.restore``), and drops the manifest before it turns it back on: what it made and
freed in between (none of it in reference cycles) then adds nothing to the count that triggers
the next collection; pausing only the parse would merely move that collection to the reads.
Large JSON documents decode paused too (``format.strictjson``). It is turned back on only if it
was on.
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
