"""``prune()``: the one call users came for."""

from __future__ import annotations

import copy
import fnmatch
import inspect
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from torch import nn

from depgraph import analyze, capture
from depgraph.cost import cost_model
from depgraph.errors import PruningError
from depgraph.graph import ChannelGraph

from .allocate import InfeasibleTargetError, Target, allocate
from .importance import Importance, score_units
from .plan import Plan, apply_plan
from .repair import find_unprunable_groups, freeze_unprunable, probe_inputs
from .report import GroupChange, PruneReport, layer_changes, measure
from .surgery import remove_units
from .verify import VerifyResult, run_model, verify

__all__ = ["prune", "PruneResult"]


@dataclass
class PruneResult:
    """``model``: the pruned model; ``plan``: JSON-able plan; ``report``; ``graph``: analysis."""

    model: nn.Module
    plan: Plan
    report: PruneReport
    graph: ChannelGraph


def _target(target_flops, target_params, channel_ratio) -> Target:
    given = {k: v for k, v in (("flops", target_flops), ("params", target_params),
                               ("channels", channel_ratio)) if v is not None}
    if len(given) != 1:
        raise ValueError("give exactly one of target_flops, target_params, channel_ratio; got "
                         f"{', '.join(given) or 'none'}")
    (kind, value), = given.items()
    return Target(kind, float(value))


def _protect_patterns(model: nn.Module,
                      protect: Optional[Iterable[Union[str, nn.Module]]]) -> list[str]:
    """Module-name patterns; modules are named by where they sit in the user's ``model``."""
    names = {id(m): n for n, m in model.named_modules()}
    patterns = []
    for item in protect or ():
        if isinstance(item, nn.Module):
            if id(item) not in names:
                raise ValueError(f"protect: {type(item).__name__} is not a submodule of the model")
            patterns.append(names[id(item)])
        else:
            patterns.append(str(item))
    return patterns


def _protected_units(graph: ChannelGraph, patterns: list[str]) -> set[int]:
    out: set[int] = set()
    for (param, _), ids in graph.unit_index.items():
        owner = param.rpartition(".")[0]
        if any(owner == p or fnmatch.fnmatchcase(owner, p) or owner.startswith(p + ".")
               for p in patterns):
            out.update(ids[ids >= 0].tolist())
    return out


def _why_frozen(graph: ChannelGraph, notes: list[str], top: int = 4) -> str:
    """The largest frozen sets and repair's findings, for an infeasible-target message."""
    frozen = sorted(graph.frozen, key=lambda f: -f.count)
    parts = [str(f) for f in frozen[:top]]
    if len(frozen) > top:
        parts.append(f"{len(frozen) - top} more in result.graph.frozen")
    parts += [n for n in notes if n.startswith("froze group")][:top]
    return "Frozen: " + "; ".join(parts) + "." if parts else ""


def _split_inputs(model: nn.Module, example_inputs: Any, example_kwargs: Optional[dict]
                  ) -> tuple[Any, Optional[dict]]:
    """A dict of inputs is keyword arguments when its keys name ``forward``'s parameters;
    otherwise it is the one argument (``forward(self, batch)``)."""
    if not isinstance(example_inputs, dict):
        return example_inputs, example_kwargs
    try:
        inspect.signature(model.forward).bind(**example_inputs)
    except TypeError:
        return (example_inputs,), example_kwargs
    return (), {**example_inputs, **(example_kwargs or {})}


