"""Channel analysis: one walk over the captured graph, then a union-find.

Every parameter and buffer gets fresh atoms on every dim. Rules propagate atom maps from
node to node and record which atoms must be pruned together, which are frozen, and which are
inexact. Atoms that never reach an activation (kernel dims, say) are not channels at all.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.fx

from . import rules  # noqa: F401 - registers the rule table
from .atoms import AtomTable, UnionFind
from .capture import Capture
from .errors import AnalysisError
from .graph import ChannelGraph, FrozenChannels, Group, Unit, inside
from .rules.layers import COSTED_WITHOUT_CHANNELS
from .rules.registry import RuleContext, lookup, node_outputs

__all__ = ["analyze", "check_head_mode", "HEAD_MODES"]


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


#: how head splits (a channel dim viewed as heads x head width) prune; see ``analyze``
HEAD_MODES = ("auto", "width", "count")


def analyze(cap: Capture, heads: str = "auto",
            watch: Optional[dict[str, Sequence[str]]] = None) -> ChannelGraph:
    """Find the pruning units, groups and frozen channels of a captured model.

    Args:
        cap: the result of :func:`depgraph.capture`.
        heads: how attention heads (a channel dim viewed as heads x head width) prune.
            ``"width"``: every head keeps its place and narrows alike (the head count stays);
            ``"count"``: whole heads go (the head width stays), in every module where they
            do not freeze (the notes name those that keep widths); ``"auto"`` (default): by
            width, except in modules where the head width cannot change (rotary tables, a
            per-head norm, a width fixed in Python), which prune whole heads when that frees
            more channels. The graph's notes name the modules that prune whole heads.
        watch: module -> the nodes whose values it hands on (:func:`depgraph.boundary.
            handed_on`): the graph records their channels (``ChannelGraph.points``), so that
            a check comparing those modules' outputs compares the channels a plan keeps.

    Returns:
        A :class:`ChannelGraph`.

    Raises:
        AnalysisError: a rule failed on a node; the message names the node and source line.
        ValueError: ``heads`` is not one of ``HEAD_MODES``.

    Example:
        >>> import torch
        >>> from depgraph import capture
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
        ...                         torch.nn.Conv2d(8, 4, 3))
        >>> g = analyze(capture(m, torch.randn(1, 3, 16, 16)))
        >>> len(g.units)  # the 8 hidden channels; inputs and outputs are frozen
        8
    """
    check_head_mode(heads)
    watch = dict(watch or {})
    graph, fixed, split = _analyze_once(cap, frozenset(), watch)
    whole = split if heads == "count" else fixed if heads == "auto" else set()
    if not whole:
        return graph
    by_count, froze, _ = _analyze_once(cap, frozenset(whole), watch)
    # a split that is no head split (MHA's q/k/v of ``unflatten(-1, (3, E))``, then picked by
    # index) freezes as heads too: those modules keep widths
    back, whole = sorted(whole & froze), whole - froze
    notes = [f"whole heads would freeze in {_listed(back)}: they prune by width"] \
        if back and heads == "count" else []
    if not whole:
        graph.notes += notes
        return graph
    if back:
        by_count = _analyze_once(cap, frozenset(whole), watch)[0]
    if heads == "auto" and _prunable(by_count) <= _prunable(graph):
        return graph
    why = "" if heads == "count" else " (their head width cannot change)"
    by_count.notes += notes + [f"prunes whole attention heads in {len(whole)} modules{why}: "
                               f"{_listed(sorted(whole))}"]
    return by_count


def check_head_mode(heads: str) -> None:
    """Raise ValueError unless ``heads`` is one of ``HEAD_MODES``."""
    if heads not in HEAD_MODES:
        raise ValueError(f"heads={heads!r}: expected one of {', '.join(HEAD_MODES)}")


def _listed(names: list[str]) -> str:
    return ", ".join(f"'{m}'" for m in names[:4]) + (f" and {len(names) - 4} more"
                                                      if len(names) > 4 else "")


def _prunable(graph: ChannelGraph) -> int:
    """Prunable entries over every channel-bearing parameter dim."""
    return sum(int((ids >= 0).sum()) for ids in graph.unit_index.values())


def _analyze_once(cap: Capture, whole_heads: frozenset[str],
                  watch: Optional[dict[str, Sequence[str]]] = None
                  ) -> tuple[ChannelGraph, set[str], set[str]]:
    """One walk and resolve, whole heads pruned in ``whole_heads``: the graph, the modules
    with a head split whose channels froze where attention runs, and every module with a
    head split."""
    ctx = RuleContext(AtomTable(), cap.param_names, whole_heads=whole_heads)
    env: dict[str, Any] = {}
    activation: set[str] = set(cap.input_names)
    live: list[np.ndarray] = []
    param_atoms: dict[str, tuple] = {}

    for node in cap.graph.nodes:
        if node.op == "placeholder":
            fqn = cap.param_names.get(node.name)
            val = node.meta.get("val")
            if fqn in param_atoms:  # a tied tensor seen under another name: the same channels
                env[node.name] = param_atoms[fqn]
                continue
            if fqn is not None and isinstance(val, torch.Tensor):
                amap = tuple(ctx.atoms.new(int(s)) for s in val.shape)
                param_atoms[fqn] = amap
                env[node.name] = amap
                if fqn in cap.fixed:
                    ctx.freeze(amap, cap.fixed[fqn])
            continue
        if node.op != "call_function":
            continue
        inputs = _map_args(list(node.args), env)
        # capture normalised arguments to schema positions: what is left in kwargs is
        # keyword-only, which rules do not read, so channels there freeze (fail closed)
        keyword = {k: m for k, m in zip(node.kwargs, _map_args(list(node.kwargs.values()), env))
                   if any(True for _ in _arrays(m))}
        is_activation = any(n.name in activation for n in _inputs_of(node))
        if is_activation:
            activation.add(node.name)
        if not any(True for _ in _arrays(inputs)) and not keyword and \
                getattr(node.target, "overloadpacket", None) not in COSTED_WITHOUT_CHANNELS \
                and not any(n.name in ctx.statistics for n in _inputs_of(node)):
            continue  # no channel flows in: nothing to do (constants, shapes, index math)
        rule = lookup(node.target)
        ctx.node = node
        try:
            if rule is None:
                value = _barrier(ctx, node, inputs + list(keyword.values()))
            else:
                if keyword:
                    ctx.freeze(list(keyword.values()),
                               f"{ctx.where()} takes channels by keyword-only argument "
                               f"{', '.join(keyword)}, which its rule does not read")
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
    watched = {m: [env.get(name) for name in names] for m, names in (watch or {}).items()}
    return _resolve(ctx, param_atoms, live + ctx.internal, cap, watched)


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
    outs = node_outputs(node)
    return tuple(None for _ in outs) if isinstance(node.meta.get("val"), (tuple, list)) else None


def _rule_failure(node: torch.fx.Node, exc: Exception) -> str:
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    source = f"\n  from: {trace[-2].strip()} {trace[-1].strip()}" if len(trace) >= 2 else ""
    return (f"channel rule failed while analysing {node.format_node()}: "
            f"{type(exc).__name__}: {exc}{source}\nThis is a bug in the rule for "
            f"{node.target}; please report it with the model.")


def _first_seen_ranks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``values`` numbered by first appearance: (distinct values sorted, their ranks)."""
    distinct, first = np.unique(values, return_index=True)
    ranks = np.empty(len(distinct), dtype=np.int64)
    ranks[np.argsort(first, kind="stable")] = np.arange(len(distinct))
    return distinct, ranks


