"""What every criterion shares: the data it may read, and a sum over a unit's slices."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from depgraph.graph import ChannelGraph

__all__ = ["ScoreData", "Criterion", "unit_sums", "producer_dims", "norm_dims"]

# (model, batch) -> scalar loss; the batch is one item of ``data`` as the user gave it.
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class ScoreData:
    """Calibration data for data-driven criteria: ``data`` batches and a ``loss_fn``."""

    data: Optional[Iterable[Any]] = None
    loss_fn: Optional[LossFn] = None


@dataclass(frozen=True)
class Criterion:
    """A named criterion; ``needs_data`` ones read ``ScoreData`` and fail without it."""

    name: str
    fn: Callable[[nn.Module, ChannelGraph, ScoreData], np.ndarray]
    needs_data: bool = False

    def __call__(self, model: nn.Module, graph: ChannelGraph, data: ScoreData) -> np.ndarray:
        return self.fn(model, graph, data)


def unit_sums(model: nn.Module, graph: ChannelGraph,
              per_index: Callable[[str, int, torch.Tensor], torch.Tensor],
              keys: Optional[Iterable[tuple[str, int]]] = None) -> np.ndarray:
    """``sum over the unit's slices of per_index(param, dim, tensor)[index]`` for every unit.

    ``per_index`` reduces a parameter to one value per index along ``dim``. Buffers (running
    statistics) are skipped: they describe data, not the learned channel. ``keys`` limits the
    sum to some ``(param, dim)`` pairs (default: every slice the graph knows). A parameter's
    dims are visited one after the other, so ``per_index`` can reuse work between them.
    """
    total = np.zeros(len(graph.units), dtype=np.float64)
    by_param: dict[str, list[tuple[str, int]]] = {}  # a parameter's dims one after the other
    for key in (graph.unit_index if keys is None else keys):
        by_param.setdefault(key[0], []).append(key)
    for key in (k for ks in by_param.values() for k in ks):
        param, dim = key
        ids = graph.unit_index.get(key)
        if ids is None or param in graph.buffers:
            continue
        mask = ids >= 0
        if not mask.any():
            continue
        t = model.get_parameter(param)
        values = per_index(param, dim, t).detach().double().cpu().numpy()
        np.add.at(total, ids[mask], values[mask])
    return total


def reduce_except(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over every dim but ``dim``."""
    other = [d for d in range(t.dim()) if d != dim]
    return t.sum(dim=other) if other else t


def producer_dims(graph: ChannelGraph) -> list[tuple[str, int]]:
    """``(weight, out_dim)`` of every conv/linear: the filters each unit writes."""
    seen: dict[tuple[str, int], None] = {}
    for layer in graph.layers:
        if layer.kind in ("conv", "conv_transpose", "linear") and layer.weight is not None \
                and layer.out_dim is not None:
            seen.setdefault((layer.weight, layer.out_dim), None)
    return list(seen)


def norm_dims(graph: ChannelGraph) -> list[tuple[str, int]]:
    """``(scale, 0)`` of every normalisation layer with a learned scale (BN/GN/LN gamma)."""
    seen: dict[tuple[str, int], None] = {}
    for layer in graph.layers:
        if layer.kind in ("batch_norm", "group_norm", "layer_norm") and layer.weight is not None:
            seen.setdefault((layer.weight, 0), None)
    return list(seen)


def fill_missing_groups(graph: ChannelGraph, scores: np.ndarray,
                        fallback: Callable[[], np.ndarray]) -> np.ndarray:
    """Groups in which no unit got a score (no norm layer, no filter) take ``fallback()``,
    which is computed only if some group needs it."""
    out, computed = scores.copy(), None
    for group in graph.groups:
        members = np.asarray(group.units, dtype=np.int64)
        if len(members) and not np.any(scores[members] > 0):
            computed = fallback() if computed is None else computed
            out[members] = computed[members]
    return out
