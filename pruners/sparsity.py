"""Sparsity training: a group-lasso penalty over coupled units (DepGraph's "SL", slimming).

Each unit's norm is taken over *every* slice that pruning it would remove (producer rows, norm
scales, consumer columns), so training with the penalty drives whole units, not single layers,
towards zero, and only channels the engine may prune feel it. Afterwards prune with any
criterion: the units the penalty emptied score lowest.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from depgraph import analyze, capture

from .criteria.base import reduce_except

__all__ = ["GroupSparsity"]


class GroupSparsity:
    """``lam * sum_units sqrt(sum of the unit's squared weights)``, to add to the loss.

    Args:
        model: the model being trained; its parameters are read live at every ``penalty()``.
        example_inputs: as for ``prune()``; used once, to find the units.
        lam: the penalty's weight.
        share: penalise only this fraction of each group's units, those with the smallest
            current (group-normalised) norms, chosen anew at every call; None: all units.
        outputs, example_kwargs: as for ``prune()``.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> reg = GroupSparsity(m, torch.randn(1, 3, 8, 8), lam=1e-3)
        >>> loss = m(torch.randn(2, 3, 8, 8)).square().mean() + reg.penalty()
        >>> loss.backward()
        >>> reg.unit_norms().shape
        (8,)
    """

    def __init__(self, model: nn.Module, example_inputs: Any, *, lam: float = 1e-4,
                 share: Optional[float] = None, outputs: Optional[Callable] = None,
                 example_kwargs: Optional[dict] = None) -> None:
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if share is not None and not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.model, self.lam, self.share = model, float(lam), share
        work = copy.deepcopy(model).eval()
        self.graph = analyze(capture(work, example_inputs, example_kwargs=example_kwargs,
                                     outputs=outputs))
        self._slices: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []
        for (param, dim), ids in sorted(self.graph.unit_index.items()):
            mask = ids >= 0
            if param in self.graph.buffers or not mask.any():
                continue
            self._slices.append((param, dim, torch.from_numpy(np.nonzero(mask)[0]),
                                 torch.from_numpy(ids[mask])))
        self._groups = [torch.as_tensor(g.units, dtype=torch.long) for g in self.graph.groups]

    def _squares(self) -> torch.Tensor:
        total: Optional[torch.Tensor] = None
        for param, dim, positions, units in self._slices:
            t = self.model.get_parameter(param)
            if total is None:
                total = t.new_zeros(len(self.graph.units))
            per_index = reduce_except(t.square(), dim).index_select(0, positions.to(t.device))
            total = total.index_add(0, units.to(t.device), per_index.to(total.dtype))
        return total if total is not None else torch.zeros(len(self.graph.units))

    def unit_norms(self) -> np.ndarray:
        """The current L2 norm of every unit over all its slices."""
        with torch.no_grad():
            return self._squares().sqrt().double().cpu().numpy()

    def _selected(self, norms: torch.Tensor) -> torch.Tensor:
        """A 0/1 weight per unit: the ``share`` weakest of each group (all when share=None)."""
        if self.share is None:
            return torch.ones_like(norms)
        weight = torch.zeros_like(norms)
        for members in self._groups:
            if len(members) == 0:
                continue
            members = members.to(norms.device)
            k = int(np.ceil(self.share * len(members)))
            weakest = members[torch.argsort(norms[members], stable=True)[:k]]
            weight[weakest] = 1.0
        return weight

    def penalty(self) -> torch.Tensor:
        """The scalar to add to the training loss (differentiable)."""
        norms = (self._squares() + 1e-12).sqrt()
        return self.lam * (norms * self._selected(norms.detach())).sum()
