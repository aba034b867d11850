"""Find groups that the model's own Python code cannot prune, by running it.

The graph is traced with fixed shapes, so every width the code computes is a number in it.
Surgery rewrites the attributes that hold the ones it sees passed to splits and views
(``x.split((self.c, self.c))``, ``view(B, self.num_heads, self.head_dim, N)``), but not a width
written into the code (``x.split(4, 1)``) or read from another tensor. After surgery such code
raises, returns a different output structure, or silently computes something else. We prune
one unit of each group, check the result against the masked original, and bisect over groups
until every offending group is isolated; those are then frozen with the failure as reason.
Where a forward takes seconds, probes run on fake tensors first (``pruners.screen``): what
raises or changes a shape is found without computing anything. ``prune()`` probes with
``compare=False`` (shapes against ``probe_run``'s dense run, no masked forward) and leaves
outputs to the plan's check, or to exact-only probes when that check cannot compare.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from depgraph.errors import SurgeryError, VerificationError
from depgraph.graph import ChannelGraph, inside

from .screen import FakeUnsupported, ShapeScreen, _throwaway, fake_shapes, serves
from .verify import DenseRun, _run_at, run_model, verify

__all__ = ["find_unprunable_groups", "freeze_unprunable", "link_equal_sizes",
           "link_input_widths", "probe_inputs", "probe_run", "repair_graph"]


def _probe(graph: ChannelGraph, group: int, sole: set[int]) -> Optional[int]:
    """One unit of ``group``, exact if it has one: the smallest change that exposes a baked width.

    Units in ``sole`` hold every channel of some layer dim (a channel shuffle can fold a whole
    dim into one unit): removing one would empty the layer, which no plan does, so they are
    never probed; a group of only such units gets no probe (None).
    """
    units = [u for u in graph.groups[group].units if u not in sole]
    return next((u for u in units if graph.units[u].exact), units[0] if units else None)


def _sole_units(graph: ChannelGraph) -> set[int]:
    return {int(ids[0]) for ids in graph.unit_index.values()
            if len(ids) and ids[0] >= 0 and (ids == ids[0]).all()}


def find_unprunable_groups(model: nn.Module, graph: ChannelGraph, example_inputs: Any, *,
                           outputs: Optional[Callable] = None,
                           example_kwargs: Optional[dict] = None,
                           at: Optional[Sequence[str]] = None,
                           probes: Optional[dict[int, list[int]]] = None,
                           rtol: float = 1e-4, train_mode: bool = False,
                           train_inputs: Any = None,
                           where: Optional[dict[int, str]] = None,
                           dense: Optional[DenseRun] = None,
                           screen: Optional[ShapeScreen] = None, compare: bool = True,
                           exact_only: bool = False) -> dict[int, str]:
    """Groups whose pruning breaks the model, with what went wrong for each.

    A probe prunes one unit of each group and fails when the pruned model raises, changes its
    output structure, or (for exact units) differs from the original with those units' consumers
    zeroed: a size baked into Python can also give a silently wrong answer, as
    ``x.split(4, 1)`` does once 8 channels become 6. The model is not modified. Cost: about
    ``2 * k * log2(groups)`` probes when ``k`` groups are at fault. ``probes`` replaces the
    one-unit probes with given units per group (a plan's, to check it as a whole).
    ``train_mode`` also requires the pruned model to run in train mode (see ``verify``), on
    ``train_inputs`` when given (smaller ones do: that run only has to run). ``where``, when
    given, is filled with the module whose forward raised for each group found alone.
    ``dense`` (the unpruned model's run on these inputs) spares inexact probes, whose outputs
    are not compared, the masked forward (see ``verify``). ``screen`` (fake-tensor runs on
    ``example_inputs``, ``pruners.screen``) finds every one-unit probe that raises or changes
    an output's shape without computing anything; then only exact groups are probed for real,
    for outputs that differ. Where fake tensors cannot follow a probe, all run for real.
    ``compare=False`` (given ``dense`` on these inputs) compares no outputs: exact groups are
    probed like inexact ones, for what raises or changes a shape, on fake tensors where the
    screen serves and else by the pruned forward alone. A caller whose final check compares
    the plan's outputs saves the masked forwards; otherwise it compares later with
    ``exact_only=True``, which probes only exact groups.
    """
    # one-unit probes only compare the verified submodules: stop each forward there; a plan's
    # probes (after a failed check) run the whole model to find what broke it
    stop_early = probes is None
    if probes is None:
        sole = _sole_units(graph)
        chosen = {g.id: _probe(graph, g.id, sole) for g in graph.groups if g.units}
        probes = {g: [u] for g, u in chosen.items() if u is not None
                  and not (exact_only and not graph.units[u].exact)}

    fake = stop_early and serves(screen, example_inputs)

    def failure(groups: list[int]) -> tuple[Optional[str], Optional[str]]:
        """What went wrong with ``groups`` probed together (None: nothing), and the module
        whose forward raised, when one did."""
        units = [u for g in groups for u in probes[g]]
        try:
            if fake:  # raises FakeUnsupported where fake tensors cannot follow the probe
                screen.check(model, graph, units)
                return None, None
            result = verify(model, graph, units, example_inputs, outputs=outputs,
                            example_kwargs=example_kwargs, at=at, rtol=rtol,
                            train_mode=train_mode, stop_early=stop_early,
                            train_inputs=train_inputs, dense=dense, compare=compare)
        except (VerificationError, SurgeryError) as exc:
            return str(exc), _raising_module(exc)
        if compare and not result.ok and (result.inexact or all(graph.units[u].exact
                                                                 for u in units)):
            return f"outputs differ from the masked original ({result})", None
        return None, None

    found: dict[int, str] = {}
    layers = {g: graph.groups[g].layers for g in probes}

    def alone(group: int) -> bool:
        """Whether ``group`` fails on its own (then recorded as found)."""
        why, at_module = failure([group])
        if why is not None:
            found[group] = why
            if where is not None and at_module is not None:
                where[group] = at_module
        return why is not None

    def likes(new: list[int], pool: list[int]) -> None:
        """Probe alone the groups of ``pool`` laid out as one of ``new`` (just found): the same
        layers in the other blocks (stages of a Swin, scales of a detection head) most often
        fail alike, and each alone costs a fraction of a probe of the rest, which would fail
        at the next one. Per layout, stop at the first that runs."""
        tried: set[frozenset[str]] = set()
        for g in new:
            mine = _layout(layers[g])
            if mine in tried:
                continue
            tried.add(mine)
            for h in pool:
                if h not in found and _layout(layers[h]) == mine and not alone(h):
                    break

    def bisect(groups: list[int]) -> None:
        if not groups:  # nothing to probe: a forward of the unpruned model would say so
            return
        why, raised = failure(groups)
        if why is None:
            return
        if len(groups) == 1:
            found[groups[0]] = why
            if where is not None and raised is not None:
                where[groups[0]] = raised
            return
        before = set(found)
        # the groups with layers inside the module that raised are the likely culprits, the
        # most inside first: find one, then probe the rest again, before bisecting blindly.
        # A module no group reaches into (a layer only training runs, never traced) points at
        # its nearest enclosing module that some group does reach into.
        scope = _enclosing(raised, [n for g in groups for n in layers[g]]) if raised else None
        share = {g: sum(inside(n, scope) for n in layers[g]) / len(layers[g])
                 for g in groups} if scope else {}
        suspects = sorted((g for g in groups if share.get(g)), key=lambda g: -share[g])
        if 0 < len(suspects) < len(groups):
            if len(suspects) <= 8:  # one probe each, in that order, beats bisecting them
                next((g for g in suspects if alone(g)), None)
            else:
                bisect(suspects)
            if len(found) > len(before):
                likes([g for g in found if g not in before], groups)
                bisect([g for g in groups if g not in found])
                return
        half = len(groups) // 2
        bisect(groups[:half])
        likes([g for g in found if g not in before], groups[half:])
        bisect([g for g in groups[half:] if g not in found])
        if len(found) == len(before):  # fails only in combination: freeze the whole set
            found.update({g: why for g in groups})

    # exact and inexact groups are probed apart, fake or real, also where no outputs are
    # compared: a unit of every group at once can leave a block consistent (EfficientViM's
    # input and its heads shrinking together) where the heads alone break it, and repair
    # ties them then
    exact: list[int] = []
    inexact: list[int] = []
    for g in sorted(probes):
        (exact if all(graph.units[u].exact for u in probes[g]) else inexact).append(g)
    if fake:
        try:
            for groups in (exact, inexact):  # shapes
                bisect(groups)
            # what is left to run for real: exact groups' outputs, where compared
            exact, inexact = [g for g in exact if g not in found] if compare else [], []
        except FakeUnsupported:  # all over again, for real
            if where is not None:
                for g in found:
                    where.pop(g, None)
            found.clear()
        fake = False
    for groups in (exact, inexact):
        bisect(groups)
    return found


def _layout(names: list[str]) -> frozenset[str]:
    """Layer names but for block numbers (``stages.2.3.attn`` is ``stages.#.#.attn``): groups
    of the same layout sit in blocks built alike."""
    return frozenset(re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "#", n) for n in names)


def _enclosing(module: str, names: list[str]) -> str:
    """``module`` or its nearest parent that holds one of ``names`` ("" when none does)."""
    while module and not any(inside(n, module) for n in names):
        module = module.rpartition(".")[0]
    return module


def _raising_module(exc: BaseException) -> Optional[str]:
    """Name, in the model that ran, of the innermost module whose forward raised the error
    behind ``exc`` ("" for the model's own forward; None when no module's forward did)."""
    cause = exc.__cause__
    tb = cause.__traceback__ if cause is not None else None
    modules: list[nn.Module] = []
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and (not modules or owner is not modules[-1]):
            modules.append(owner)
        tb = tb.tb_next
    if not modules:
        return None
    names = {id(m): n for n, m in modules[0].named_modules()}  # the outermost ran the model
    return next((names[id(m)] for m in reversed(modules) if id(m) in names), None)


def probe_inputs(model: nn.Module, example_inputs: Any, *,
                 outputs: Optional[Callable] = None,
                 example_kwargs: Optional[dict] = None, min_side: int = 64) -> Any:
    """``example_inputs`` with every image-like tensor at half resolution, if the model takes it.

    A width baked into Python breaks the pruned model at any resolution the original runs at,
    so probing at half size finds the same groups with convolutions four times cheaper. Models
    tied to one size (a ViT's position embedding) fail on the smaller input; they are probed at
    the example's. The plan as a whole is still checked at the example's size.
    """
    return probe_run(model, DenseRun(example_inputs, []), outputs=outputs,
                     example_kwargs=example_kwargs, min_side=min_side).inputs


def probe_run(model: nn.Module, dense: DenseRun, *, outputs: Optional[Callable] = None,
              example_kwargs: Optional[dict] = None, min_side: int = 64,
              at: Optional[Sequence[str]] = None) -> DenseRun:
    """The unpruned model's run on :func:`probe_inputs` made from ``dense.inputs`` (``dense``
    itself where those are the example's): probes whose outputs are not compared check their
    shapes against it instead of running the masked original (``verify``). With ``at``
    (verification points, where probes compare instead) the run only checks that the model
    takes the smaller inputs, and stops once those submodules have run: past them, a random
    image at half size gave a Keypoint R-CNN more detections to run its heads on (6 s, four
    times its whole forward at full size). Its ``shapes`` are then those submodules'."""
    changed = False

    def half(t: Any) -> Any:
        nonlocal changed
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 3
                and min(t.shape[-2:]) >= 2 * min_side):
            return t
        changed = True
        size = [s // 2 for s in t.shape[-2:]]
        batched = t if t.dim() >= 4 else t.unsqueeze(0)
        out = F.interpolate(batched.flatten(0, -4), size=size, mode="bilinear",
                            align_corners=False)
        return out.reshape(*t.shape[:-2], *size)

    small = pytree.tree_map(half, dense.inputs)
    if not changed:
        return dense

    def run(m: nn.Module) -> list[torch.Tensor]:
        if at:
            return _run_at(m, list(at), small, example_kwargs, stop_early=True)
        return run_model(m, small, outputs, example_kwargs)

    start = time.perf_counter()
    if dense.fake:  # a real run would take seconds here too
        try:
            shapes = fake_shapes(run, _throwaway(model))
            return DenseRun(small, shapes, None, time.perf_counter() - start, fake=True)
        except FakeUnsupported:  # the real run below says
            start = time.perf_counter()
        except Exception:  # noqa: BLE001 - the model wants its own size
            return dense
    try:
        got = run(model)
    except Exception:  # noqa: BLE001 - the model wants its own size
        return dense
    return DenseRun(small, [tuple(t.shape) for t in got], None, time.perf_counter() - start)


def link_input_widths(model: nn.Module, graph: ChannelGraph, bad: dict[int, str],
                      where: dict[int, str], example_inputs: Any, *,
                      outputs: Optional[Callable] = None,
                      example_kwargs: Optional[dict] = None,
                      at: Optional[Sequence[str]] = None,
                      dense: Optional[DenseRun] = None,
                      screen: Optional[ShapeScreen] = None
                      ) -> tuple[ChannelGraph, dict[int, str], list[str]]:
    """Tie the heads of attention that reads its width from its input to that input.

    Swin's, MaxViT's, C2PSA's and many timm blocks reshape by ``C = x.shape[-1]``: their
    heads must stay ``C`` wide in total for the input's ``C`` columns, so the input's group
    cannot shrink alone (repair found it). For each such input group, the projections inside
    the module where it failed are tied to it, so the two keep equal counts (at the price of
    choosing the same channels): the heads' channels where that module views them back into
    a width of ``C`` go with input column ``c``, position by position; failing that (or with
    no such view), row ``j`` of a projection whose rows also failed alone goes with column
    ``j % C``. The first layout whose one-unit probe runs is kept. Returns the graph, what
    stays unprunable (renumbered), and notes. ``screen``: as in ``find_unprunable_groups``.
    """
    group_of = np.array([u.group for u in graph.units] + [-1], dtype=np.int64)
    # input group -> (rows group, projection, module, the rows' views back into the width)
    candidates: dict[int, list[tuple[int, str, list[np.ndarray]]]] = {}
    for (param, dim), rows in graph.unit_index.items():
        cols = graph.unit_index.get((param, 1))
        if dim != 0 or cols is None or len(rows) % len(cols) or len(rows) // len(cols) > 3:
            continue
        row_groups, col_groups = set(group_of[rows].tolist()), set(group_of[cols].tolist())
        if len(row_groups) != 1 or len(col_groups) != 1:
            continue
        (b,), (a,) = row_groups, col_groups
        if a == b or a not in bad or b < 0:
            continue
        # the module that raised when the rows shrank (or, for rows that probed fine, when
        # the input did, if that module views the rows' heads back into the input's width)
        module = where.get(b) if b in bad else where.get(a)
        if module is None or not inside(param.rpartition(".")[0], module):
            continue
        merged = _merged_widths(graph, group_of, b, module, len(cols))
        if b in bad or merged:
            candidates.setdefault(a, []).append((b, param, merged))
    linked: list[tuple[int, list[int], list[tuple[int, int]]]] = []
    for a, entries in sorted(candidates.items()):
        # two layouts, the first that probes fine is kept: position c of the heads as the
        # module views them back into a width of C (when it does) is input column c; else
        # row j of the projection is column j % C (rows that failed on their own only)
        views, rows_mod = [], []
        for b, param, merged in entries:
            rows, cols = graph.unit_index[(param, 0)], graph.unit_index[(param, 1)]
            modular = [(int(rows[j]), int(cols[j % len(cols)])) for j in range(len(rows))
                       if rows[j] >= 0 and cols[j % len(cols)] >= 0] if b in bad else []
            rows_mod += modular
            views += [(int(ids[c]), int(cols[c])) for ids in merged for c in range(len(cols))
                      if cols[c] >= 0] if merged else modular
        for pairs in dict.fromkeys(tuple(p) for p in (views, rows_mod) if p):
            if _tie_runs(model, graph, a, list(pairs), example_inputs, screen, outputs=outputs,
                         example_kwargs=example_kwargs, at=at, dense=dense):
                linked.append((a, sorted({b for b, _, _ in entries}), list(pairs)))
                break
    notes = [f"tied the heads of {', '.join(graph.groups[b].layers[0] for b in bs)} to the "
             f"width of their input ({graph.groups[a].layers[0]}, ...): their code reshapes by "
             f"the input's width, so the two keep equal counts" for a, bs, _ in linked]
    return _merge_links(graph, bad, where, linked, notes)


def link_equal_sizes(model: nn.Module, graph: ChannelGraph, bad: dict[int, str],
                     where: dict[int, str], example_inputs: Any, *,
                     outputs: Optional[Callable] = None,
                     example_kwargs: Optional[dict] = None,
                     at: Optional[Sequence[str]] = None,
                     dense: Optional[DenseRun] = None,
                     screen: Optional[ShapeScreen] = None,
                     train_mode: bool = False, train_inputs: Any = None
                     ) -> tuple[ChannelGraph, dict[int, str], list[str]]:
    """Tie groups whose widths one Python number serves.

    EfficientViT's cascaded attention splits every head's q/k/v by ``[self.key_dim,
    self.key_dim, self.val_dim]``, and all but the last head's values are added to the next
    head's input; SHViT's ``self.pdim`` is both the width of the input part its attention
    takes and of its values. One shrinking alone makes the number wrong for the other, so
    repair found it failing. For a failing group, each width its units fill wholly that the
    same module's code passes as a number (``ChannelGraph.sizes``) is tied, position by
    position, to every other width of that value in that module made wholly of one group (its
    own too: EfficientViT's last head's values and the others' are all in one group, but not
    the same units): in every module first, then in the one that raised. The first layout
    whose one-unit probe runs is kept (in train mode too with ``train_mode``, for groups a
    plan's train-mode run found: a tie that runs in eval mode only would merge a group into
    a larger one that then freezes whole). Returns as ``link_input_widths`` does.
    """
    group_of = np.array([u.group for u in graph.units] + [-1], dtype=np.int64)
    by_width: dict[tuple[str, int], list[np.ndarray]] = {}  # widths made wholly of one group
    for name, arrays in graph.sizes:
        for ids in arrays:
            if len(ids) and (ids >= 0).all() and (group_of[ids] == group_of[ids[0]]).all():
                by_width.setdefault((name, len(ids)), []).append(ids)
    linked: list[tuple[int, list[int], list[tuple[int, int]]]] = []
    done: set[int] = set()
    for a in sorted(bad):
        if a in done:
            continue
        layouts: list[tuple[tuple[int, int], ...]] = []
        for scope in ("", where.get(a)):
            if scope is None:
                continue
            pairs: list[tuple[int, int]] = []
            for (name, _), arrays in by_width.items():
                ref = next((ids for ids in arrays if group_of[ids[0]] == a), None)
                if ref is None or not inside(name, scope):
                    continue
                pairs += [(int(u), int(v)) for ids in arrays for u, v in zip(ref, ids)
                          if u != v]
            if pairs:
                layouts.append(tuple(dict.fromkeys(pairs)))
        for pairs in dict.fromkeys(layouts):
            if _tie_runs(model, graph, a, list(pairs), example_inputs, screen, outputs=outputs,
                         example_kwargs=example_kwargs, at=at, dense=dense,
                         train_mode=train_mode, train_inputs=train_inputs):
                others = sorted({int(group_of[v]) for _, v in pairs} - {a})
                linked.append((a, others, list(pairs)))
                done |= {a, *others}
                break
    notes = [f"tied channels of {', '.join(graph.groups[g].layers[0] for g in [a, *bs])}, "
             f"... position by position: one number in the model's code gives the width of "
             f"each, so they keep equal counts" for a, bs, _ in linked]
    return _merge_links(graph, bad, where, linked, notes)


def _merge_links(graph: ChannelGraph, bad: dict[int, str], where: dict[int, str],
                 linked: list[tuple[int, list[int], list[tuple[int, int]]]], notes: list[str]
                 ) -> tuple[ChannelGraph, dict[int, str], list[str]]:
    """``graph`` with the units ``linked``'s pairs tie merged, what of ``bad`` stays
    unprunable, and ``notes``; ``where`` is renumbered in place, as ``bad`` is."""
    if not linked:
        return graph, bad, []
    graph_out, mapping = graph.with_merged([p for _, _, pairs in linked for p in pairs])
    tied = {a for a, _, _ in linked} | {b for _, bs, _ in linked for b in bs}

    def new_id(g: int) -> int:
        return int(graph_out.units[int(mapping[graph.groups[g].units[0]])].group)

    remaining = {new_id(g): why for g, why in bad.items() if g not in tied}
    moved = {new_id(g): module for g, module in where.items()
             if g not in tied and graph.groups[g].units}
    where.clear()
    where.update(moved)
    return graph_out, remaining, notes


def _tie_runs(model: nn.Module, graph: ChannelGraph, group: int, pairs: list[tuple[int, int]],
              example_inputs: Any, screen: Optional[ShapeScreen], **kw: Any) -> bool:
    """Whether removing one unit of ``group``, and all that ``pairs`` tie to it, passes the
    check (on fake tensors first, given a ``screen`` on these inputs; then for real where the
    outputs are compared)."""
    tied = _tied_to(graph.groups[group].units[0], pairs)
    exact = all(graph.units[u].exact for u in tied)
    try:
        if serves(screen, example_inputs) and kw.get("at") is None:
            try:
                screen.check(model, graph, tied)
                if not exact:
                    return True
            except FakeUnsupported:
                pass
        result = verify(model, graph, tied, example_inputs, **kw)
    except (VerificationError, SurgeryError):
        return False
    return result.ok or not exact


def _merged_widths(graph: ChannelGraph, group_of: np.ndarray, group: int, module: str,
                   width: int) -> list[np.ndarray]:
    """Units per position of the widths that ``module``'s code views as ``width`` channels
    (``(attn @ v).view(B, C, H, W)``, ``reshape(B, N, C)``) made wholly of ``group``'s units."""
    return [ids for name, arrays in graph.sizes if inside(name, module) for ids in arrays
            if len(ids) == width and (ids >= 0).all() and (group_of[ids] == group).all()]


def _tied_to(unit: int, pairs: list[tuple[int, int]]) -> list[int]:
    """Every unit that ``pairs`` tie to ``unit``, transitively (itself included)."""
    linked: dict[int, list[int]] = {}
    for a, b in pairs:
        linked.setdefault(a, []).append(b)
        linked.setdefault(b, []).append(a)
    seen, todo = {unit}, [unit]
    while todo:
        for v in linked.get(todo.pop(), ()):
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return sorted(seen)


def freeze_unprunable(graph: ChannelGraph, bad: dict[int, str]) -> ChannelGraph:
    """``graph`` with the groups ``bad`` names frozen, each with what went wrong as reason."""
    if not bad:
        return graph
    return graph.without_groups({g: f"the model's code fails when this group shrinks "
                                    f"({why}); a width is fixed in Python"
                                 for g, why in bad.items()})


def repair_graph(model: nn.Module, graph: ChannelGraph, example_inputs: Any, *,
                 outputs: Optional[Callable] = None,
                 example_kwargs: Optional[dict] = None,
                 at: Optional[Sequence[str]] = None) -> ChannelGraph:
    """``graph`` with every group the model's code cannot prune frozen (see module docstring),
    once attention that reads its width from its input is tied to it (``link_input_widths``)
    and groups whose widths one number serves are tied together (``link_equal_sizes``)."""
    kw = dict(outputs=outputs, example_kwargs=example_kwargs, at=at)
    raised: dict[int, str] = {}
    bad = find_unprunable_groups(model, graph, example_inputs, where=raised, **kw)
    graph, bad, _ = link_input_widths(model, graph, bad, raised, example_inputs, **kw)
    graph, bad, _ = link_equal_sizes(model, graph, bad, raised, example_inputs, **kw)
    return freeze_unprunable(graph, bad)

