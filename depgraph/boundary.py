"""Where a model's values become data-dependent, and the modules to verify just before.

A detector's tail keeps the top-k scores, thresholds them and runs NMS: which boxes survive
depends on the values, so float noise between a pruned model and its masked original (1e-7)
can change the outputs' number and order. Everything computed from such a selection is
*tainted*. The tensors handed into tainted code are not: comparing them checks every weight
before the selection exactly. :func:`verification_points` names the outermost untainted
modules that produce those tensors (a detector's head, an R-CNN's backbone and RPN head), so
``prune()`` verifies there without being told.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx

from .capture import Capture
from .rules.registry import _clean

__all__ = ["Boundary", "verification_points", "handed_on", "DATA_DEPENDENT"]

#: Ops whose result (its size, or which elements it picks) depends on tensor values.
DATA_DEPENDENT = {
    "aten.nonzero", "aten.nonzero_static", "aten.topk", "aten.sort", "aten.argsort",
    "aten.msort", "aten.unique", "aten._unique", "aten._unique2", "aten.unique_dim",
    "aten.unique_consecutive", "aten.masked_select", "aten._local_scalar_dense", "aten.item",
    "aten.argmax", "aten.argmin", "aten.kthvalue", "aten.multinomial",
    "torchvision.nms", "torchvision.batched_nms",
}


@dataclass(frozen=True)
class Boundary:
    """``modules``: where to verify (outermost first); ``ops``: the data-dependent ops found,
    as "op at module" strings; ``tainted``: the graph nodes computed from a selection;
    ``tail_layers``: the innermost modules of the weighted ops run on selected values (their
    cost depends on how many survive the selection), whose FLOPs the target leaves out."""

    modules: tuple[str, ...]
    ops: tuple[str, ...]
    tainted: frozenset[str] = frozenset()
    tail_layers: tuple[str, ...] = ()

    @property
    def tail(self) -> tuple[str, ...]:
        """``tail_layers`` named two levels deep, for the report (``roi_heads.box_head``)."""
        return tuple(sorted({".".join(m.split(".")[:2]) for m in self.tail_layers}))

    def __str__(self) -> str:
        return (f"verified at {', '.join(self.modules)}: the tensors handed to "
                f"{', '.join(self.ops[:4])}{' ...' if len(self.ops) > 4 else ''}, whose results "
                "depend on values")


def _packet(node: torch.fx.Node) -> str:
    target = node.target
    packet = getattr(target, "overloadpacket", target)
    return str(packet)


def _selects(node: torch.fx.Node) -> bool:
    if _packet(node) in DATA_DEPENDENT:
        return True
    if _packet(node) in ("aten.index", "aten.index_put", "aten._unsafe_index"):
        # x[mask]: a boolean index keeps as many elements as are True
        indices = node.args[1] if len(node.args) > 1 else []
        return any(isinstance(i, torch.fx.Node) and isinstance(i.meta.get("val"), torch.Tensor)
                   and i.meta["val"].dtype == torch.bool for i in indices or [])
    return False


def _stack(node: torch.fx.Node) -> list[str]:
    """The modules computing ``node``, outermost first (the root left out)."""
    stack = node.meta.get("nn_module_stack") or {}
    names = [_clean(path) for path, _ in stack.values()]
    return [n for n in names if n]


def handed_on(cap: Capture, modules: list[str]) -> dict[str, tuple[str, ...]]:
    """Per module, the graph nodes computed in it that code outside it reads (or that are
    outputs), in graph order: the tensors a hook on its output sees. ``analyze(watch=)``
    records their channels, so a check that compares these modules' outputs compares the
    channels a plan keeps (``ChannelGraph.kept_at``)."""
    nodes = [n for n in cap.graph.nodes if n.op == "call_function"]
    outputs = set(cap.output_nodes)
    within = {n: set(_stack(n)) for n in nodes}
    handed = {}
    for module in modules:
        inside = [n for n in nodes if module in within[n]]
        handed[module] = tuple(
            n.name for n in inside if isinstance(n.meta.get("val"), torch.Tensor)
            and (n in outputs or any(module not in within.get(u, ()) for u in n.users)))
    return handed


def verification_points(cap: Capture) -> Optional[Boundary]:
    """The boundary of ``cap``'s data-dependent tail, or None when it has none (or when no
    module lies before it to verify at: then the outputs are compared as usual)."""
    nodes = [n for n in cap.graph.nodes if n.op == "call_function"]
    stacks = {n: _stack(n) for n in nodes}
    tainted: set[torch.fx.Node] = set()
    sources = []
    for node in nodes:
        if _selects(node):
            tainted.add(node)
            sources.append(node)
        elif any(i in tainted for i in node.all_input_nodes):
            tainted.add(node)
    if not sources:
        return None
    dirty = {m for n in tainted for m in stacks[n]}
    params = set(cap.param_names)

    chosen: list[str] = []
    seen: set[torch.fx.Node] = set()

    def claim(node: torch.fx.Node) -> None:
        """The outermost clean module computing ``node``; else look at what it reads."""
        if node in seen or node.op != "call_function" or node in tainted:
            return
        seen.add(node)
        clean = [m for m in stacks[node] if m not in dirty]
        if clean:
            if not any(clean[0] == c or clean[0].startswith(c + ".") for c in chosen):
                chosen[:] = [c for c in chosen if not c.startswith(clean[0] + ".")]
                chosen.append(clean[0])
            return
        for arg in node.all_input_nodes:
            if arg.name not in params:
                claim(arg)

    for node in nodes:
        if node not in tainted and any(u in tainted for u in node.users):
            claim(node)
    for out in cap.output_nodes:
        claim(out)
    owners = {fqn.rpartition(".")[0] for fqn in cap.param_names.values()}
    chosen = [m for m in chosen if any(o == m or o.startswith(m + ".") for o in owners)]
    if not chosen:  # only weightless values (anchors) before the selection
        return None
    ops = []
    for node in sources:
        where = stacks[node]
        text = f"{_packet(node).split('.')[-1]}" + (f" in {where[-1]}" if where else "")
        if text not in ops:
            ops.append(text)
    # tensors made from parameters alone are weights too: a packed projection's chunks
    # (pruned attention's ``in_proj_weight.chunk(3)``), a transposed or sliced weight
    weights = set(params)
    for node in nodes:
        if node.all_input_nodes and all(a.name in weights for a in node.all_input_nodes):
            weights.add(node.name)
    # layers with weights that run on selected values, by their innermost module
    layers = sorted({stacks[n][-1] for n in tainted
                     if stacks[n] and any(a.name in weights for a in n.all_input_nodes)})
    order: dict[str, int] = {}  # modules in the order the graph first computes in them
    for node in nodes:
        for m in stacks[node]:
            order.setdefault(m, len(order))
    return Boundary(tuple(sorted(chosen, key=lambda m: order.get(m, 0))), tuple(ops),
                    frozenset(n.name for n in tainted), tuple(layers))