def prune(model: nn.Module, example_inputs: Any, *, target_flops: Optional[float] = None,
          target_params: Optional[float] = None, channel_ratio: Optional[float] = None,
          importance: Union[str, Importance] = "l2", strategy: str = "global",
          round_to: int = 1, min_channels: int = 1, max_ratio: float = 0.9,
          protect: Optional[Sequence[Union[str, nn.Module]]] = None,
          outputs: Optional[Callable] = None, example_kwargs: Optional[dict] = None,
          verify_at: Optional[Sequence[str]] = None, inplace: bool = False,
          verbose: bool = False) -> PruneResult:
    """Prune ``model`` to a target and return the smaller model, its plan and a report.

    Args:
        model: any ``nn.Module``. Untouched unless ``inplace=True`` (and then only on success).
        example_inputs: a tensor, a tuple of ``forward`` arguments, or a dict of keyword
            arguments (a dict whose keys are not ``forward``'s parameters is passed as one
            argument).
        target_flops: keep at most this fraction of the FLOPs (e.g. 0.5).
        target_params: keep at most this fraction of the parameters.
        channel_ratio: remove this fraction of the channels of every group.
        importance: "l2" (default), "l1", "random", or ``f(model, graph) -> scores per unit``.
        strategy: "global" ranking across groups (default) or "uniform" ratio per group.
        round_to: keep every pruned group's width a multiple of this (8 or 16 for speed).
        min_channels: the fewest channels any layer dim keeps.
        max_ratio: the largest fraction of a group's units that may go.
        protect: modules or module-name patterns (``"model.22.*"``) whose channels stay.
        outputs: picks the output contract from the return value (``lambda o: o[0]``).
        verify_at: submodules to compare in verification (a detector's head).
        verbose: print progress.

    Returns:
        :class:`PruneResult`.

    Raises:
        ValueError: bad arguments (no or several targets, a target outside (0, 1]).
        PruningError: the inputs do not fit the model (CaptureError), or the target is
            infeasible (InfeasibleTargetError, stating the smallest reachable value).

    Example:
        >>> import torch, torchvision
        >>> result = prune(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224),
        ...                target_flops=0.5)
        >>> 0.49 <= result.report.flops_ratio <= 0.50
        True
    """
    target = _target(target_flops, target_params, channel_ratio)
    example_inputs, example_kwargs = _split_inputs(model, example_inputs, example_kwargs)
    patterns = _protect_patterns(model, protect)
    say = print if verbose else (lambda *a, **k: None)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - clock
        clock = now

    work = copy.deepcopy(model)
    was_training = work.training
    work.eval()
    try:
        run_model(work, example_inputs, outputs, example_kwargs)
    except Exception as exc:  # noqa: BLE001
        raise PruningError(f"the example inputs do not fit {type(model).__name__}: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                           ". Pass what forward takes: a tensor, or a tuple of arguments.") from exc
    lap("check inputs")
    say(f"[prune] capturing {type(model).__name__} ...")
    cap = capture(work, example_inputs, example_kwargs=example_kwargs, outputs=outputs)
    lap("capture")
    graph = analyze(cap)
    lap("analyze")
    say(f"[prune] {graph}; probing groups the model's code may fix ...")
    notes = list(cap.notes)
    kw = dict(outputs=outputs, example_kwargs=example_kwargs, at=verify_at)
    bad = find_unprunable_groups(
        work, graph, probe_inputs(work, example_inputs, outputs=outputs,
                                  example_kwargs=example_kwargs), **kw)
    lap("repair")
    for attempt in range(3):
        if bad:
            notes += [f"froze group {g} ({', '.join(graph.groups[g].layers[:3])}): {why}"
                      for g, why in sorted(bad.items())]
            graph = freeze_unprunable(graph, bad)
        scores = score_units(work, graph, importance)
        cost = cost_model(graph)
        try:
            removed = allocate(graph, scores, cost, target, strategy=strategy,
                               round_to=round_to, min_channels=min_channels,
                               max_ratio=max_ratio, protected=_protected_units(graph, patterns))
        except InfeasibleTargetError as exc:
            raise InfeasibleTargetError(f"{exc} {_why_frozen(graph, notes)}",
                                        exc.reachable) from None
        lap("allocate")
        say(f"[prune] removing {len(removed)} of {len(graph.units)} units ...")
        pruned = remove_units(copy.deepcopy(work), graph, removed)
        lap("surgery")
        probes: dict[int, list[int]] = {}
        for u in removed:
            probes.setdefault(graph.units[u].group, []).append(u)
        exact = all(graph.units[u].exact for u in removed)
        try:
            check: Optional[VerifyResult] = verify(work, graph, removed, example_inputs,
                                                   pruned=pruned, train_mode=True, **kw)
            failed = exact and not check.ok
        except PruningError:
            check, failed = None, True
        if not exact:
            check = None  # normalisation statistics change: no exact reference to compare
        bad = find_unprunable_groups(work, graph, example_inputs, probes=probes,
                                     train_mode=True, **kw) if failed else {}
        lap("verify")
        if not bad:
            break
    else:
        raise PruningError("the pruned model still fails after freezing the groups found "
                           "three times; please report this model")
    flops0, params0 = measure(work, example_inputs, example_kwargs)
    flops1, params1 = measure(pruned, example_inputs, example_kwargs)
    lap("measure")

    changed: dict[str, dict[int, list[int]]] = {}
    for (p, d), idx in graph.kept_indices(set(removed)).items():
        if len(idx) != graph.param_shapes[p][d]:
            changed.setdefault(p, {})[d] = idx.tolist()
    plan = Plan(changed, {p: graph.param_shapes[p] for p in changed},
                {"model": type(model).__name__, "target": f"{target.kind}={target.value:g}"})

    removed_set = set(removed)
    groups = [GroupChange(g.id, g.layers, len(g.units),
                          sum(1 for u in g.units if u not in removed_set)) for g in graph.groups]
    report = PruneReport(f"{target.kind}={target.value:g}", flops0, flops1, params0, params1,
                         groups, layer_changes(work, pruned), list(graph.frozen), check, notes,
                         seconds)
    achieved = report.flops_ratio if target.kind == "flops" else report.params_ratio
    if target.kind != "channels" and achieved < target.value - 0.01:
        notes.append(f"achieved {achieved:.4f} for a target of {target.value:g}: no set of units "
                     f"found lands within 1 point at this granularity (round_to={round_to})")
    if was_training:
        pruned.train()
    if inplace:
        apply_plan(model, plan)
        pruned = model
    say(f"[prune] done: FLOPs {100 * report.flops_ratio:.2f}%, params "
        f"{100 * report.params_ratio:.2f}%")
    return PruneResult(pruned, plan, report, graph)

