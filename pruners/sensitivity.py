"""Sensitivity analysis: prune one group at a time at increasing ratios and watch a metric.

One capture, one analysis and one scoring for the whole scan. A group's lowest-ranked units
are removed by zeroing their consumer slices on a working copy (for exact units that equals
pruning them: see ``shared/design.md``) and put back after the call; units whose removal
changes normalisation statistics (inexact) are pruned by surgery on a copy instead. So the
scan costs one ``evaluate`` per (group, ratio), plus one of the unpruned model.

``prune(..., strategy="sensitivity", sensitivity=table)`` then allocates from the curves
(``allocate.py``: the chunk whose predicted metric loss per FLOP removed is smallest goes
first).
"""

from __future__ import annotations

import copy
import fnmatch
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from depgraph import analyze, capture
from depgraph.cost import cost_model
from depgraph.errors import PruningError
from depgraph.graph import ChannelGraph

from .importance import score_units
from .surgery import lookup_tensor, remove_units
from .verify import mask_consumers

__all__ = ["sensitivity", "Sensitivity", "GroupCurve", "RATIOS"]

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_TYPE, _VERSION = "pruners.Sensitivity", 1


@dataclass
class GroupCurve:
    """One group's scan: at ``ratios[i]`` its ``removed[i]`` lowest-ranked units went, the
    metric was ``metric[i]`` and ``flops_removed[i]`` of the model's FLOPs were gone."""

    group: int
    layers: list[str]
    units: int
    removed: list[int]
    metric: list[float]
    flops_removed: list[float]

    def loss(self, baseline: float) -> Callable[[float], float]:
        """Predicted metric loss when a fraction ``f`` of the group's units is removed,
        linear between the scanned points (and 0 at ``f = 0``)."""
        xs = np.array([0.0] + [r / self.units for r in self.removed])
        ys = np.array([0.0] + [baseline - m for m in self.metric])
        order = np.argsort(xs, kind="stable")
        return lambda f: float(np.interp(f, xs[order], ys[order]))


@dataclass
class Sensitivity:
    """The scan's table: ``baseline`` is the unpruned model's metric."""

    ratios: list[float]
    baseline: float
    criterion: str
    curves: list[GroupCurve]
    meta: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        worst = sorted(self.curves, key=lambda c: min(c.metric))[:5]
        return (f"Sensitivity({len(self.curves)} groups x {len(self.ratios)} ratios, baseline "
                f"{self.baseline:.4g}; most sensitive: "
                + ", ".join(f"{c.layers[0]} ({min(c.metric):.4g})" for c in worst) + ")")

    def to_dict(self) -> dict:
        return {"type": _TYPE, "version": _VERSION, "ratios": list(self.ratios),
                "baseline": self.baseline, "criterion": self.criterion, "meta": self.meta,
                "curves": [asdict(c) for c in self.curves]}

    @classmethod
    def from_dict(cls, data: dict) -> "Sensitivity":
        if not isinstance(data, dict) or data.get("type") != _TYPE:
            raise PruningError(f"not a sensitivity table: expected type {_TYPE!r}")
        if data.get("version") != _VERSION:
            raise PruningError(f"sensitivity table version {data.get('version')} is not "
                               f"supported (this library reads version {_VERSION})")
        return cls(list(data["ratios"]), float(data["baseline"]), data["criterion"],
                   [GroupCurve(**c) for c in data["curves"]], dict(data.get("meta", {})))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> "Sensitivity":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dataframe(self):
        """One row per (group, ratio); needs pandas."""
        import pandas as pd

        return pd.DataFrame([{"group": c.group, "layer": c.layers[0], "units": c.units,
                              "ratio": r, "removed": n, "metric": m, "flops_removed": f}
                             for c in self.curves
                             for r, n, m, f in zip(self.ratios, c.removed, c.metric,
                                                   c.flops_removed)])

    def losses(self, graph: ChannelGraph) -> dict[int, Callable[[float], float]]:
        """Loss curves keyed by ``graph``'s group ids, matched by the groups' layers (the
        graph of the same model and inputs has the same groups)."""
        by_layers = {tuple(g.layers): g.id for g in graph.groups}
        out = {}
        for c in self.curves:
            gid = by_layers.get(tuple(c.layers))
            if gid is not None:
                out[gid] = c.loss(self.baseline)
        if self.curves and not out:
            raise PruningError("the sensitivity table matches no group of this model: scan the "
                               "same model with the same example inputs")
        return out


