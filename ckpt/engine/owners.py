"""Who writes what: regions of tensors, the ranks holding copies of them, and the deterministic,
byte-balanced choice of one writer per region.

Every rank runs :func:`assign` over what it knows and gets the same answer for every region it
holds, with no planning collective:

- *globally known* regions (DTensor placements, plain tensors every rank holds) are balanced by
  bytes with a greedy largest-first assignment over shared loads;
- *locally known* replicated regions (``ckpt.Shard`` with ``replica_ranks``) are assigned from
  the region alone (their holders may not agree on anything else);
- large replicated regions are cut along dim 0 into one piece per holder, so a single huge
  replicated tensor is still written by all of its holders in parallel.

The commit checks that every region was written exactly once, so a wrong assumption about who
holds what fails loudly instead of losing a tensor.

Pure (no I/O).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import crc32c


@dataclass(frozen=True, slots=True)
class Region:
    """``key``'s box ``offsets``/``sizes`` (in the global index space), held identically by
    ``holders`` (sorted ranks). ``known_to_all``: every rank enumerates this region too."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    itemsize: int
    holders: tuple[int, ...]
    known_to_all: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.sizes) * self.itemsize


@dataclass(frozen=True, slots=True)
class Piece:
    """One region (or a dim-0 slab of one) and the rank that writes it."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    owner: int


def assign(regions: Iterable[Region], *, split_bytes: int) -> list[Piece]:
    """Choose one writer for every region (pieces of large replicated ones). Pure (no I/O)."""
    pieces: list[Piece] = []
    loads: dict[int, int] = {}
    shared: list[Region] = []
    for r in sorted(regions, key=lambda r: (r.key, r.offsets)):
        if len(r.holders) == 1:
            pieces.append(Piece(r.key, r.offsets, r.sizes, r.holders[0]))
            if r.known_to_all:
                loads[r.holders[0]] = loads.get(r.holders[0], 0) + r.nbytes
        elif r.nbytes >= split_bytes and r.sizes and r.sizes[0] >= 2:
            for owner, (offs, sizes) in zip(r.holders, _slabs(r, len(r.holders)), strict=False):
                pieces.append(Piece(r.key, offs, sizes, owner))
                if r.known_to_all:
                    loads[owner] = loads.get(owner, 0) + math.prod(sizes) * r.itemsize
        elif r.known_to_all:
            shared.append(r)
        else:
            pick = crc32c.crc32c(f"{r.key}|{list(r.offsets)}".encode()) % len(r.holders)
            pieces.append(Piece(r.key, r.offsets, r.sizes, r.holders[pick]))
    # Largest first onto the least-loaded holder (ties: lowest rank): identical on every rank.
    for r in sorted(shared, key=lambda r: (-r.nbytes, r.key, r.offsets)):
        owner = min(r.holders, key=lambda h: (loads.get(h, 0), h))
        loads[owner] = loads.get(owner, 0) + r.nbytes
        pieces.append(Piece(r.key, r.offsets, r.sizes, owner))
    return pieces


def _slabs(r: Region, n: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Cut ``r`` along dim 0 into at most ``n`` nearly equal, non-empty slabs."""
    rows = r.sizes[0]
    n = min(n, rows)
    out = []
    start = 0
    for i in range(n):
        count = rows // n + (1 if i < rows % n else 0)
        out.append(((r.offsets[0] + start, *r.offsets[1:]), (count, *r.sizes[1:])))
        start += count
    return out


def chunk(size: int, parts: int, index: int) -> tuple[int, int]:
    """``(offset, length)`` of chunk ``index`` when ``size`` is split into ``parts`` the way
    ``torch.chunk`` and DTensor ``Shard`` do: chunks of ``ceil(size / parts)``, the last ones
    shorter or empty."""
    full = -(-size // parts) if parts else 0
    start = min(full * index, size)
    return start, max(0, min(full, size - start))


def mesh_regions(
    global_shape: Sequence[int], mesh_ranks: Sequence[Sequence[int]] | Sequence[int], shard_dims: Sequence[int | None]
) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Every distinct region of a tensor laid out on a device mesh, with the ranks holding it.

    Args:
        global_shape: the tensor's global shape.
        mesh_ranks: the mesh as nested lists of global ranks (any number of mesh dims).
        shard_dims: per mesh dim, the tensor dim it shards (``Shard(d)``), or None (``Replicate``).
            Several mesh dims sharding one tensor dim split it in mesh-dim order, as DTensor does.

    Returns:
        ``(offsets, sizes, holders)`` for each distinct region, holders sorted.
    """
    coords = _coordinates(mesh_ranks)
    mesh_shape = _shape(mesh_ranks)
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for coord, rank in coords:
        offs = [0] * len(global_shape)
        sizes = list(global_shape)
        for mdim, tdim in enumerate(shard_dims):
            if tdim is None:
                continue
            o, n = chunk(sizes[tdim], mesh_shape[mdim], coord[mdim])
            offs[tdim] += o
            sizes[tdim] = n
        groups.setdefault((tuple(offs), tuple(sizes)), []).append(rank)
    return [(o, s, tuple(sorted(h))) for (o, s), h in sorted(groups.items())]


def _shape(mesh: object) -> list[int]:
    shape = []
    while isinstance(mesh, list | tuple):
        shape.append(len(mesh))
        mesh = mesh[0] if mesh else None
    return shape


def _coordinates(mesh: object, prefix: tuple[int, ...] = ()) -> list[tuple[tuple[int, ...], int]]:
    if isinstance(mesh, list | tuple):
        out = []
        for i, sub in enumerate(mesh):
            out.extend(_coordinates(sub, (*prefix, i)))
        return out
    return [(prefix, int(mesh))]  # type: ignore[call-overload]
