"""The result of analysis: pruning units, groups, frozen channels, and views of them.

Vocabulary:
    slice   one parameter dimension and the indices along it, e.g. ``layer1.0.conv1.weight``
            dim 0, indices (3, 17).
    unit    the smallest thing that can be pruned: an equivalence class of channel atoms.
            Removing a unit removes every slice it owns, in every parameter and buffer.
    group   units that share a layer dimension (transitively): a residual stage, a concat
            block. Allocation normalises scores and enforces widths per group.
    frozen  channels that must never be pruned, each with the reason.
    exact   a unit whose removal leaves the remaining outputs unchanged once its consumers'
            input slices are zeroed (not true through LayerNorm/GroupNorm statistics).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from .rules.registry import LayerUse

__all__ = ["Slice", "Unit", "Group", "FrozenChannels", "ChannelGraph", "inside"]


def _left(ids: np.ndarray, removed: np.ndarray) -> int:
    """How many of the positions ``ids`` (unit ids) stay once ``removed`` go."""
    return len(ids) - int(np.isin(ids, removed).sum())


def inside(name: str, module: str) -> bool:
    """Whether the module called ``name`` is ``module`` or sits in it ("" is the model)."""
    return module == "" or name == module or name.startswith(module + ".")


@dataclass(frozen=True)
class Slice:
    """Indices along one dimension of one parameter or buffer."""

    param: str
    dim: int
    indices: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.param}[dim {self.dim}: {len(self.indices)}]"


@dataclass(frozen=True)
class Unit:
    """A set of channels that is pruned as one; its slices are ``ChannelGraph.slices(id)``."""

    id: int
    group: int
    exact: bool = True
    note: Optional[str] = None  # why the unit is inexact
    contracted: bool = False  # multiplied between two activations (attention q.k)
    dropped: bool = False  # an op discards it (past a prefix slice); see dead_units

    def __str__(self) -> str:
        return f"Unit({self.id}, group={self.group}{'' if self.exact else ', inexact'})"


@dataclass(frozen=True)
class Group:
    """Units that must keep a common layout; ``dims`` are the layer dims they span."""

    id: int
    units: tuple[int, ...]
    dims: tuple[tuple[str, int, int], ...]  # (param, dim, size) for every layer dim touched
    frozen: int = 0  # frozen channels living in the same dims

    @property
    def layers(self) -> tuple[str, ...]:
        """Owning module names, in first-seen order."""
        seen: dict[str, None] = {}
        for param, _, _ in self.dims:
            seen.setdefault(param.rpartition(".")[0], None)
        return tuple(seen)

    def __str__(self) -> str:
        return f"Group({self.id}, units={len(self.units)}, layers={len(self.layers)})"


@dataclass(frozen=True)
class FrozenChannels:
    """Channels that are never pruned, and why."""

    reason: str
    dims: tuple[tuple[str, int, int], ...]  # (param, dim, number of frozen indices)

    @property
    def count(self) -> int:
        return sum(n for _, _, n in self.dims)

    def __str__(self) -> str:
        return f"{self.count} channels: {self.reason}"


@dataclass
class ChannelGraph:
    """Coupled channels of a captured model.

    Attributes:
        units: every prunable unit, by id.
        groups: every group, by id.
        frozen: frozen channels grouped by reason.
        unit_index: ``(param, dim) -> array`` with the unit id of every index (-1: not prunable).
        param_shapes: shape of every parameter and buffer seen in the graph.
        consumers: ``(param, dim)`` pairs that read channels (conv/linear inputs).
        layers: every weighted op call, in graph order.
        precision: the least precise float dtype a layer computes in (bfloat16 under
            ``torch.autocast`` in a float32 model): outputs carry its rounding.
        points: for modules a check compares (``analyze(watch=)``), per tensor each hands
            on, the unit id (-1: fixed) of every index of each dim (None: no channels).
    """

    units: list[Unit]
    groups: list[Group]
    frozen: list[FrozenChannels]
    unit_index: dict[tuple[str, int], np.ndarray]
    param_shapes: dict[str, tuple[int, ...]]
    consumers: set[tuple[str, int]]
    layers: list[LayerUse]
    notes: list[str] = field(default_factory=list)
    buffers: set[str] = field(default_factory=set)
    # layer index -> unit id (-1: fixed) of every channel its cost scales with, for layers
    # without a weight (attention's q @ k); see depgraph.cost
    layer_units: dict[int, tuple[np.ndarray, ...]] = field(default_factory=dict)
    # (module, unit id per position of each width) for widths that module's code passes as
    # Python numbers (split sizes, a view's new dims); see ``size_changes``
    sizes: list[tuple[str, tuple[np.ndarray, ...]]] = field(default_factory=list)
    # (module, unit id per position of each part) of every split by such numbers
    splits: list[tuple[str, tuple[np.ndarray, ...]]] = field(default_factory=list)
    # (module, number) of counts that module's code passes beside those widths, which never
    # change (a view's head count): see ``size_changes``
    counts: list[tuple[str, int]] = field(default_factory=list)
    precision: torch.dtype = torch.float32
    points: dict[str, tuple] = field(default_factory=dict)

    def __str__(self) -> str:
        return (f"ChannelGraph(units={len(self.units)}, groups={len(self.groups)}, "
                f"frozen={sum(f.count for f in self.frozen)})")

    # ---- queries -------------------------------------------------------------------------
    def slices(self, unit: int) -> tuple[Slice, ...]:
        """Every parameter slice that removing ``unit`` removes."""
        return self._slices_by_unit.get(unit, ())

    @functools.cached_property
    def _slices_by_unit(self) -> dict[int, tuple[Slice, ...]]:
        out: dict[int, list[Slice]] = {}
        for (param, dim), ids in self.unit_index.items():
            order = np.argsort(ids, kind="stable")
            sorted_ids = ids[order]
            start = int(np.searchsorted(sorted_ids, 0))
            members, first = np.unique(sorted_ids[start:], return_index=True)
            ends = list(first[1:] + start) + [len(ids)]
            for u, lo, hi in zip(members.tolist(), (first + start).tolist(), ends):
                out.setdefault(u, []).append(Slice(param, dim, tuple(order[lo:hi].tolist())))
        return {u: tuple(s) for u, s in out.items()}

    def dead_units(self) -> list[int]:
        """Units that change nothing: an op drops them and no weight reads them.

        Removing them is exact and free (they still cost FLOPs where they are computed), so
        ``prune()`` removes them before allocation, whatever the target.
        """
        return [u.id for u in self.units if u.dropped and u.exact and not u.contracted
                and not any((s.param, s.dim) in self.consumers for s in self.slices(u.id))]

    def size_changes(self, removed: "set[int] | frozenset[int]") -> dict[str, dict[int, int]]:
        """Per module, ``old -> new`` for each width its code passes as a number that removing
        ``removed`` changes (``x.split((self.c, self.c))``: 128 -> 120), and ``old -> old``
        for one that stays everywhere (so that an attribute equal to it is not taken for
        another width of that value that shrinks). A width that would become two different
        sizes, or stay in one place and change in another, is left out: no single attribute
        value could serve both. The whole a module's code splits by such numbers counts as one
        more width (``splits``) where none of its parts has that width. A count the code
        passes beside them (``counts``: 16 heads) stays, unless a width of the same value
        changes (a key width of 16): surgery then keeps it in the head-count attributes only
        (``Plan.counts``)."""
        removed_arr = np.fromiter(removed, dtype=np.int64, count=len(removed))
        seen: dict[str, dict[int, set[int]]] = {}
        for module, arrays in self.sizes:
            for ids in arrays:
                new = _left(ids, removed_arr)
                seen.setdefault(module, {}).setdefault(len(ids), set()).add(new)
        wholes: dict[str, dict[int, set[int]]] = {}
        for module, parts in self.splits:  # a part of the same width speaks for itself
            ids = np.concatenate(parts)
            if len(ids) not in seen.get(module, {}):
                new = _left(ids, removed_arr)
                wholes.setdefault(module, {}).setdefault(len(ids), set()).add(new)
        for module, olds in wholes.items():
            seen.setdefault(module, {}).update(olds)
        for module, n in self.counts:  # a count stays, unless a width of its value changes:
            seen.setdefault(module, {}).setdefault(n, {n})  # then only HEAD_COUNTS keep it
        out: dict[str, dict[int, int]] = {}
        for module, olds in seen.items():
            out[module] = {old: next(iter(news)) for old, news in olds.items() if len(news) == 1}
        return {module: widths for module, widths in out.items() if widths}

    def count_clashes(self, changes: dict[str, dict[int, int]]) -> dict[str, list[int]]:
        """Per module, the counts (``counts``) equal to a width ``changes`` (``size_changes``)
        shrinks: the head-count attributes holding them stay."""
        out: dict[str, list[int]] = {}
        for module, n in self.counts:
            if changes.get(module, {}).get(n, n) != n:
                out.setdefault(module, []).append(n)
        return out

    def split_changes(self, removed: "set[int] | frozenset[int]"
                      ) -> dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]]:
        """Per module, ``(old sizes, new sizes)`` of each split by numbers whose parts removing
        ``removed`` changes, in order: a list attribute equal to the old sizes takes the new
        ones (FocalNet's ``split(x, self.input_split)`` with q narrower than the context, where
        the width they share, changing in one place only, cannot be rewritten by value)."""
        removed_arr = np.fromiter(removed, dtype=np.int64, count=len(removed))
        out: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        for module, parts in self.splits:
            old = tuple(len(ids) for ids in parts)
            new = tuple(_left(ids, removed_arr) for ids in parts)
            if new != old and (old, new) not in out.get(module, []):
                out.setdefault(module, []).append((old, new))
        return out

    def _renumbered(self, mapping: np.ndarray) -> dict:
        """The unit-id-bearing fields other than ``unit_index``, through ``mapping`` (old id ->
        new id, its last slot -1 -> -1)."""
        return {"layer_units": {i: tuple(mapping[ids] for ids in arrays)
                                for i, arrays in self.layer_units.items()},
                "sizes": [(m, tuple(mapping[ids] for ids in arrays)) for m, arrays in self.sizes],
                "splits": [(m, tuple(mapping[ids] for ids in parts)) for m, parts in self.splits],
                "counts": self.counts,
                "points": {m: tuple(None if amap is None else
                                    tuple(None if ids is None else mapping[ids] for ids in amap)
                                    for amap in maps) for m, maps in self.points.items()}}

    def kept_at(self, at: Sequence[str], removed: Iterable[int]) -> Optional[list]:
        """Per tensor the modules ``at`` hand on (in order, as ``points`` records them), per
        dim: None where it keeps its width, else (its full width, the indices that stay once
        ``removed`` go). None when a module's tensors are not recorded, or none narrows."""
        if any(m not in self.points for m in at):
            return None
        gone = np.fromiter(removed, dtype=np.int64)
        kept = [None if amap is None else tuple(
                    None if ids is None or not np.isin(ids, gone).any()
                    else (len(ids), np.nonzero(~np.isin(ids, gone))[0]) for ids in amap)
                for m in at for amap in self.points[m]]
        return kept if any(k and any(d is not None for d in k) for k in kept) else None

    def exact_units(self) -> list[int]:
        return [u.id for u in self.units if u.exact]

    def kept_indices(self, removed: set[int] | frozenset[int]) -> dict[tuple[str, int], np.ndarray]:
        """For every channel-bearing parameter dim, the indices that stay once ``removed`` go."""
        removed_arr = np.fromiter(removed, dtype=np.int64, count=len(removed))
        return {key: np.nonzero(~np.isin(ids, removed_arr))[0]
                for key, ids in self.unit_index.items()}

    def prunable_share(self, kind: str = "conv") -> tuple[int, int]:
        """(prunable, total) output channels over all layers of ``kind`` (e.g. "conv")."""
        prunable = total = 0
        seen = set()
        for layer in self.layers:
            if layer.kind != kind or layer.weight is None or layer.out_dim is None:
                continue
            key = (layer.weight, layer.out_dim)
            if key in seen:
                continue
            seen.add(key)
            ids = self.unit_index.get(key)
            total += self.param_shapes[layer.weight][layer.out_dim]
            prunable += int((ids >= 0).sum()) if ids is not None else 0
        return prunable, total

    def units_of(self, param: str) -> set[int]:
        """Every unit that owns a slice of ``param`` (on any dim)."""
        out: set[int] = set()
        for (p, _), ids in self.unit_index.items():
            if p == param:
                out.update(int(u) for u in np.unique(ids[ids >= 0]))
        return out

    def with_inexact(self, units: set[int], note: str) -> "ChannelGraph":
        """A copy in which ``units`` are marked inexact with ``note`` (the rest is shared)."""
        marked = [dataclasses.replace(u, exact=False, note=u.note or note) if u.id in units
                  else u for u in self.units]
        return ChannelGraph(marked, self.groups, self.frozen, self.unit_index, self.param_shapes,
                            self.consumers, self.layers, notes=list(self.notes),
                            buffers=self.buffers, layer_units=self.layer_units,
                            sizes=self.sizes, splits=self.splits, counts=self.counts,
                            precision=self.precision,
                            points=self.points)

    def without_groups(self, reasons: dict[int, str]) -> "ChannelGraph":
        """A new graph in which the units of the given groups are frozen with ``reasons``.

        Remaining units and groups are renumbered in their original order.
        """
        dropped = {u for g in reasons for u in self.groups[g].units}
        keep_units = [u for u in self.units if u.id not in dropped]
        keep_groups = [g for g in self.groups if g.id not in reasons]
        new_unit = np.full(len(self.units) + 1, -1, dtype=np.int64)  # last slot maps -1 -> -1
        for i, u in enumerate(keep_units):
            new_unit[u.id] = i
        new_group = {g.id: i for i, g in enumerate(keep_groups)}
        units = [dataclasses.replace(u, id=i, group=new_group[u.group])
                 for i, u in enumerate(keep_units)]
        groups = [Group(i, tuple(int(new_unit[u]) for u in g.units), g.dims, g.frozen)
                  for i, g in enumerate(keep_groups)]
        frozen = list(self.frozen)
        for g, why in sorted(reasons.items()):
            members = np.asarray(self.groups[g].units, dtype=np.int64)
            dims = tuple((p, d, int(np.isin(ids, members).sum()))
                         for (p, d), ids in self.unit_index.items())
            frozen.append(FrozenChannels(why, tuple(x for x in dims if x[2])))
        unit_index = {key: new_unit[ids] for key, ids in self.unit_index.items()}
        return ChannelGraph(units, groups, frozen, unit_index, self.param_shapes, self.consumers,
                            self.layers, notes=list(self.notes), buffers=self.buffers,
                            precision=self.precision, **self._renumbered(new_unit))

    def with_merged(self, pairs: list[tuple[int, int]]) -> tuple["ChannelGraph", np.ndarray]:
        """A new graph in which each pair of units is one unit (their groups one group), and
        the old -> new unit id map (the last slot maps -1 to -1).

        For widths that must stay *equal in number* without being the same channels (an
        attention that reshapes its projection by the width of its input): tying channel
        ``j`` of one to channel ``j`` of the other keeps the counts equal whatever is removed.
        """
        parent: dict[int, int] = {}

        def root(u: int) -> int:
            while parent.get(u, u) != u:
                parent[u] = parent.get(parent[u], parent[u])
                u = parent[u]
            return u

        for a, b in pairs:
            ra, rb = root(int(a)), root(int(b))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        roots = np.arange(len(self.units), dtype=np.int64)
        for u in parent:
            roots[u] = root(u)
        _, new_unit = np.unique(roots, return_inverse=True)
        # groups: those of tied units become one, numbered by their first old group
        gparent = {g.id: g.id for g in self.groups}

        def groot(g: int) -> int:
            while gparent[g] != g:
                g = gparent[g]
            return g

        for u in parent:
            ga, gb = groot(self.units[u].group), groot(self.units[int(roots[u])].group)
            if ga != gb:
                gparent[max(ga, gb)] = min(ga, gb)
        group_ids = sorted({groot(g.id) for g in self.groups})
        new_group = {g: i for i, g in enumerate(group_ids)}
        members: dict[int, set[int]] = {}  # every old unit of a tied class, its root too
        for u in parent:
            members.setdefault(int(new_unit[u]), set()).update((u, int(roots[u])))
        units = []
        for u in self.units:
            i = int(new_unit[u.id])
            if len(units) > i:  # a tied unit after the first of its class
                continue
            olds = sorted(members.get(i, [u.id]))
            notes = [self.units[o].note for o in olds if self.units[o].note]
            units.append(Unit(i, new_group[groot(u.group)],
                              exact=all(self.units[o].exact for o in olds),
                              note=notes[0] if notes else None,
                              contracted=any(self.units[o].contracted for o in olds),
                              dropped=all(self.units[o].dropped for o in olds)))
        by_group: dict[int, list[Group]] = {}
        for old in self.groups:
            by_group.setdefault(new_group[groot(old.id)], []).append(old)
        unit_ids: dict[int, list[int]] = {}
        for unit in units:
            unit_ids.setdefault(unit.group, []).append(unit.id)
        groups = [Group(i, tuple(unit_ids.get(i, ())),
                        tuple(dict.fromkeys(d for old in olds for d in old.dims)),
                        sum(old.frozen for old in olds))
                  for i, olds in sorted(by_group.items())]
        mapping = np.append(new_unit.astype(np.int64), -1)
        unit_index = {key: mapping[ids] for key, ids in self.unit_index.items()}
        return ChannelGraph(units, groups, list(self.frozen), unit_index, self.param_shapes,
                            self.consumers, self.layers, notes=list(self.notes),
                            buffers=self.buffers, precision=self.precision,
                            **self._renumbered(mapping)), mapping

    # ---- views ---------------------------------------------------------------------------
    def to_networkx(self):
        """A graph of layers (modules) whose channels are coupled.

        Nodes are module names with ``kind`` and ``params``; an edge joins two modules whose
        parameters share at least one pruning unit, with the shared ``groups`` and ``units``.
        """
        import networkx as nx

        g = nx.Graph()
        kinds = {l.weight.rpartition(".")[0]: l.kind for l in self.layers if l.weight}
        owners: dict[int, set[str]] = {}
        for (param, dim), ids in self.unit_index.items():
            module = param.rpartition(".")[0]
            if not g.has_node(module):
                g.add_node(module, kind=kinds.get(module, "other"), params=[])
            g.nodes[module]["params"].append((param, dim))
            for u in np.unique(ids[ids >= 0]).tolist():
                owners.setdefault(u, set()).add(module)
        for u, modules in owners.items():
            ordered = sorted(modules)
            for i, a in enumerate(ordered):
                for b in ordered[i + 1:]:
                    data = g.get_edge_data(a, b) or {"units": 0, "groups": set()}
                    data["units"] += 1
                    data["groups"].add(self.units[u].group)
                    g.add_edge(a, b, **data)
        return g

    def summary(self, max_rows: int = 20) -> str:
        """A printable table of groups and frozen channels."""
        lines = [str(self)]
        conv_p, conv_t = self.prunable_share("conv")
        if conv_t:
            lines.append(f"prunable conv output channels: {conv_p}/{conv_t} "
                         f"({100 * conv_p / conv_t:.1f}%)")
        lines.append(f"{'group':>5}  {'units':>5}  {'frozen':>6}  layers")
        for grp in self.groups[:max_rows]:
            names = ", ".join(grp.layers[:4]) + (" ..." if len(grp.layers) > 4 else "")
            lines.append(f"{grp.id:>5}  {len(grp.units):>5}  {grp.frozen:>6}  {names}")
        if len(self.groups) > max_rows:
            lines.append(f"  ... {len(self.groups) - max_rows} more groups")
        lines.append("frozen:")
        for fr in self.frozen:
            where = ", ".join(f"{p}[{d}]" for p, d, _ in fr.dims[:3])
            more = " ..." if len(fr.dims) > 3 else ""
            lines.append(f"  {fr.count:>6}  {fr.reason}  ({where}{more})")
        return "\n".join(lines)
