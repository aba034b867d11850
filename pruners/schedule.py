"""Iterative pruning: several smaller prune steps with fine-tuning between them.

The architecture is decided once: the one-shot plan for the final target, on the dense model,
with the caller's options. Each group's width then moves in a straight line from its dense
width to that plan's width over the steps, and at every step the units to remove *within* each
group are re-ranked on the weights fine-tuning left. (Allocating across groups anew at every
step compounds: a small group loses its chunk again each time its normalised scores are
re-centred; MobileNetV2's stem fell to 3 of 16 channels in five steps, where one shot keeps 8.)

Each step is a plain :func:`pruners.prune` on the model the previous step and its fine-tuning
left; the plans compose into one (``Plan.then``), so ``apply_plan`` on a freshly built model
reproduces the final architecture and the fine-tuned ``state_dict`` loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from torch import nn

from .api import PruneResult, make_target, plan_pruning, prune
from .plan import apply_plan
from .reparam import deepcopy_model
from .report import PruneReport, StepRecord, layer_changes, measure

__all__ = ["prune_iteratively"]


def prune_iteratively(model: nn.Module, example_inputs: Any, *,
                      target_flops: Optional[float] = None,
                      target_params: Optional[float] = None,
                      channel_ratio: Optional[float] = None, steps: int = 5,
                      finetune: Optional[Callable[[nn.Module, int], Any]] = None,
                      inplace: bool = False, **options: Any) -> PruneResult:
    """Prune to the target in ``steps`` steps, calling ``finetune(model, step)`` after each.

    Args:
        model, example_inputs, target_*: as for :func:`pruners.prune`.
        steps: how many prune steps.
        finetune: trains the pruned model in place after each step (``step`` counts from 1);
            a number it returns (e.g. validation accuracy) is recorded in the report.
        inplace: prune ``model`` itself and load the final weights into it.
        **options: :class:`pruners.PruneOptions`, passed to every step. ``data`` is read
            again at every step: give a list or a DataLoader, not a generator.

    Returns:
        :class:`PruneResult` whose ``plan`` is the composition of every step's plan, whose
        ``report`` compares the original with the final model and lists each step in
        ``report.steps``, and whose ``graph`` is the last step's analysis.

    Example:
        >>> import torch
        >>> make = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(),
        ...                                    torch.nn.Conv2d(16, 16, 3), torch.nn.ReLU(),
        ...                                    torch.nn.Conv2d(16, 4, 1))
        >>> r = prune_iteratively(make(), torch.randn(1, 3, 16, 16), target_flops=0.5, steps=3)
        >>> len(r.report.steps), 0.49 <= r.report.flops_ratio <= 0.5
        (3, True)
    """
    target = make_target(target_flops, target_params, channel_ratio)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    flops0, params0 = measure(model, example_inputs, options.get("example_kwargs"))
    target_kw = {"channel_ratio" if target.kind == "channels" else f"target_{target.kind}":
                 target.value}
    one_shot = plan_pruning(model, example_inputs, **target_kw, **options)
    start, final = _group_widths(one_shot.graph, set(one_shot.removed))
    current, plan, records, notes, seconds = deepcopy_model(model), None, [], [], {}
    result: Optional[PruneResult] = None
    for step in range(1, steps + 1):
        # the widths come from the strategy; the target only names the step in its plan
        step_options = {**options, "strategy": _toward(start, final, step / steps)}
        result = prune(current, example_inputs, inplace=True, **target_kw, **step_options)
        current = result.model
        plan = result.plan if plan is None else plan.then(result.plan)
        notes += [f"step {step}: {n}" for n in result.report.notes]
        for k, v in result.report.seconds.items():
            seconds[k] = seconds.get(k, 0.0) + v
        metric = finetune(current, step) if finetune is not None else None
        # fine-tuning changes weights, not widths: the step's own measurement still holds
        goal = (1 - (1 - target.value) ** (step / steps) if target.kind == "channels"
                else 1 - (1 - target.value) * step / steps)  # nominal share kept after it
        records.append(StepRecord(step, goal, result.report.flops_after / flops0,
                                  result.report.params_after / params0,
                                  float(metric) if isinstance(metric, (int, float)) else None))
    last = result.report
    report = PruneReport(f"{target.kind}={target.value:g} in {steps} steps", flops0,
                         last.flops_after, params0, last.params_after,
                         last.groups, layer_changes(model, current), last.frozen, last.verify,
                         notes, seconds, records)
    plan = dataclasses.replace(plan, meta={**plan.meta, "target": report.target})
    if inplace:
        apply_plan(model, plan)
        model.load_state_dict(current.state_dict())
        current = model
    return PruneResult(current, plan, report, result.graph)


def _group_key(group) -> frozenset:
    """A group's identity across steps: the parameter dims it spans (sizes shrink, names stay)."""
    return frozenset((p, d) for p, d, _ in group.dims)


def _group_widths(graph, removed: set[int]) -> tuple[dict, dict]:
    """(dense units, units the one-shot plan keeps) of every group, by ``_group_key``."""
    start = {_group_key(g): len(g.units) for g in graph.groups}
    final = {_group_key(g): sum(1 for u in g.units if u not in removed) for g in graph.groups}
    return start, final


def _toward(start: dict, final: dict, fraction: float) -> Callable:
    """An allocation strategy: every group keeps ``fraction`` of the way from its dense width
    to its one-shot width; within the group the lowest-scoring units go."""

    def strategy(graph, scores, cost, target) -> list[int]:
        removed: list[int] = []
        for group in graph.groups:
            key = _group_key(group)
            if key not in final:  # a group the dense analysis did not have: leave it
                continue
            keep = max(final[key], int(round(start[key] - (start[key] - final[key]) * fraction)))
            order = sorted(group.units, key=lambda u: (scores[u], u))
            removed += order[:max(0, len(order) - keep)]
        return removed

    return strategy
