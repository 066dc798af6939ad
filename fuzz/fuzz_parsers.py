#!/usr/bin/env python
"""Coverage-guided fuzzing of ckpt's parsers of untrusted bytes (reliability.md 5.1, item 23).

One entry point, :func:`test_one_input`, feeds a fuzzer's bytes to

- mode 0: the safetensors header parser (``safetensors_format.parse``: the bytes are a whole
  file, so the size checks see the real size);
- mode 1: the manifest parser (``manifest.parse``) as is: most mutants stop at the manifest's
  own crc32c;
- mode 2: the manifest parser after resealing (the manifest's crc32c recomputed), so that
  mutants reach every check after the seal,

where the first byte picks the mode. Only ckpt's typed errors (``CkptError``) may escape; any
other exception, and any warning (they are errors here, as in the test suite), is a crash.

Run (see fuzz/README.md)::

    .venv/bin/python fuzz/fuzz_parsers.py -max_total_time=60
    .venv/bin/python fuzz/fuzz_parsers.py -atheris_runs=100000 -timeout=1 -rss_limit_mb=2048

With no corpus directory named, a scratch copy of fuzz/corpus/ is used (the fuzzer adds the
inputs it finds to its corpus directory: name your own to keep them). libFuzzer's flags apply:
``-timeout=1`` makes any input slower than a second a crash, ``-rss_limit_mb`` caps memory.

Without atheris (it ships wheels for Linux x86-64 only), the same entry point runs under a
plain random mutation loop over the corpus (bit flips, byte edits, insertions, deletions,
splices, interesting integers), honouring ``-atheris_runs``/``-runs`` and ``-max_total_time``;
it writes a ``crash-<sha1>`` file and exits 1 on the first crash.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# Heavy dependencies first, uninstrumented: only ckpt's own code is worth coverage feedback.
import importlib  # noqa: E402
from typing import Any  # noqa: E402

import crc32c  # noqa: E402
import numpy  # noqa: E402, F401
import torch  # noqa: E402, F401

atheris: Any
try:
    atheris = importlib.import_module("atheris")
except ImportError:  # no wheel for this platform: the fallback loop below
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["ckpt"]):
        from ckpt.errors import CkptError
        from ckpt.format import manifest
        from ckpt.format import safetensors as safetensors_format
else:
    from ckpt.errors import CkptError
    from ckpt.format import manifest
    from ckpt.format import safetensors as safetensors_format

WHERE = "fuzz://root/steps/000000000001/manifest.json"
_MARK = b'"manifest_crc32c":"'


def reseal(raw: bytes) -> bytes:
    """``raw`` with its manifest_crc32c recomputed (if it has one where the writer puts it)."""
    at = raw.rfind(_MARK) + len(_MARK)
    if at < len(_MARK) or len(raw) < at + 8:
        return raw
    zeroed = raw[:at] + b"00000000" + raw[at + 8 :]
    return raw[:at] + f"{crc32c.crc32c(zeroed):08x}".encode() + raw[at + 8 :]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            if mode == 0:
                safetensors_format.parse(body, file_size=len(body), where="fuzz.safetensors")
            elif mode == 1:
                manifest.parse(body, where=WHERE)
            else:
                manifest.parse(reseal(body), where=WHERE)
        except CkptError:
            pass


# --- the fallback loop (no atheris) --------------------------------------------------------------

_INTERESTING = [0, 1, 7, 8, 255, 256, 2**31 - 1, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1]
_TOKENS = [b"{", b"}", b"[", b"]", b",", b":", b'"', b"-", b".", b"e", b"\\u", b"\\ud800", b"NaN", b"1e400",
           b"null", b"true", b"9" * 30, b"[" * 200, b"\x00", b"\xff", b"\xc3\xa9", b" "]  # fmt: skip


def _mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        at = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif op == 2:
            out[at:at] = rng.choice(_TOKENS)
        elif op == 3:
            del out[at : at + rng.randint(1, 16)]
        elif op == 4:  # an interesting integer as decimal text
            out[at : at + rng.randint(0, 4)] = str(rng.choice(_INTERESTING) * rng.choice([1, -1])).encode()
        elif op == 5 and len(out) >= 9:  # the safetensors length prefix
            out[1:9] = struct.pack("<Q", rng.choice([*_INTERESTING, len(out) - 9, rng.randrange(len(out))]))
        else:  # splice with another seed
            other = rng.choice(seeds)
            cut = rng.randrange(len(other) + 1)
            out[at:] = other[cut:]
    return bytes(out)


def _fallback(argv: list[str]) -> int:
    runs, max_time, dirs = 1 << 62, float("inf"), []
    for a in argv:
        if a.startswith(("-atheris_runs=", "-runs=")):
            runs = int(a.split("=", 1)[1])
        elif a.startswith("-max_total_time="):
            max_time = float(a.split("=", 1)[1])
        elif not a.startswith("-"):
            dirs.append(Path(a))
    seeds = [p.read_bytes() for d in dirs for p in sorted(d.iterdir()) if p.is_file()] or [b"\x00{}"]
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "0")) or None)
    t0 = time.monotonic()
    n = 0
    while n < runs and time.monotonic() - t0 < max_time:
        data = seeds[n] if n < len(seeds) else _mutate(rng, rng.choice(seeds), seeds)
        try:
            test_one_input(data)
        except BaseException:
            name = f"crash-{hashlib.sha1(data).hexdigest()}"
            Path(name).write_bytes(data)
            traceback.print_exc()
            print(f"fallback: crash after {n} inputs; input written to {name}", file=sys.stderr)
            return 1
        n += 1
    print(f"fallback: ran {n} inputs in {time.monotonic() - t0:.1f} s, no crash (Done)")
    return 0


def main() -> int:
    argv = sys.argv[1:]
    scratch = None
    if not any(not a.startswith("-") for a in argv):  # no corpus named: a scratch copy of ours
        scratch = tempfile.mkdtemp(prefix="ckpt-fuzz-corpus-")
        shutil.copytree(HERE / "corpus", scratch, dirs_exist_ok=True)
        argv.append(scratch)
    try:
        if atheris is None:
            print("atheris is not installed: running the fallback random mutation loop", file=sys.stderr)
            return _fallback(argv)
        atheris.Setup([sys.argv[0], *argv], test_one_input)
        atheris.Fuzz()
        return 0
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