def _selected(graph: ChannelGraph, groups: Optional[Sequence[str]]) -> list:
    chosen = []
    for g in graph.groups:
        if len(g.units) < 2:
            continue
        if groups is None or any(fnmatch.fnmatchcase(layer, pat) for pat in groups
                                 for layer in g.layers):
            chosen.append(g)
    return chosen


def _touched(graph: ChannelGraph, units: np.ndarray) -> list[str]:
    """Tensors ``mask_consumers`` may zero for these units."""
    return sorted({p for (p, d), ids in graph.unit_index.items() if np.isin(ids, units).any()})


def sensitivity(model: nn.Module, example_inputs: Any, *, evaluate: Callable[[nn.Module], float],
                ratios: Sequence[float] = RATIOS, criterion: str = "l2",
                groups: Optional[Sequence[str]] = None, data: Optional[Any] = None,
                loss_fn: Optional[Callable] = None, progress: bool = True,
                **options: Any) -> Sensitivity:
    """Scan every prunable group (or those with a layer matching a ``groups`` pattern) at each
    ratio, removing only that group's lowest-ranked units by ``criterion``.

    Args:
        model: not changed; the scan runs on a copy in eval mode.
        evaluate: ``evaluate(model) -> float``, higher is better (accuracy, -loss, mAP).
        ratios: fractions of each group's units to remove (at least one unit, one stays).
        criterion, data, loss_fn: as ``importance``, ``data`` and ``loss_fn`` of ``prune()``.
        groups: module-name patterns (``"layer3.*"``); default every group.
        progress: a progress bar (tqdm) over the evaluations.
        **options: ``outputs``, ``example_kwargs`` as in ``prune()``.

    Returns:
        A :class:`Sensitivity` table.
    """
    from .api import PruneOptions, _check_model, _split_inputs, _working_copy

    _check_model(model)
    if not callable(evaluate):
        raise TypeError("evaluate must be a function model -> float (higher is better)")
    bad = [r for r in ratios if not 0 < r < 1]
    if bad or not ratios:
        raise ValueError(f"ratios must be in (0, 1), got {list(ratios)}")
    opts = PruneOptions.of(dict(options, importance=criterion, data=data, loss_fn=loss_fn))
    example_inputs, kwargs = _split_inputs(model, example_inputs, opts.example_kwargs)
    work, _, _ = _working_copy(model, example_inputs, opts)
    graph = analyze(capture(work, example_inputs, example_kwargs=kwargs, outputs=opts.outputs),
                    heads=opts.heads)
    scores = score_units(work, graph, criterion, data=data, loss_fn=loss_fn)
    cost = cost_model(graph)
    full_flops = cost.full()[0] or 1.0
    chosen = _selected(graph, groups)
    if not chosen:
        raise PruningError("no prunable group to scan" + (f" matches {list(groups)}" if groups
                                                          else ""))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(chosen) * len(ratios) + 1, desc="sensitivity", unit="eval")
    try:
        baseline = float(evaluate(work))
        if bar is not None:
            bar.update()
        curves = []
        for g in chosen:
            order = sorted(g.units, key=lambda u: (scores[u], u))
            touched = _touched(graph, np.asarray(g.units))
            saved = {p: lookup_tensor(work, p).detach().clone() for p in touched}
            removed, metric, flops = [], [], []
            for r in ratios:
                k = int(min(len(order) - 1, max(1, round(r * len(order)))))
                units = order[:k]
                if all(graph.units[u].exact for u in units):
                    mask_consumers(work, graph, units)
                    try:
                        value = float(evaluate(work))
                    finally:
                        with torch.no_grad():
                            for p, t in saved.items():
                                lookup_tensor(work, p).copy_(t)
                else:  # normalisation statistics change: evaluate the real pruned model
                    value = float(evaluate(remove_units(copy.deepcopy(work), graph, units)))
                kept = cost.kept_after(graph, set(units))
                removed.append(k)
                metric.append(value)
                flops.append(1.0 - cost.evaluate(kept)[0] / full_flops)
                if bar is not None:
                    bar.update()
            curves.append(GroupCurve(g.id, list(g.layers), len(g.units), removed, metric, flops))
    finally:
        if bar is not None:
            bar.close()
    return Sensitivity(list(ratios), baseline, criterion if isinstance(criterion, str)
                       else getattr(criterion, "__name__", "custom"), curves,
                       {"model": type(model).__name__})
