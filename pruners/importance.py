"""Channel importance: the lookup of criteria by name, and per-group normalisation.

Criteria live in :mod:`pruners.criteria` (magnitude, BN scale, FPGM, Taylor, Hessian). Every
one scores a unit over *every* parameter slice it owns (producer rows, norm scales, consumer
columns), so a channel that matters anywhere counts. Scores are then divided by their group's
mean, so a group of wide, small-valued layers competes fairly with a group of narrow,
large-valued ones in global ranking.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import numpy as np
from torch import nn

from depgraph.graph import ChannelGraph

from .criteria import Criterion, ScoreData, bn_scale, fpgm, hessian, magnitude, random_scores, taylor
from .criteria.gradient import require_data

__all__ = ["Importance", "score_units", "IMPORTANCE", "check_importance"]

# A custom criterion: (model, graph) -> one raw score per unit (higher = keep).
Importance = Callable[[nn.Module, ChannelGraph], np.ndarray]

IMPORTANCE: dict[str, Criterion] = {c.name: c for c in (
    magnitude(1), magnitude(2), random_scores, bn_scale, fpgm, taylor, hessian)}


def check_importance(importance: Union[str, Importance], data: Optional[Iterable[Any]] = None,
                     loss_fn: Optional[Callable] = None) -> None:
    """Fail early, before any tracing, on an unknown name or a data-driven one without data."""
    if isinstance(importance, str):
        if importance not in IMPORTANCE:
            raise ValueError(f"unknown importance {importance!r}; use one of "
                             f"{sorted(IMPORTANCE)} or a function (model, graph) -> scores")
        if IMPORTANCE[importance].needs_data:
            require_data(importance, ScoreData(data, loss_fn))
    elif not callable(importance):
        raise TypeError(f"importance must be a name or a callable, got {type(importance).__name__}")


def score_units(model: nn.Module, graph: ChannelGraph,
                importance: Union[str, Importance] = "l2", *,
                data: Optional[Iterable[Any]] = None,
                loss_fn: Optional[Callable] = None) -> np.ndarray:
    """Per-unit scores, normalised by their group's mean (see module docstring).

    Args:
        importance: a name from ``IMPORTANCE`` ("l2", "l1", "random", "bn_scale", "fpgm",
            "taylor", "hessian") or ``f(model, graph) -> raw scores``.
        data, loss_fn: batches and ``loss_fn(model, batch) -> scalar`` for "taylor"/"hessian".

    Raises:
        ValueError: an unknown name, a data-driven criterion without ``data``/``loss_fn``, or a
            custom one returning the wrong shape.

    Example:
        >>> import torch
        >>> from depgraph import analyze, capture
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1))
        >>> g = analyze(capture(m, torch.randn(1, 3, 8, 8)))
        >>> batches = [torch.randn(2, 3, 8, 8) for _ in range(2)]
        >>> s = score_units(m, g, "taylor", data=batches, loss_fn=lambda m, b: m(b).square().mean())
        >>> s.shape
        (8,)
    """
    check_importance(importance, data, loss_fn)
    if isinstance(importance, str):
        raw = IMPORTANCE[importance](model, graph, ScoreData(data, loss_fn))
    else:
        raw = importance(model, graph)
    raw = np.asarray(raw, dtype=np.float64)
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
