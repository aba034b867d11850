"""The pruning tools under comparison, each behind one signature.

A tool is ``f(bench, target_flops, round_to) -> (pruned model, info)``. It may prune
``bench.model`` in place or return a new model. ``info`` is a flat dict of extra facts for the
results table. :func:`resolve` also accepts ``"module:function"``, so tests can plug in a tool
that crashes or hangs.
"""

from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from .models import Bench

Tool = Callable[[Bench, float, int], "tuple[nn.Module, dict]"]

#: Torch-Pruning's iterative schedule: ``pruning_ratio=1.0`` reached in this many steps, so
#: each step removes about 1/TP_STEPS of every group's channels; we stop at the first step
#: whose measured MACs meet the target.
TP_STEPS = 100


def ours(bench: Bench, target: float, round_to: int) -> tuple[nn.Module, dict]:
    """This engine with its defaults: global L2 ranking, no ignored layers."""
    from pruners import prune

    result = prune(bench.model, bench.inputs, target_flops=target, round_to=round_to,
                   outputs=bench.outputs, inplace=True)
    info = {f"time_{k.replace(' ', '_')}_s": round(v, 3)
            for k, v in result.report.seconds.items()}
    info["frozen_groups"] = sum(1 for g in result.graph.groups if g.frozen)
    return result.model, info


def torch_pruning(bench: Bench, target: float, round_to: int) -> tuple[nn.Module, dict]:
    """Torch-Pruning as its README recommends: MetaPruner, group L2 magnitude importance,
    the head in ``ignored_layers``, iterative steps until the measured MACs meet the target."""
    import torch_pruning as tp

    model, x = bench.model, bench.inputs
    kwargs = {}
    if isinstance(x, list):  # detectors take a list of images as one argument
        kwargs["forward_fn"] = lambda m, inputs: m(inputs)
    if bench.outputs is not None:
        kwargs["output_transform"] = bench.outputs
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=1.0,
        iterative_steps=TP_STEPS, ignored_layers=list(bench.head),
        round_to=round_to if round_to > 1 else None, **kwargs)
    counted = (x,) if isinstance(x, list) else x  # the counter unpacks lists into arguments
    macs0, _ = tp.utils.count_ops_and_params(model, counted)
    steps = 0
    for steps in range(1, TP_STEPS + 1):
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(model, counted)
        if macs <= target * macs0:
            break
    return model, {"steps": steps}


TOOLS: dict[str, Tool] = {"ours": ours, "torch_pruning": torch_pruning}


def resolve(name: str) -> Tool:
    """A registered tool name, or ``"package.module:function"``."""
    if name in TOOLS:
        return TOOLS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)
    raise KeyError(f"unknown tool {name!r}; known: {', '.join(TOOLS)}, or 'module:function'")
