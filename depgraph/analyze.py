"""Channel analysis: one walk over the captured graph, then a union-find.

Every parameter and buffer gets fresh atoms on every dim. Rules propagate atom maps from
node to node and record which atoms must be pruned together, which are frozen, and which are
inexact. Atoms that never reach an activation (kernel dims, say) are not channels at all.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx

from . import rules  # noqa: F401 - registers the rule table
from .atoms import AtomTable, UnionFind
from .capture import Capture
from .errors import AnalysisError
from .graph import ChannelGraph, FrozenChannels, Group, Slice, Unit
from .rules.registry import RuleContext, lookup

__all__ = ["analyze"]


def _map_args(args: Any, env: dict) -> Any:
    if isinstance(args, torch.fx.Node):
        return env.get(args.name)
    if isinstance(args, (list, tuple)):
        return [_map_args(a, env) for a in args]
    return None


def _arrays(value: Any):
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _arrays(v)


def _inputs_of(node: torch.fx.Node):
    return node.all_input_nodes


def analyze(cap: Capture) -> ChannelGraph:
    """Find the pruning units, groups and frozen channels of a captured model.

    Args:
        cap: the result of :func:`depgraph.capture`.

    Returns:
        A :class:`ChannelGraph`.

    Raises:
        AnalysisError: a rule failed on a node; the message names the node and source line.

    Example:
        >>> import torch
        >>> from depgraph import capture
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
        ...                         torch.nn.Conv2d(8, 4, 3))
        >>> g = analyze(capture(m, torch.randn(1, 3, 16, 16)))
        >>> len(g.units)  # the 8 hidden channels; inputs and outputs are frozen
        8
    """
    ctx = RuleContext(AtomTable(), cap.param_names)
    env: dict[str, Any] = {}
    activation: set[str] = set(cap.input_names)
    live: list[np.ndarray] = []
    param_atoms: dict[str, tuple] = {}

    for node in cap.graph.nodes:
        if node.op == "placeholder":
            fqn = cap.param_names.get(node.name)
            val = node.meta.get("val")
            if fqn is not None and isinstance(val, torch.Tensor):
                amap = tuple(ctx.atoms.new(int(s)) for s in val.shape)
                param_atoms[fqn] = amap
                env[node.name] = amap
            continue
        if node.op != "call_function":
            continue
        inputs = _map_args(list(node.args), env)
        is_activation = any(n.name in activation for n in _inputs_of(node))
        if is_activation:
            activation.add(node.name)
        if not any(True for _ in _arrays(inputs)):
            continue  # no channel flows in: nothing to do (constants, shapes, index math)
        rule = lookup(node.target)
        ctx.node = node
        try:
            if rule is None:
                value = _barrier(ctx, node, inputs)
            else:
                value = _apply(ctx, rule, node, inputs)
        except AnalysisError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the node's location
            raise AnalysisError(_rule_failure(node, exc)) from exc
        env[node.name] = value
        if is_activation:
            live.extend(_arrays(value))

    for out in cap.output_nodes:
        ctx.node = out
        ctx.freeze(env.get(out.name), f"reaches the model output '{out.name}'")
    return _resolve(ctx, param_atoms, live, cap)


def _apply(ctx: RuleContext, rule, node: torch.fx.Node, inputs: list) -> Any:
    result = rule(ctx, node, inputs)
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        if len(result) != len(val):
            raise AnalysisError(f"rule {rule.__name__} returned {len(result)} outputs for "
                                f"{node.format_node()}, which has {len(val)}")
        return tuple(result)
    (single,) = result
    if single is not None and isinstance(val, torch.Tensor) and len(single) != val.dim():
        raise AnalysisError(f"rule {rule.__name__} returned a rank-{len(single)} map for "
                            f"rank-{val.dim()} {node.format_node()}")
    return single


# Unknown ops fail closed: every atom flowing in freezes, nothing flows out.
def _barrier(ctx: RuleContext, node: torch.fx.Node, inputs: list) -> Any:
    ctx.freeze(inputs, f"unsupported op {ctx.where()} (add a rule in depgraph/rules to prune "
                       f"through it)")
    val = node.meta.get("val")
    return tuple(None for _ in val) if isinstance(val, (tuple, list)) else None


def _rule_failure(node: torch.fx.Node, exc: Exception) -> str:
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    source = f"\n  from: {trace[-2].strip()} {trace[-1].strip()}" if len(trace) >= 2 else ""
    return (f"channel rule failed while analysing {node.format_node()}: "
            f"{type(exc).__name__}: {exc}{source}\nThis is a bug in the rule for "
            f"{node.target}; please report it with the model.")


def _resolve(ctx: RuleContext, param_atoms: dict, live: list, cap: Capture) -> ChannelGraph:
    uf = UnionFind(ctx.atoms.count)
    for a, b in ctx.unions:
        uf.union_arrays(a, b)
    roots = uf.roots()
    live_roots = np.zeros(ctx.atoms.count, dtype=bool)
    if live:
        live_roots[roots[np.concatenate(live)]] = True

    frozen_reason: dict[int, str] = {}
    for arr, why in ctx.frozen:
        for r in np.unique(roots[arr]).tolist():
            frozen_reason.setdefault(r, why)
    inexact_reason: dict[int, str] = {}
    for arr, why in ctx.inexact:
        for r in np.unique(roots[arr]).tolist():
            inexact_reason.setdefault(r, why)
    is_frozen = np.zeros(ctx.atoms.count, dtype=bool)
    if frozen_reason:
        is_frozen[np.fromiter(frozen_reason, dtype=np.int64)] = True

    # Number units by first appearance (parameters in graph order): deterministic ids.
    unit_of_root: dict[int, int] = {}
    unit_index: dict[tuple[str, int], np.ndarray] = {}
    frozen_dims: dict[str, list] = {}
    for fqn, amap in param_atoms.items():
        for dim, atoms in enumerate(amap):
            r = roots[atoms]
            channel = live_roots[r] | is_frozen[r]  # explicitly frozen dims are channels too
            if not channel.any():
                continue
            prunable = channel & ~is_frozen[r]
            ids = np.full(len(atoms), -1, dtype=np.int64)
            for i in np.nonzero(prunable)[0].tolist():
                ids[i] = unit_of_root.setdefault(int(r[i]), len(unit_of_root))
            unit_index[(fqn, dim)] = ids
            frozen_here = channel & is_frozen[r]
            if frozen_here.any():
                per_reason: dict[str, int] = {}
                for root, count in zip(*np.unique(r[frozen_here], return_counts=True)):
                    why = frozen_reason[int(root)]
                    per_reason[why] = per_reason.get(why, 0) + int(count)
                for why, count in per_reason.items():
                    frozen_dims.setdefault(why, []).append((fqn, dim, count))

    n_units = len(unit_of_root)
    root_of_unit = np.empty(n_units, dtype=np.int64)
    for root, u in unit_of_root.items():
        root_of_unit[u] = root

    # Units sharing a parameter dim belong to one group.
    guf = UnionFind(n_units)
    for ids in unit_index.values():
        members = np.unique(ids[ids >= 0])
        if len(members) > 1:
            guf.union_arrays(members[:-1], members[1:])
    group_root = guf.roots() if n_units else np.empty(0, dtype=np.int64)
    group_ids: dict[int, int] = {}
    for u in range(n_units):
        group_ids.setdefault(int(group_root[u]), len(group_ids))
    unit_group = [group_ids[int(group_root[u])] for u in range(n_units)]

    slices: list[list[Slice]] = [[] for _ in range(n_units)]
    group_dims: list[list] = [[] for _ in group_ids]
    group_frozen = [0] * len(group_ids)
    for (fqn, dim), ids in unit_index.items():
        prunable = ids >= 0
        if not prunable.any():
            continue
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        start = np.searchsorted(sorted_ids, 0)
        members, first = np.unique(sorted_ids[start:], return_index=True)
        bounds = list(first + start) + [len(ids)]
        for k, u in enumerate(members.tolist()):
            idx = tuple(sorted(order[bounds[k]:bounds[k + 1]].tolist()))
            slices[u].append(Slice(fqn, dim, idx))
        g = unit_group[int(members[0])]
        group_dims[g].append((fqn, dim, len(ids)))
        group_frozen[g] += int((~prunable).sum())

    contracted_roots = set(np.unique(roots[np.concatenate(ctx.contracted)]).tolist()) \
        if ctx.contracted else set()
    units = []
    for u in range(n_units):
        root = int(root_of_unit[u])
        note = inexact_reason.get(root)
        units.append(Unit(u, unit_group[u], tuple(slices[u]), exact=note is None, note=note,
                          contracted=root in contracted_roots))
    members_of: list[list[int]] = [[] for _ in group_ids]
    for u, g in enumerate(unit_group):
        members_of[g].append(u)
    groups = [Group(g, tuple(members_of[g]), tuple(group_dims[g]), group_frozen[g])
              for g in range(len(group_ids))]
    frozen = [FrozenChannels(reason, tuple(dims)) for reason, dims in frozen_dims.items()]
    shapes = {fqn: tuple(len(a) for a in amap) for fqn, amap in param_atoms.items()}
    return ChannelGraph(units, groups, frozen, unit_index, shapes, set(ctx.consumers),
                        list(ctx.layers), notes=list(cap.notes))

