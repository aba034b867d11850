"""Channel atoms: integer ids for every channel of every parameter dimension, and a union-find.

An *atom map* describes one tensor: a tuple with one entry per dimension, either ``None`` (the
dimension holds no channels: batch, space, a constant) or an int64 array of atom ids, one per
index along that dimension.
"""

from __future__ import annotations

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
    """Union-find over ``n`` integer ids.

    Unions are recorded as array pairs and resolved all at once by :meth:`roots`, with
    vectorised hooking and pointer jumping (Shiloach-Vishkin style): each round hooks the larger
    root of every unresolved pair under the smaller one, then compresses every path. A handful
    of numpy rounds replace ~10^5 Python-level unions on the largest models.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._left: list[np.ndarray] = []
        self._right: list[np.ndarray] = []

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Record that ``a[i]`` and ``b[i]`` are in one set, for every ``i``."""
        if len(a) != len(b):
            raise ValueError(f"cannot unify {len(a)} ids with {len(b)}")
        self._left.append(np.asarray(a, dtype=np.int64))
        self._right.append(np.asarray(b, dtype=np.int64))

    def roots(self) -> np.ndarray:
        """The root (the smallest id of its set) of every id, as one array."""
        parent = np.arange(self.n, dtype=np.int64)
        if not self._left:
            return parent
        a, b = np.concatenate(self._left), np.concatenate(self._right)
        while True:
            pa, pb = parent[a], parent[b]
            pending = pa != pb
            if not pending.any():
                return parent
            a, b, pa, pb = a[pending], b[pending], pa[pending], pb[pending]
            np.minimum.at(parent, np.maximum(pa, pb), np.minimum(pa, pb))
            while True:  # pointer jumping until every id points at its root
                grand = parent[parent]
                if np.array_equal(grand, parent):
                    break
                parent = grand

