"""Plans: the kept channels of every pruned parameter dim, as JSON (no pickle).

A plan re-applies to a freshly constructed model without tracing it, so a pruned checkpoint
loads with ``apply_plan(build_model(), Plan.load(path)); model.load_state_dict(...)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from depgraph.errors import PruningError
from depgraph.graph import ChannelGraph

from .copying import is_compiled
from .reparam import lift, restore
from .surgery import apply_kept

__all__ = ["Plan", "apply_plan"]

_TYPE = "pruners.Plan"
_COMPILED = "_orig_mod."  # torch.compile's wrapper names the module it wraps so
_VERSION = 1


@dataclass(frozen=True)
class Plan:
    """``kept[param][dim]`` lists the indices that stay; ``shapes`` the original shapes;
    ``sizes[module]`` maps old to new widths that module's code passes as numbers (its int
    attributes holding them are rewritten; ``old -> old``: a width that stays, which an
    attribute rewrite by value must not take for another; see ``ChannelGraph.size_changes``);
    ``splits[module]`` lists ``(old sizes, new sizes)`` of its splits by numbers, in order (a
    list attribute equal to the old sizes takes the new; ``ChannelGraph.split_changes``);
    ``counts[module]``: head counts equal to a width that shrinks, which the head-count
    attributes keep (``ChannelGraph.count_clashes``)."""

    kept: dict[str, dict[int, list[int]]]
    shapes: dict[str, tuple[int, ...]]
    meta: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, dict[int, int]] = field(default_factory=dict)
    splits: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = \
        field(default_factory=dict)
    counts: dict[str, list[int]] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"Plan({len(self.kept)} tensors pruned, {self.meta.get('model', '?')})"

    @classmethod
    def from_units(cls, graph: ChannelGraph, removed: "set[int] | list[int]",
                   meta: Optional[dict[str, Any]] = None) -> "Plan":
        """The plan that removes ``removed`` units of ``graph``: every dim that shrinks."""
        kept: dict[str, dict[int, list[int]]] = {}
        for (p, d), idx in sorted(graph.kept_indices(set(removed)).items()):
            if len(idx) != graph.param_shapes[p][d]:
                kept.setdefault(p, {})[d] = idx.tolist()
        sizes = graph.size_changes(set(removed))
        return cls(kept, {p: tuple(graph.param_shapes[p]) for p in kept}, dict(meta or {}),
                   sizes, graph.split_changes(set(removed)), graph.count_clashes(sizes))

    def then(self, later: "Plan") -> "Plan":
        """The composition: apply ``self``, then ``later`` (whose indices count in the model
        ``self`` left). ``apply_plan(fresh, a.then(b))`` equals applying ``a`` and then ``b``.

        Example:
            >>> a = Plan({"w": {0: [0, 2, 3]}}, {"w": (4, 2)})
            >>> b = Plan({"w": {0: [1, 2], 1: [1]}}, {"w": (3, 2)})
            >>> a.then(b).kept
            {'w': {0: [2, 3], 1: [1]}}
        """
        kept = {p: dict(dims) for p, dims in self.kept.items()}
        for p, dims in later.kept.items():
            for d, idx in dims.items():
                before = self.kept.get(p, {}).get(d)
                kept.setdefault(p, {})[d] = [before[i] for i in idx] if before is not None else list(idx)
        shapes = {p: self.shapes.get(p, later.shapes.get(p)) for p in kept}
        sizes = {m: dict(changes) for m, changes in self.sizes.items()}
        for m, changes in later.sizes.items():
            first = sizes.setdefault(m, {})
            mids = set(first.values())
            for old, mid in list(first.items()):  # a width changed twice
                first[old] = changes.get(mid, mid)
            first.update({o: n for o, n in changes.items() if o not in mids and o not in first})
        splits = {m: list(pairs) for m, pairs in self.splits.items()}
        for m, pairs in later.splits.items():
            first_pairs = splits.setdefault(m, [])
            then = dict(pairs)  # sizes after self -> after later
            first_pairs[:] = [(old, then.pop(mid, mid)) for old, mid in first_pairs]
            first_pairs += list(then.items())  # splits self left alone
        counts = {m: sorted(set(self.counts.get(m, [])) | set(later.counts.get(m, [])))
                  for m in {*self.counts, *later.counts}}
        return Plan(kept, shapes, {**self.meta, **later.meta}, sizes, splits, counts)

    def unwrapped(self) -> "Plan":
        """This plan, made on a ``torch.compile``'d model (whose names start with
        ``_orig_mod.``), named for the module it wraps."""
        def bare(name: str) -> str:
            return name[len(_COMPILED):] if name.startswith(_COMPILED) else \
                ("" if name == _COMPILED[:-1] else name)

        return Plan({bare(p): dims for p, dims in self.kept.items()},
                    {bare(p): shape for p, shape in self.shapes.items()}, dict(self.meta),
                    {bare(m): changes for m, changes in self.sizes.items()},
                    {bare(m): pairs for m, pairs in self.splits.items()},
                    {bare(m): ns for m, ns in self.counts.items()})

    def to_dict(self) -> dict:
        return {"type": _TYPE, "version": _VERSION, "meta": self.meta,
                "shapes": {k: list(v) for k, v in self.shapes.items()},
                "kept": {p: {str(d): list(map(int, idx)) for d, idx in dims.items()}
                         for p, dims in self.kept.items()},
                "sizes": {m: {str(o): int(n) for o, n in changes.items()}
                          for m, changes in self.sizes.items()},
                "splits": {m: [[list(old), list(new)] for old, new in pairs]
                           for m, pairs in self.splits.items()},
                "counts": {m: [int(n) for n in ns] for m, ns in self.counts.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """Rebuild a plan; only this type and version load."""
        if not isinstance(data, dict) or data.get("type") != _TYPE:
            raise PruningError(f"not a pruning plan: expected type {_TYPE!r}, got "
                               f"{data.get('type') if isinstance(data, dict) else type(data)!r}")
        if data.get("version") != _VERSION:
            raise PruningError(f"plan version {data.get('version')} is not supported "
                               f"(this library reads version {_VERSION})")
        kept = {p: {int(d): [int(i) for i in idx] for d, idx in dims.items()}
                for p, dims in data["kept"].items()}
        shapes = {k: tuple(int(s) for s in v) for k, v in data["shapes"].items()}
        sizes = {m: {int(o): int(n) for o, n in changes.items()}
                 for m, changes in data.get("sizes", {}).items()}
        splits = {m: [(tuple(int(s) for s in old), tuple(int(s) for s in new))
                      for old, new in pairs] for m, pairs in data.get("splits", {}).items()}
        counts = {m: [int(n) for n in ns] for m, ns in data.get("counts", {}).items()}
        return cls(kept, shapes, dict(data.get("meta", {})), sizes, splits, counts)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str) -> "Plan":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Prune ``model`` (freshly built, same architecture) in place as ``plan`` says.

    Raises:
        SurgeryError: the model does not have the plan's parameters or shapes; the model is
            unchanged.

    Example:
        >>> import torch
        >>> from pruners import prune
        >>> make = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
        ...                                    torch.nn.Conv2d(8, 4, 1))
        >>> result = prune(make(), torch.randn(1, 3, 8, 8), channel_ratio=0.5)
        >>> fresh = apply_plan(make(), result.plan)
        >>> fresh[0].out_channels
        4
    """
    compiled = is_compiled(model)
    if compiled and not any(p.startswith(_COMPILED) for p in plan.kept):
        apply_plan(model._orig_mod, plan)  # a plan made on the model before torch.compile
        return model
    if not compiled and plan.kept and all(p.startswith(_COMPILED) for p in plan.kept):
        plan = plan.unwrapped()  # made on a torch.compile'd model, applied to a plain one
    kept = {(p, d): idx for p, dims in plan.kept.items() for d, idx in dims.items()}
    lifted = lift(model)  # pruning masks, weight/spectral norm: slice the plain weights
    try:
        apply_kept(model, kept, plan.shapes, plan.sizes, plan.splits, plan.counts)
    except BaseException:
        restore(model, lifted, {})  # unchanged widths: put every reparametrization back
        raise
    return restore(model, lifted, plan.kept)
