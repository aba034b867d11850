"""Channel importance: one score per unit, normalised within its group.

A unit's magnitude is aggregated over *every* parameter slice it owns (producer rows, norm
scales, consumer columns), so a channel that is large anywhere counts as large. Scores are then
divided by their group's mean, so a group of wide, small-valued layers competes fairly with a
group of narrow, large-valued ones in global ranking.
"""

from __future__ import annotations

from typing import Callable, Union

import numpy as np
import torch
from torch import nn

from depgraph.graph import ChannelGraph

__all__ = ["Importance", "score_units", "magnitude", "IMPORTANCE"]

# A custom criterion: (model, graph) -> one raw score per unit (higher = keep).
Importance = Callable[[nn.Module, ChannelGraph], np.ndarray]


def magnitude(p: int) -> Importance:
    """L``p`` norm over all parameter slices of each unit."""

    def score(model: nn.Module, graph: ChannelGraph) -> np.ndarray:
        total = np.zeros(len(graph.units), dtype=np.float64)
        with torch.no_grad():
            for (param, dim), ids in graph.unit_index.items():
                if param in graph.buffers:
                    continue  # running statistics describe data, not the learned channel
                mask = ids >= 0
                if not mask.any():
                    continue
                t = model.get_parameter(param).detach().double().abs()
                other = [d for d in range(t.dim()) if d != dim]
                per_index = (t.pow(p).sum(dim=other) if other else t.pow(p)).cpu().numpy()
                np.add.at(total, ids[mask], per_index[mask])
        return total ** (1.0 / p)

    score.__name__ = f"l{p}"
    return score


def _random(model: nn.Module, graph: ChannelGraph) -> np.ndarray:
    return np.random.default_rng(0).random(len(graph.units))


IMPORTANCE: dict[str, Importance] = {"l1": magnitude(1), "l2": magnitude(2), "random": _random}


def score_units(model: nn.Module, graph: ChannelGraph,
                importance: Union[str, Importance] = "l2") -> np.ndarray:
    """Per-unit scores, normalised by their group's mean (see module docstring).

    Raises:
        ValueError: an unknown criterion name, or a custom one returning the wrong shape.
    """
    if isinstance(importance, str):
        if importance not in IMPORTANCE:
            raise ValueError(f"unknown importance {importance!r}; use one of "
                             f"{sorted(IMPORTANCE)} or a function (model, graph) -> scores")
        importance = IMPORTANCE[importance]
    raw = np.asarray(importance(model, graph), dtype=np.float64)
    if raw.shape != (len(graph.units),):
        raise ValueError(f"importance returned shape {raw.shape}, expected "
                         f"({len(graph.units)},): one score per unit")
    scores = raw.copy()
    for group in graph.groups:
        members = np.asarray(group.units, dtype=np.int64)
        mean = raw[members].mean() if len(members) else 0.0
        if mean > 0:
            scores[members] = raw[members] / mean
    return scores
