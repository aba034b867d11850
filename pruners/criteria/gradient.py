"""Data-driven criteria from loss gradients: first-order Taylor and the Fisher/OBD saliency.

Both run ``loss_fn(model, batch)`` on each batch of ``data`` and backpropagate, then score each
unit over every slice it owns (producer rows, norm scales, consumer columns):

- taylor:  |sum_b sum_slices w * dL_b/dw| / B, the first-order change of the loss when the
  unit's weights are set to zero (Molchanov et al. 2019), with gradients averaged over batches;
- hessian: sum_b sum_slices (w * dL_b/dw)^2 / B, i.e. 1/2 w^2 H_ii with the Hessian diagonal
  replaced by the empirical Fisher diagonal E[g^2] (optimal brain damage; group Fisher pruning).
  Pass batches of one sample for the per-sample Fisher.

Scoring leaves the model as it was: parameters, buffers (BatchNorm statistics), gradients,
``requires_grad`` flags and train/eval mode are restored. Inside a ``torch.distributed`` job
the per-unit sums and batch counts are all-reduced, so every rank scores with the union of
the ranks' shards and derives the same plan.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from depgraph.graph import ChannelGraph

from .base import Criterion, ScoreData, reduce_except, unit_sums

__all__ = ["taylor", "hessian", "require_data"]


def require_data(name: str, data: ScoreData) -> None:
    """Raise a ValueError naming what a data-driven criterion needs."""
    missing = [k for k, v in (("data", data.data), ("loss_fn", data.loss_fn)) if v is None]
    if missing:
        raise ValueError(
            f"importance={name!r} is data-driven and needs {' and '.join(missing)}: pass "
            "data=<iterable of batches> and loss_fn=<callable (model, batch) -> scalar loss>, "
            "e.g. data=[(x, y), ...], loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1])")


def _accumulate(model: nn.Module, graph: ChannelGraph, data: ScoreData, name: str,
                per_index: Callable[[str, int, torch.Tensor], torch.Tensor]) -> np.ndarray:
    """Mean over batches of ``unit_sums(per_index)`` taken after each batch's backward."""
    require_data(name, data)
    params = {p: model.get_parameter(p) for p, _ in graph.unit_index if p not in graph.buffers}
    flags = {p: t.requires_grad for p, t in params.items()}
    grads = {id(t): t.grad for t in model.parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    training = model.training
    total = np.zeros(len(graph.units), dtype=np.float64)
    batches = 0
    try:
        for t in params.values():
            t.requires_grad_(True)
        for batch in data.data:
            model.zero_grad(set_to_none=True)
            loss = data.loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"loss_fn must return a scalar tensor, got "
                                f"{type(loss).__name__}{tuple(getattr(loss, 'shape', ()))}")
            loss.backward()
            with torch.no_grad():
                total += unit_sums(model, graph, per_index)
            batches += 1
    finally:
        for p, t in params.items():
            t.requires_grad_(flags[p])
        for t in model.parameters():
            t.grad = grads.get(id(t))
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
        model.train(training)
    if batches == 0:
        raise ValueError(f"importance={name!r}: data= yielded no batches")
    counts = np.array([batches], dtype=np.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        reduced = torch.from_numpy(np.concatenate([total, counts]))
        torch.distributed.all_reduce(reduced)
        total, counts = reduced[:-1].numpy(), reduced[-1:].numpy()
    return total / counts[0]


def _wg(t: torch.Tensor) -> torch.Tensor:
    if t.grad is None:  # not on the loss's path
        return torch.zeros_like(t, dtype=torch.float64)
    return t.detach().double() * t.grad.detach().double()


def _taylor(model: nn.Module, graph: ChannelGraph, data: ScoreData) -> np.ndarray:
    return np.abs(_accumulate(model, graph, data, "taylor",
                              lambda _, dim, t: reduce_except(_wg(t), dim)))


def _hessian(model: nn.Module, graph: ChannelGraph, data: ScoreData) -> np.ndarray:
    return _accumulate(model, graph, data, "hessian",
                       lambda _, dim, t: reduce_except(_wg(t) ** 2, dim))


taylor = Criterion("taylor", _taylor, needs_data=True)
hessian = Criterion("hessian", _hessian, needs_data=True)
