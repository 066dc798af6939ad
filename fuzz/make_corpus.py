#!/usr/bin/env python
"""Write the seed corpus of fuzz_parsers.py into fuzz/corpus/ from real saves.

Each seed is one mode byte (0: a safetensors file, 1: a manifest, 2: a manifest to reseal)
followed by the bytes of a file written by ``ckpt.save`` (a one-writer save of a small mixed
state and a three-writer sharded save), plus a minimal header. Files are named by their sha1, as
libFuzzer names corpus entries. Run from the repository root::

    .venv/bin/python fuzz/make_corpus.py
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fsspec  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import ckpt  # noqa: E402


def main() -> None:
    out = HERE / "corpus"
    out.mkdir(exist_ok=True)
    for p in out.iterdir():
        p.unlink()
    root = "memory://ckpt-fuzz-corpus"
    state = {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "h": torch.ones(3, dtype=torch.bfloat16),
        "f8": torch.zeros(2, dtype=torch.float8_e4m3fn),
        "b": torch.tensor(True),
        "e": torch.zeros(0, 2),
        "n": np.arange(3, dtype=np.int16),
        "obj": {"lr": 0.1, "big": 2**70, "nan": float("nan"), "t": (1, "x"), 7: b"\x00"},
    }
    ckpt.save(f"{root}/one", state, step=1, options=ckpt.SaveOptions(block_bytes=8))
    a = ckpt.begin(f"{root}/multi", step=1, world_size=2, options=ckpt.SaveOptions(block_bytes=16))
    full = torch.arange(24, dtype=torch.int32).reshape(4, 6)
    reports = [ckpt.write_shards(a, {"x": ckpt.Shard(full[:, 3 * r : 3 * r + 3].clone(), (4, 6), (0, 3 * r))}, rank=r) for r in range(2)]
    ckpt.commit(a, reports)
    fs = fsspec.filesystem("memory")
    seeds = [b"\x00" + b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "]
    for p in sorted(fs.find("/ckpt-fuzz-corpus")):
        data = bytes(fs.cat_file(p))
        if p.endswith(".safetensors"):
            seeds.append(b"\x00" + data)
        elif p.endswith("manifest.json"):
            seeds += [b"\x01" + data, b"\x02" + data]
    for s in seeds:
        (out / hashlib.sha1(s).hexdigest()).write_bytes(s)
    fs.rm("/ckpt-fuzz-corpus", recursive=True)
    print(f"wrote {len(seeds)} seeds ({sum(map(len, seeds))} bytes) to {out}")


if __name__ == "__main__":
    main()
