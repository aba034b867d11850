"""Allocation: which units to remove to meet a target, from scores and the cost model.

Global strategy: every group offers its lowest-scoring units in chunks (``round_to`` units,
the first chunk sized so the kept count becomes a multiple of ``round_to``; fewer where a unit
is several channels wide, a whole attention head: see ``unit_step``); a heap takes the
cheapest chunk across all groups until the cost meets the target. Uniform strategy: every
group loses the same fraction (searched by bisection for FLOPs/params targets). Sensitivity
strategy: the same heap, keyed by the predicted metric loss per unit of cost that the chunk
removes (from ``losses``, the curves of a sensitivity scan); unscanned groups stay whole.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np

from depgraph.cost import CostModel
from depgraph.errors import PruningError
from depgraph.graph import ChannelGraph

__all__ = ["Target", "allocate", "InfeasibleTargetError"]


# Stop as soon as the cost is within this much below the target (fractions of the original).
_TOLERANCE = 0.005


class InfeasibleTargetError(PruningError):
    """The target cannot be met with what is prunable; the message gives the reachable value.

    ``reachable`` is the smallest fraction that can be kept (None if unknown).
    """

    def __init__(self, message: str, reachable: Optional[float] = None) -> None:
        super().__init__(message)
        self.reachable = reachable


@dataclass(frozen=True)
class Target:
    """``kind`` is "flops", "params" or "latency" (fraction of the original to keep) or
    "channels" (fraction of every group's channels to remove)."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("flops", "params", "latency", "channels"):
            raise ValueError(f"unknown target kind {self.kind!r}")
        if not 0.0 < self.value <= 1.0:
            raise ValueError(f"target_{self.kind if self.kind != 'channels' else 'ratio'} must "
                             f"be in (0, 1], got {self.value}")


def objective(cost: CostModel, target: Target, latency: Any = None
              ) -> Callable[[np.ndarray], float]:
    """``kept widths -> fraction of the original`` for the target's kind: FLOPs or params
    from the cost model, latency from ``latency`` (an object with ``evaluate(kept)`` and
    ``full()`` seconds: a :class:`pruners.latency.LatencyModel`)."""
    if target.kind == "latency":
        if latency is None:
            raise ValueError("a latency target needs a latency model (pruners.latency)")
        full = latency.full() or 1.0
        return lambda kept: latency.evaluate(kept) / full
    which = 0 if target.kind == "flops" else 1
    full = cost.full()[which] or 1.0
    return lambda kept: cost.evaluate(kept)[which] / full


class _State:
    """Kept width of every channel dim, updated one unit at a time.

    Every dim keeps at least ``min_channels`` and ``1 - max_ratio`` of its width, whatever
    the coupling: a conv whose outputs join a concat shares its group with the other inputs,
    and the group-level ``max_ratio`` alone would let it shrink to one channel.
    """

    def __init__(self, graph: ChannelGraph, cost: CostModel, min_channels: int = 1,
                 max_ratio: float = 1.0,
                 value: Optional[Callable[[np.ndarray], float]] = None) -> None:
        self.cost = cost
        self.value = value
        self.kept = cost.sizes.copy()
        self.floor = np.maximum(min_channels, cost.sizes - np.floor(max_ratio * cost.sizes))
        # (dim, channels) each unit holds, counted in one pass: per dim and unit in Python,
        # a ViT-H's 200 dims per residual channel took seconds
        n = len(graph.units)
        index = {k: i for i, k in enumerate(cost.keys)}
        codes = [index[key] * n + ids[ids >= 0] for key, ids in cost.index.items()]
        pairs, counts = np.unique(np.concatenate(codes) if codes else np.zeros(0, np.int64),
                                  return_counts=True)
        dims, units = np.divmod(pairs, n)
        order = np.argsort(units, kind="stable")
        # unit u holds counts[i] channels of dim dims[i] for i in bounds[u]:bounds[u + 1]
        self.dims, self.counts = dims[order].tolist(), counts[order].tolist()
        self.bounds = np.searchsorted(units[order], np.arange(n + 1)).tolist()

    def _held(self, u: int) -> Iterator[tuple[int, int]]:
        a, b = self.bounds[u], self.bounds[u + 1]
        return zip(self.dims[a:b], self.counts[a:b])

    def allows(self, units: list[int]) -> bool:
        need: dict[int, int] = {}
        for u in units:
            for k, n in self._held(u):
                need[k] = need.get(k, 0) + n
        return all(self.kept[k] - n >= self.floor[k] for k, n in need.items())

    def remove(self, units: list[int], sign: int = 1) -> None:
        for u in units:
            for k, n in self._held(u):
                self.kept[k] -= sign * n

    def ratio(self) -> float:
        """The target's measure of the current widths, as a fraction of the original."""
        return self.value(self.kept)


def allocate(graph: ChannelGraph, scores: np.ndarray, cost: CostModel, target: Target, *,
             strategy: Union[str, Callable] = "global", round_to: int = 1, min_channels: int = 1,
             max_ratio: float = 0.9, protected: Optional[set[int]] = None,
             free: Optional[set[int]] = None,
             losses: Optional[dict[int, Callable[[float], float]]] = None,
             latency: Any = None) -> list[int]:
    """The units to remove, sorted. See the module docstring.

    ``strategy`` may also be a function ``(graph, scores, cost, target) -> units to remove``
    (``prune_iteratively`` passes one); protected units are never removed.

    ``latency`` is the cost of a "latency" target (a :class:`pruners.latency.LatencyModel`).

    ``free`` units (dead channels: ``ChannelGraph.dead_units``) are removed first, outside
    ``round_to``, as far as no layer dim falls under its floor (``min_channels`` and
    ``1 - max_ratio`` of its width); the rest is allocated on top of them.

    Raises:
        InfeasibleTargetError: the target cannot be met; the message states the smallest
            reachable value under the given constraints.
    """
    if not callable(strategy) and strategy not in ("global", "uniform", "sensitivity"):
        raise ValueError("strategy must be 'global', 'uniform', 'sensitivity' or a function, "
                         f"got {strategy!r}")
    if strategy == "sensitivity" and losses is None:
        raise ValueError("strategy='sensitivity' needs the loss curves of a sensitivity scan "
                         "(prune(..., sensitivity=pruners.sensitivity(...)))")
    if round_to < 1 or min_channels < 1 or not 0 < max_ratio <= 1:
        raise ValueError("need round_to >= 1, min_channels >= 1 and 0 < max_ratio <= 1")
    protected = protected or set()
    value = objective(cost, target, latency) if target.kind != "channels" else None
    dead = _dead_within_floors(_State(graph, cost, min_channels, max_ratio),
                               sorted(set(free or ()) - protected))
    if callable(strategy):  # a policy of the caller's: (graph, scores, cost, target) -> units
        chosen = {int(u) for u in strategy(graph, scores, cost, target)}
        bad = [u for u in chosen if not 0 <= u < len(graph.units)]
        if bad:
            raise ValueError(f"strategy returned unknown unit ids {sorted(bad)[:10]}")
        return sorted((chosen - protected) | set(dead))
    skip = protected | set(dead)
    candidates = {g.id: sorted((u for u in g.units if u not in skip),
                               key=lambda u: (scores[u], u)) for g in graph.groups
                  if strategy != "sensitivity" or g.id in losses}
    if target.kind == "channels":
        return sorted(dead + _uniform(graph, cost, candidates, target.value, round_to,
                                      min_channels, dead, max_ratio))
    if strategy == "uniform":
        return sorted(dead + _uniform_to_cost(graph, cost, candidates, target, round_to,
                                              min_channels, max_ratio, dead, value))
    key = _sensitivity_key(graph, cost, losses, value) if strategy == "sensitivity" else None
    return _global(graph, scores, cost, candidates, target, round_to, min_channels, max_ratio,
                   dead, key, value)


def _dead_within_floors(state: _State, dead: list[int]) -> list[int]:
    """The dead units that can go without any dim falling under its floor (in id order)."""
    if state.allows(dead):
        return dead
    out = []
    for u in dead:
        if state.allows([u]):
            state.remove([u])
            out.append(u)
    return out


def _sensitivity_key(graph: ChannelGraph, cost: CostModel,
                     losses: dict[int, Callable[[float], float]],
                     value: Callable[[np.ndarray], float]) -> Callable:
    """Heap key of a chunk: predicted loss added per unit of cost removed (one unit's cost,
    measured alone on the dense widths, stands for each unit of its group)."""
    per_unit = {}
    for g in graph.groups:
        if g.id in losses and g.units:
            kept = cost.kept_after(graph, {g.units[0]})
            per_unit[g.id] = max(1.0 - value(kept), 1e-12)

    def key(gid: int, before: int, chunk: list[int]) -> float:
        n = len(graph.groups[gid].units)
        loss = losses[gid]
        added = loss((before + len(chunk)) / n) - loss(before / n)
        return added / (per_unit[gid] * len(chunk))

    return key


def unit_step(graph: ChannelGraph, gid: int, round_to: int) -> int:
    """How many of group ``gid``'s units make ``round_to`` channels' worth: ``round_to``
    divided by what it shares with the channels every unit is in each dim it touches (a whole
    head of 64 channels: 1 unit for any ``round_to`` up to 64)."""
    if round_to == 1:
        return 1
    width = 0  # a dim's units all belong to its group
    for param, dim, _ in graph.groups[gid].dims:
        ids = graph.unit_index[(param, dim)]
        width = int(np.gcd.reduce(np.unique(ids[ids >= 0], return_counts=True)[1],
                                  initial=width))
        if width == 1:
            break
    return round_to // int(np.gcd(round_to, max(width, 1)))


def _chunks(n_units: int, order: list[int], round_to: int, limit: int) -> list[list[int]]:
    """Successive removal chunks keeping ``n_units - removed`` a multiple of ``round_to``."""
    stop = min(limit, len(order))
    first = n_units % round_to or round_to
    if first > stop:
        return []
    return [order[:first]] + [order[a:a + round_to]
                              for a in range(first, stop - round_to + 1, round_to)]


def _global(graph, scores, cost, candidates, target, round_to, min_channels, max_ratio, dead,
            key=None, value=None):
    """``key(group, units removed before, chunk)`` orders the chunks (default: mean score).

    The chunks are tried in a fixed order (:func:`_in_order`); each one that the floors allow
    is removed unless it takes the cost under the target: within ``_TOLERANCE`` it is the last,
    further under it is put back (remembered as the best overshoot) and the next is tried.
    A FLOPs or parameter cost only falls as units go, so chunks are removed in batches, the
    cost evaluated once per batch; a batch that ends under the target is undone and replayed
    one chunk at a time: the same result as evaluating after every chunk, which on a ViT-H
    (80 000 chunks) took seconds. A latency cost may rise as a width crosses a kernel's step,
    so it is evaluated after every chunk.
    """
    state = _State(graph, cost, min_channels, max_ratio, value)
    state.remove(dead)
    if state.ratio() <= target.value:
        return list(dead)
    chunks = {gid: _chunks(len(graph.groups[gid].units), order, unit_step(graph, gid, round_to),
                           int(np.floor(max_ratio * len(graph.groups[gid].units))))
              for gid, order in candidates.items()}
    removed: list[int] = list(dead)
    best: Optional[tuple[float, list[int]]] = None  # closest result below target - tolerance
    batch = 1 if target.kind in ("flops", "params") else 0  # 0: evaluate after every chunk
    order = _in_order(chunks, scores, key)
    while True:
        tried = [chunks[g][i] for g, i in itertools.islice(order, max(batch, 1))]
        if not tried:
            break
        if batch:
            kept = []
            for chunk in tried:
                if state.allows(chunk):
                    state.remove(chunk)
                    kept.append(chunk)
            if state.ratio() > target.value:  # every chunk of the batch stays
                removed.extend(u for c in kept for u in c)
                batch = min(2 * batch, 4096)
                continue
            for c in reversed(kept):  # undone, then replayed one at a time from here on
                state.remove(c, sign=-1)
            batch = 0
        for chunk in tried:
            if not state.allows(chunk):
                continue  # it would take a dim under its floor; the group goes on
            state.remove(chunk)
            ratio = state.ratio()
            if ratio > target.value:
                removed.extend(chunk)
            elif ratio >= target.value - _TOLERANCE:
                return sorted(removed + chunk)
            else:  # overshot: remember it, put the chunk back, and look for a smaller step
                if best is None or ratio > best[0]:
                    best = (ratio, removed + chunk)
                state.remove(chunk, sign=-1)
    if best is not None:
        return _refine(state, best[1], scores, target, min_channels, round_to, set(dead))
    reachable = state.ratio()
    raise InfeasibleTargetError(
        f"target_{target.kind}={target.value:g} cannot be met: with everything prunable removed "
        f"(max_ratio={max_ratio:g}, min_channels={min_channels}, round_to={round_to}) the model "
        f"keeps {reachable:.4f} of its {target.kind}. Ask for at least {np.ceil(reachable * 1000) / 1000:.3f}, "
        f"or relax max_ratio / protect / round_to.", reachable)


def _in_order(chunks: dict[int, list[list[int]]], scores: np.ndarray,
              key: Optional[Callable] = None) -> Iterator[tuple[int, int]]:
    """(group, chunk index) by rising rank across groups, each group's chunks in turn: a merge
    of the groups by ``key`` (default: the chunk's mean score). The order depends on the scores
    alone, not on what is removed."""
    def rank(gid: int, i: int) -> float:
        chunk = chunks[gid][i]
        if key is not None:
            return key(gid, sum(len(c) for c in chunks[gid][:i]), chunk)
        return float(scores[chunk[0]]) if len(chunk) == 1 else float(np.mean(scores[chunk]))

    heap = [(rank(gid, 0), gid, 0) for gid, cs in chunks.items() if cs]
    heapq.heapify(heap)
    while heap:
        _, gid, i = heapq.heappop(heap)
        yield gid, i
        if i + 1 < len(chunks[gid]):
            heapq.heappush(heap, (rank(gid, i + 1), gid, i + 1))


def _refine(state: _State, removed: list[int], scores: np.ndarray, target: Target,
            min_channels: int, round_to: int, dead: set[int],
            budget: int = 20000) -> list[int]:
    """Close the gap when the greedy overshot: add back, or swap, single units while the cost
    stays at or under the target. Only runs on coarse models (few, expensive units), and only
    with ``round_to == 1`` (swaps would break the multiples)."""
    if round_to != 1:
        return sorted(removed)
    current = set(removed)
    state.kept = state.cost.sizes.copy()
    state.remove(removed)

    def ratio() -> float:
        return state.ratio()

    value = ratio()
    improved = True
    while improved and budget > 0 and value < target.value - _TOLERANCE:
        improved = False
        # add back one unit, or add back one and remove another, taking the best that fits
        best_move, best_value = None, value
        for back in sorted(current - dead, key=lambda u: -scores[u]):
            state.remove([back], sign=-1)
            budget -= 1
            v = ratio()
            if best_value < v <= target.value:
                best_move, best_value = ([back], []), v
            for extra in range(len(scores)):
                if budget <= 0 or extra in current or extra == back:
                    continue
                if not state.allows([extra]):
                    continue
                state.remove([extra])
                budget -= 1
                v = ratio()
                if best_value < v <= target.value:
                    best_move, best_value = ([back], [extra]), v
                state.remove([extra], sign=-1)
            state.remove([back])
        if best_move is not None:
            back, extra = best_move
            state.remove(back, sign=-1)
            state.remove(extra)
            current -= set(back)
            current |= set(extra)
            value, improved = best_value, True
    return sorted(current)


def _uniform(graph, cost, candidates, ratio, round_to, min_channels, dead=(), max_ratio=1.0):
    """Every group loses ``ratio`` of its units (``dead`` ones already gone, not returned)."""
    state = _State(graph, cost, min_channels, max_ratio)
    state.remove(list(dead))
    removed: list[int] = []
    for gid, order in candidates.items():
        n = len(graph.groups[gid].units)
        want = int(np.floor(ratio * n))
        take = []
        for chunk in _chunks(n, order, unit_step(graph, gid, round_to), want):
            if not state.allows(take + chunk):
                break
            take += chunk
        state.remove(take)
        removed.extend(take)
    return sorted(removed)


def _uniform_to_cost(graph, cost, candidates, target, round_to, min_channels, max_ratio, dead,
                     objective_of):
    def ratio_for(r: float) -> tuple[float, list[int]]:
        units = _uniform(graph, cost, candidates, r, round_to, min_channels, dead, max_ratio)
        return objective_of(cost.kept_after(graph, set(units) | set(dead))), units

    lo, hi = 0.0, max_ratio
    reached, best = ratio_for(hi)
    if reached > target.value:
        raise InfeasibleTargetError(
            f"target_{target.kind}={target.value:g} cannot be met uniformly: removing "
            f"{max_ratio:g} of every group keeps {reached:.4f}; use strategy='global' or a "
            f"target of at least {np.ceil(reached * 1000) / 1000:.3f}", reached)
    for _ in range(30):
        mid = (lo + hi) / 2
        value, units = ratio_for(mid)
        if value <= target.value:
            hi, best = mid, units
        else:
            lo = mid
    return best
