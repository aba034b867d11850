"""Weight-only criteria: L1/L2 magnitude, BN scale (network slimming), FPGM, random."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from depgraph.graph import ChannelGraph

from .base import (Criterion, ScoreData, fill_missing_groups, norm_dims, producer_dims,
                   reduce_except, unit_sums)

__all__ = ["magnitude", "bn_scale", "fpgm", "random_scores"]


def magnitude(p: int) -> Criterion:
    """``(sum over every slice of the unit of |w|^p) ** (1/p)``: large anywhere counts."""

    def score(model: nn.Module, graph: ChannelGraph, data: ScoreData) -> np.ndarray:
        powered: dict[str, torch.Tensor] = {}  # |w|^p of the parameter whose dims run now

        def per_index(param: str, dim: int, t: torch.Tensor) -> torch.Tensor:
            if param not in powered:  # once per parameter, in float32 at least (torch's
                # sums are pairwise): in float64, a 600M-parameter model took seconds
                powered.clear()
                w = t.detach()
                w = w.float() if w.element_size() < 4 else w
                powered[param] = w.square() if p == 2 else w.abs() if p == 1 else w.abs() ** p
            return reduce_except(powered[param], dim)

        with torch.no_grad():
            total = unit_sums(model, graph, per_index)
        return total ** (1.0 / p)

    return Criterion(f"l{p}", score)


def _bn_scale(model: nn.Module, graph: ChannelGraph, data: ScoreData) -> np.ndarray:
    # sum of |gamma| over the unit's normalisation layers (Liu et al. 2017, network slimming);
    # a group with no norm layer falls back to L2 magnitude
    with torch.no_grad():
        scores = unit_sums(model, graph, lambda _, dim, t: t.detach().abs(), norm_dims(graph))
    return fill_missing_groups(graph, scores, lambda: magnitude(2)(model, graph, data))


def _fpgm(model: nn.Module, graph: ChannelGraph, data: ScoreData) -> np.ndarray:
    # FPGM (He et al. 2019): a filter close to the geometric median of its layer is replaceable
    # by the others. Score = sum of Euclidean distances to the layer's other filters (the
    # geometric median minimises that sum), added over the unit's producer layers.
    def distances(_, dim: int, t: torch.Tensor) -> torch.Tensor:
        rows = t.detach().double().movedim(dim, 0).reshape(t.shape[dim], -1)
        return torch.cdist(rows, rows).sum(dim=1)

    with torch.no_grad():
        scores = unit_sums(model, graph, distances, producer_dims(graph))
    return fill_missing_groups(graph, scores, lambda: magnitude(2)(model, graph, data))


def _random(model: nn.Module, graph: ChannelGraph, data: ScoreData) -> np.ndarray:
    return np.random.default_rng(0).random(len(graph.units))


bn_scale = Criterion("bn_scale", _bn_scale)
fpgm = Criterion("fpgm", _fpgm)
random_scores = Criterion("random", _random)
