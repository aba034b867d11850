"""Channel atoms: integer ids for every channel of every parameter dimension, and a union-find.

An *atom map* describes one tensor: a tuple with one entry per dimension, either ``None`` (the
dimension holds no channels: batch, space, a constant) or an int64 array of atom ids, one per
index along that dimension.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["AtomMap", "AtomTable", "UnionFind"]

AtomMap = tuple  # tuple[Optional[np.ndarray], ...], one entry per tensor dimension


class AtomTable:
    """Hands out contiguous blocks of atom ids."""

    def __init__(self) -> None:
        self.count = 0

    def new(self, n: int) -> np.ndarray:
        block = np.arange(self.count, self.count + n, dtype=np.int64)
        self.count += n
        return block


class UnionFind:
    """Array-backed union-find with path halving; ``union_arrays`` unifies elementwise.

    Unions are cheap enough in Python for the largest models we target (YOLOv8x has ~10^5
    channel atoms), and keeping them out of numpy keeps the code obvious.
    """

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # Keep the smaller id as root so results do not depend on union order.
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            if x != y:
                self.union(x, y)

    def roots(self) -> np.ndarray:
        """The root of every atom, as one array."""
        return np.fromiter((self.find(i) for i in range(len(self.parent))), dtype=np.int64,
                           count=len(self.parent))


def same_length(*arrays: Optional[np.ndarray]) -> bool:
    lengths = {len(a) for a in arrays if a is not None}
    return len(lengths) <= 1