def _reasons(roots: np.ndarray, records: list, n: int) -> tuple[np.ndarray, list[str]]:
    """Per root, the index (+1) of the first record that covers it; 0 when none does."""
    first = np.zeros(n, dtype=np.int64)
    texts: list[str] = []
    for arr, why in records:
        r = roots[arr]
        fresh = r[first[r] == 0]
        if len(fresh):
            texts.append(why)
            first[fresh] = len(texts)
    return first, texts


def _resolve(ctx: RuleContext, param_atoms: dict, live: list, cap: Capture,
             watched: dict[str, list]) -> tuple[ChannelGraph, set[str], set[str]]:
    n = ctx.atoms.count
    uf = UnionFind(n)
    for a, b in ctx.unions:
        uf.union_arrays(a, b)
    roots = uf.roots()
    live_root = np.zeros(n, dtype=bool)
    if live:
        live_root[roots[np.concatenate(live)]] = True
    frozen_by, frozen_texts = _reasons(roots, ctx.frozen + ctx.pinned, n)
    loud = _reasons(roots, ctx.frozen, n)[0] > 0 if ctx.pinned else frozen_by > 0
    inexact_by, inexact_texts = _reasons(roots, [(a, w) for a, w in ctx.inexact], n)
    contracted = np.zeros(n, dtype=bool)
    if ctx.contracted:
        contracted[roots[np.concatenate(ctx.contracted)]] = True
    dropped = np.zeros(n, dtype=bool)
    if ctx.dropped:
        dropped[roots[np.concatenate(ctx.dropped)]] = True

    # Channel-bearing parameter dims, in graph order, with each index's root.
    keys, key_roots = [], []
    for fqn, amap in param_atoms.items():
        for dim, atoms in enumerate(amap):
            r = roots[atoms]
            if (live_root[r] | loud[r]).any():  # explicitly frozen dims count too
                keys.append((fqn, dim))
                key_roots.append(r)
    all_roots = np.concatenate(key_roots) if key_roots else np.empty(0, dtype=np.int64)
    prunable = live_root[all_roots] & (frozen_by[all_roots] == 0)

    # Units: prunable roots numbered by first appearance, so ids are deterministic.
    unit_roots, unit_rank = _first_seen_ranks(all_roots[prunable])
    unit_of = np.full(len(all_roots), -1, dtype=np.int64)
    unit_of[prunable] = unit_rank[np.searchsorted(unit_roots, all_roots[prunable])]
    n_units = len(unit_roots)
    root_of_unit = np.empty(n_units, dtype=np.int64)
    root_of_unit[unit_rank] = unit_roots
    bounds = np.cumsum([0] + [len(r) for r in key_roots])
    unit_index = {key: unit_of[bounds[i]:bounds[i + 1]] for i, key in enumerate(keys)}

    # Groups: units that share a parameter dim.
    guf = UnionFind(n_units)
    for ids in unit_index.values():
        members = np.unique(ids[ids >= 0])
        if len(members) > 1:
            guf.union_arrays(members[:-1], members[1:])
    group_roots, group_rank = _first_seen_ranks(guf.roots())
    unit_group = group_rank[np.searchsorted(group_roots, guf.roots())]
    n_groups = len(group_roots)
    group_dims: list[list] = [[] for _ in range(n_groups)]
    group_frozen = np.zeros(n_groups, dtype=np.int64)
    frozen_dims: dict[int, list] = {}
    for i, (key, ids) in enumerate(zip(keys, unit_index.values())):
        present = ids[ids >= 0]
        if len(present):
            g = int(unit_group[present[0]])
            group_dims[g].append((key[0], key[1], len(ids)))
            group_frozen[g] += int((ids < 0).sum())
        reason_ids = frozen_by[key_roots[i]]
        for reason, count in zip(*np.unique(reason_ids[reason_ids > 0], return_counts=True)):
            frozen_dims.setdefault(int(reason), []).append((key[0], key[1], int(count)))

    members_of: list[list[int]] = [[] for _ in range(n_groups)]
    for u, g in enumerate(unit_group.tolist()):
        members_of[g].append(u)
    units = []
    for u in range(n_units):
        root = int(root_of_unit[u])
        note = inexact_texts[inexact_by[root] - 1] if inexact_by[root] else None
        units.append(Unit(u, int(unit_group[u]), exact=note is None, note=note,
                          contracted=bool(contracted[root]), dropped=bool(dropped[root])))
    groups = [Group(g, tuple(members_of[g]), tuple(group_dims[g]), int(group_frozen[g]))
              for g in range(n_groups)]
    frozen = [FrozenChannels(frozen_texts[r - 1], tuple(dims))
              for r, dims in sorted(frozen_dims.items())]
    shapes = {fqn: tuple(len(a) for a in amap) for fqn, amap in param_atoms.items()}
    def unit_ids(atoms: np.ndarray) -> np.ndarray:
        r = roots[atoms]
        pos = np.clip(np.searchsorted(unit_roots, r), 0, max(len(unit_roots) - 1, 0))
        hit = (unit_roots[pos] == r) if len(unit_roots) else np.zeros(len(r), dtype=bool)
        return np.where(hit, unit_rank[pos] if len(unit_rank) else -1, -1)

    layer_units = {i: tuple(unit_ids(a) for a in arrays)
                   for i, arrays in ctx.layer_atoms.items()}
    sizes = [(module, tuple(unit_ids(a) for _, a in parts if a is not None))
             for module, parts in ctx.sizes]
    changing = {m for m, arrays in sizes if any((ids >= 0).any() for ids in arrays)}
    sizes = [(m, arrays) for m, arrays in sizes if m in changing]  # the rest never change
    counts = sorted({(m, n) for m, parts in ctx.sizes if m in changing
                     for n, a in parts if a is None})
    splits = [(m, parts) for m, parts in ((m, tuple(unit_ids(a) for a in atoms))
                                          for m, atoms in ctx.splits)
              if any((ids >= 0).any() for ids in parts)]
    points = {m: tuple(tuple(None if a is None else unit_ids(a) for a in amap)
                       if isinstance(amap, tuple) else None for amap in maps)
              for m, maps in watched.items()}
    graph = ChannelGraph(units, groups, frozen, unit_index, shapes, set(ctx.consumers),
                         list(ctx.layers), notes=list(cap.notes), buffers=set(cap.buffers),
                         layer_units=layer_units, sizes=sizes, splits=splits, counts=counts,
                         precision=_precision(cap, ctx.layers), points=points)
    split = {m for m, _ in ctx.head_splits if m is not None}
    # whole heads are tried only where attention runs (in the module, or around or inside
    # it): YOLO's DFL and R-CNNs' per-anchor views froze too, and a second analysis of those
    # models (0.1-0.3 s) gained nothing
    fixed = {m for m, atoms in ctx.head_splits
             if m is not None and (frozen_by[roots[atoms]] > 0).any()
             and any(inside(a, m) or inside(m, a) for a in ctx.attention)}
    return graph, fixed, split


def _precision(cap: Capture, layers: list) -> torch.dtype:
    """The least precise float dtype among the layers' outputs (see ``ChannelGraph``)."""
    named = {n.name: n for n in cap.graph.nodes}
    dtypes = [val.dtype for layer in layers
              if isinstance(val := named[layer.node].meta.get("val"), torch.Tensor)
              and val.dtype.is_floating_point]
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float32)
