"""Work split across processes: each rank takes a strided share of n items, and the main process puts
the shares back in item order.

Strided (rank r takes items r, r + W, r + 2W, ...) so the shares differ in size by at most one item
and each item's place in the whole (its seed, its position in the output) does not depend on W.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def shard(n: int, rank: int, world: int) -> list[int]:
    """Indices of the items of ``n`` that process ``rank`` of ``world`` handles."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    return list(range(rank, n, world))


def unshard(parts: Sequence[Sequence[T]]) -> list[T]:
    """The items in their original order from every rank's share (``parts[r]`` is rank r's, as
    ``shard`` dealt them)."""
    world, sizes = len(parts), [len(p) for p in parts]
    n = sum(sizes)
    if sizes != [len(shard(n, r, world)) for r in range(world)]:
        raise ValueError(f"share sizes {sizes} are not a strided split of {n} items over {world} ranks")
    out: list[Any] = [None] * n
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def gather_in_order(backend: Any, mine: Sequence[T]) -> list[T] | None:
    """Every rank's share (``mine`` here) merged in item order on the main process, None elsewhere.
    Collective: every rank calls it."""
    parts = backend.gather_object(list(mine))
    return None if parts is None else unshard(parts)
