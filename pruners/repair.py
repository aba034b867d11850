"""Find groups that the model's own Python code cannot prune, by running it.

The graph is traced with fixed shapes, so it cannot tell ``x.split(self.c, 1)`` (a width baked
into an attribute) from ``x.chunk(2, 1)``. After surgery such code raises or returns a
different output structure. We prune one unit of each group, run the model, and bisect over
groups until every offending group is isolated; those are then frozen with the error as reason.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

from torch import nn

from depgraph.graph import ChannelGraph

from .surgery import remove_units
from .verify import run_model

__all__ = ["find_unprunable_groups", "repair_graph"]


def _probe(graph: ChannelGraph, groups: list[int]) -> list[int]:
    """One unit from each group: the smallest change that exposes a baked width."""
    return [graph.groups[g].units[0] for g in groups if graph.groups[g].units]


def find_unprunable_groups(model: nn.Module, graph: ChannelGraph, example_inputs: Any, *,
                           outputs: Optional[Callable] = None,
                           example_kwargs: Optional[dict] = None) -> dict[int, str]:
    """Groups whose pruning breaks the model's forward, with the error each one raised.

    The model is not modified. Cost: one forward of the model, plus about
    ``2 * k * log2(groups)`` pruned forwards when ``k`` groups are at fault.
    """
    reference = [tuple(t.shape) for t in run_model(model, example_inputs, outputs, example_kwargs)]

    def failure(groups: list[int]) -> Optional[str]:
        trial = remove_units(copy.deepcopy(model), graph, _probe(graph, groups))
        try:
            got = [tuple(t.shape) for t in run_model(trial, example_inputs, outputs,
                                                     example_kwargs)]
        except Exception as exc:  # noqa: BLE001 - any failure of the user's code counts
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if got != reference:
            return f"output shapes change from {reference} to {got}"
        return None

    found: dict[int, str] = {}

    def bisect(groups: list[int], known: Optional[str]) -> None:
        why = known if known is not None else failure(groups)
        if why is None:
            return
        if len(groups) == 1:
            found[groups[0]] = why
            return
        half = len(groups) // 2
        before = len(found)
        bisect(groups[:half], None)
        bisect(groups[half:], None)
        if len(found) == before:  # fails only in combination: freeze the whole set
            found.update({g: why for g in groups})

    all_groups = [g.id for g in graph.groups if g.units]
    if all_groups:
        bisect(all_groups, None)
    return found


def repair_graph(model: nn.Module, graph: ChannelGraph, example_inputs: Any, *,
                 outputs: Optional[Callable] = None,
                 example_kwargs: Optional[dict] = None) -> ChannelGraph:
    """``graph`` with every group the model's code cannot prune frozen (see module docstring)."""
    bad = find_unprunable_groups(model, graph, example_inputs, outputs=outputs,
                                 example_kwargs=example_kwargs)
    if not bad:
        return graph
    return graph.without_groups({g: f"the model's code fails when this group shrinks "
                                    f"({why}); a width is fixed in Python"
                                 for g, why in bad.items()})

