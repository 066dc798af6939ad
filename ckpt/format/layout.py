"""The root's layout (docs/FORMAT.md section 2): the one module that knows how every path under a
checkpoint root is named, and how to read a name back. Pure (no I/O).

    steps/<step:012d>/manifest.json                   the commit record
    data/<step:012d>-<attempt>/<writer:05d>-<k>.safetensors
                                                      immutable shard files of one save attempt
    LATEST                                            a hint only ({"step": N})
    .<name>.<32 hex>.tmp                              a temp file of a create-only or atomic write,
                                                      beside its final name
    _ckpt_probe/<32 hex>                              the S3 conditional-write probe's key
"""

from __future__ import annotations

import re

STEPS = "steps"
DATA = "data"
LATEST = "LATEST"
MANIFEST = "manifest.json"

_MANIFEST = re.compile(r"steps/([0-9]{12})/manifest\.json")
_SHARD = re.compile(r"(data/[0-9]{12}-[0-9A-Za-z]+)/[0-9]{5}-[0-9]+\.safetensors")
_WRITER = re.compile(r"(?:^|/)data/[^/]+/([0-9]{5,})-[0-9]+\.safetensors$")
_TEMP = re.compile(r"(?:(?:steps/[0-9]{12}|data/[0-9]{12}-[0-9A-Za-z]+)/)?\.[^/]+\.[0-9a-f]{32}\.tmp")


def step_dir(step: int) -> str:
    return f"{STEPS}/{step:012d}"


def manifest_path(step: int) -> str:
    return f"{step_dir(step)}/{MANIFEST}"


def data_dir(step: int, attempt: str) -> str:
    return f"{DATA}/{step:012d}-{attempt}"


def shard_path(step: int, attempt: str, writer: int, k: int) -> str:
    return f"{data_dir(step, attempt)}/{writer:05d}-{k}.safetensors"


def temp_name(name: str, token: str) -> str:
    """The temp file beside ``name`` (a base name) of a write that links or renames it into place;
    ``token`` is 32 lowercase hex digits (a uuid4)."""
    return f".{name}.{token}.tmp"


def step_of_manifest(rel: str) -> int | None:
    """The step of a manifest path; None for any other path."""
    m = _MANIFEST.fullmatch(rel)
    return int(m.group(1)) if m else None


def attempt_dir_of(rel: str) -> str | None:
    """The attempt directory of a shard file ckpt writes; None for any other path."""
    m = _SHARD.fullmatch(rel)
    return m.group(1) if m else None


def writer_of(path: str) -> int | None:
    """The writer (rank) of a shard file, from its path relative to the root or whole (a URL);
    None for any other path."""
    m = _WRITER.search(path)
    return int(m.group(1)) if m else None


def is_temp(rel: str) -> bool:
    """A temp file of ckpt's create-only or atomic writes, where ckpt puts them."""
    return _TEMP.fullmatch(rel) is not None
