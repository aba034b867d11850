"""Cost model: FLOPs and parameter count as a function of the units removed, without re-tracing.

Every conv/linear/matmul call in the graph contributes ``2 * MACs`` at full width, and every
parameter its element count. Both scale with the kept fraction of each channel dim they touch:

    cost(plan) = sum_terms full_cost * prod_{(param, dim) in term} kept(param, dim) / size

(conv: ``out_numel * C_in/g * k``, so the weight's dims 0 and 1 are exactly the widths it
depends on, depthwise and grouped included). FLOPs follow ``torch.utils.flop_counter``'s
convention (2 per multiply-accumulate; norms and elementwise ops are not counted), so the model
can be cross-checked against ``FlopCounterMode``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import ChannelGraph

__all__ = ["CostModel", "cost_model"]

_COUNTED = ("conv", "conv_transpose", "linear", "matmul")


@dataclass
class CostModel:
    """Costs of one ``ChannelGraph``; ``kept`` holds the current width of every channel dim."""

    keys: list[tuple]
    sizes: np.ndarray
    index: dict[tuple, np.ndarray]  # key -> unit id of each of its channels (-1: fixed)
    flops_terms: list[tuple[float, tuple[int, ...]]]
    param_terms: list[tuple[float, tuple[int, ...]]]

    def full(self) -> tuple[float, float]:
        """(FLOPs, params) of the unpruned model."""
        return self.evaluate(self.sizes)

    def __post_init__(self) -> None:
        self._flops = _pack(self.flops_terms, len(self.keys))
        self._params = _pack(self.param_terms, len(self.keys))

    def evaluate(self, kept: np.ndarray) -> tuple[float, float]:
        """(FLOPs, params) when channel dim ``i`` keeps ``kept[i]`` of ``sizes[i]``."""
        frac = np.append(kept / np.maximum(self.sizes, 1), 1.0)  # last slot: "no dim"
        (fc, fk), (pc, pk) = self._flops, self._params
        return float(fc @ frac[fk].prod(axis=1)), float(pc @ frac[pk].prod(axis=1))

    def kept_after(self, graph: ChannelGraph, removed: set[int] | frozenset[int]) -> np.ndarray:
        removed_arr = np.fromiter(removed, dtype=np.int64, count=len(removed))
        return np.array([int((~np.isin(self.index[k], removed_arr)).sum())
                         for k in self.keys], dtype=np.float64)


def _pack(terms: list, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """Costs and a key-index matrix padded with ``n_keys`` (the slot whose fraction is 1)."""
    width = max([len(k) for _, k in terms] + [1])
    keys = np.full((len(terms), width), n_keys, dtype=np.int64)
    for i, (_, k) in enumerate(terms):
        keys[i, :len(k)] = k
    return np.array([c for c, _ in terms], dtype=np.float64), keys


def cost_model(graph: ChannelGraph) -> CostModel:
    """Build the cost terms of ``graph`` (see the module docstring)."""
    arrays: dict[tuple, np.ndarray] = dict(graph.unit_index)
    for i, unit_arrays in graph.layer_units.items():  # weightless layers: pseudo-keys
        for j, ids in enumerate(unit_arrays):
            arrays[(f"@layer{i}", j)] = ids
    for i, (_, parts) in enumerate(graph.splits):  # no cost of their own: each part of a
        for j, ids in enumerate(parts):            # split by Python sizes keeps its floor
            arrays[(f"@split{i}", j)] = ids
    keys = sorted(arrays)
    index = {k: i for i, k in enumerate(keys)}
    sizes = np.array([len(arrays[k]) for k in keys], dtype=np.float64)

    def dims_of(param: str) -> tuple[int, ...]:
        return tuple(index[(param, d)] for d in range(len(graph.param_shapes[param]))
                     if (param, d) in index)

    flops = []
    for i, layer in enumerate(graph.layers):
        if layer.kind not in _COUNTED:
            continue
        dims = dims_of(layer.weight) if layer.weight in graph.param_shapes else ()
        if i in graph.layer_units:
            dims = tuple(index[(f"@layer{i}", j)] for j in range(len(graph.layer_units[i])))
        flops.append((2.0 * layer.macs, dims))
    params = [(float(np.prod(shape)), dims_of(name)) for name, shape in graph.param_shapes.items()
              if name not in graph.buffers]
    return CostModel(keys, sizes, arrays, flops, params)
