"""Iterative pruning: several smaller prune steps with fine-tuning between them.

Step ``s`` of ``n`` keeps ``1 - (1 - target) * s / n`` of the original FLOPs (or params): the
removed share grows linearly, as in Torch-Pruning's linear scheduler. For a channel ratio,
each step removes ``1 - (1 - ratio) ** (1 / n)`` of every group, so the kept widths multiply
to ``1 - ratio``. Each step is a plain :func:`pruners.prune` on the model the previous step
and its fine-tuning left; the plans compose into one (``Plan.then``), so ``apply_plan`` on a
freshly built model reproduces the final architecture and the fine-tuned ``state_dict`` loads.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from .api import PruneResult, make_target, prune
from .plan import Plan, apply_plan
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
    kwargs = options.get("example_kwargs")
    flops0, params0 = measure(model, example_inputs, kwargs)
    have = {"flops": flops0, "params": params0}
    current, plan, records, notes, seconds = deepcopy_model(model), None, [], [], {}
    result: Optional[PruneResult] = None
    for step in range(1, steps + 1):
        if target.kind == "channels":
            goal = 1 - (1 - target.value) ** (step / steps)
            step_target = {"channel_ratio": 1 - (1 - target.value) ** (1 / steps)}
        else:
            goal = 1 - (1 - target.value) * step / steps
            full = flops0 if target.kind == "flops" else params0
            step_target = {f"target_{target.kind}": min(1.0, goal * full / have[target.kind])}
        result = prune(current, example_inputs, inplace=True, **step_target, **options)
        current = result.model
        plan = result.plan if plan is None else plan.then(result.plan)
        notes += [f"step {step}: {n}" for n in result.report.notes]
        for k, v in result.report.seconds.items():
            seconds[k] = seconds.get(k, 0.0) + v
        metric = finetune(current, step) if finetune is not None else None
        # fine-tuning changes weights, not widths: the step's own measurement still holds
        have["flops"], have["params"] = result.report.flops_after, result.report.params_after
        records.append(StepRecord(step, goal, have["flops"] / flops0, have["params"] / params0,
                                  float(metric) if isinstance(metric, (int, float)) else None))
    last = result.report
    report = PruneReport(f"{target.kind}={target.value:g} in {steps} steps", flops0,
                         have["flops"], params0, have["params"],
                         last.groups, layer_changes(model, current), last.frozen, last.verify,
                         notes, seconds, records)
    plan = Plan(plan.kept, plan.shapes, {**plan.meta, "target": report.target})
    if inplace:
        apply_plan(model, plan)
        model.load_state_dict(current.state_dict())
        current = model
    return PruneResult(current, plan, report, result.graph)
