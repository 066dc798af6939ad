"""Run in a forked child (tests/support/forker.py) by tests/storage/test_s3_fault_points.py: one
save through the fault proxy, SIGKILLed by the test while a request of it hangs there."""

from __future__ import annotations

import json


def save(root: str, opts_json: str, seed: int) -> None:
    import ckpt
    from ckpt.storage import _s3 as storage_mod
    from tests.storage.test_s3_fault_points import PART, SAVE, state

    storage_mod.S3_SINGLE_PUT_MAX_BYTES = PART  # the 12 MiB file goes up in three parts
    ckpt.save(root, state(seed), step=2, options=SAVE, storage_options=json.loads(opts_json))
